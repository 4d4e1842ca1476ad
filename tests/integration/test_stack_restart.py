"""`karma8 up` survives its children crashing: it restarts them and loses nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.errors import Karma8Error
from tests.integration.harness import make_file, sha256_of, wait_until
from tests.integration.up_harness import karma8_up, processes_mentioning


def _client(url: str) -> Client:
    return Client(ClientConfig.model_validate({"api": url}))


def _pid_of(path: Path) -> int | None:
    """The child process serving the data directory ``path`` (None if none runs)."""
    found = [pid for pid, cmd in processes_mentioning(str(path)) if f"--data-dir {path} " in cmd]
    return found[0] if found else None


async def _live(client: Client) -> int:
    try:
        return int((await client.status())["live"])
    except Karma8Error:
        return -1


async def test_a_killed_bucket_and_api_come_back_and_nothing_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    src = tmp_path / "src"
    digest = make_file(src, 3 * MiB + 5, seed=8)
    log = tmp_path / "up.log"
    async with karma8_up(data, log, "--buckets", "8") as stack:
        client = _client(stack.url)
        assert await _live(client) == 8
        await client.upload(src, "kept")

        bucket = data / "bucket-3"
        old = _pid_of(bucket)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await client.download("kept", tmp_path / "back")  # at once: read around the dead bucket
        assert sha256_of(tmp_path / "back") == digest

        async def bucket_back() -> bool:
            pid = _pid_of(bucket)
            return pid not in (None, old) and await _live(client) == 8

        await wait_until(bucket_back, "bucket-3 restarted and live")
        assert stack.proc.returncode is None, "karma8 up stopped"

        api = _pid_of(data / "api")
        assert api is not None
        os.kill(api, signal.SIGKILL)

        async def api_back() -> bool:
            return _pid_of(data / "api") not in (None, api) and await _live(client) == 8

        await wait_until(api_back, "the API server restarted on the same port")
        (tmp_path / "back").unlink()
        await client.download("kept", tmp_path / "back")
        assert sha256_of(tmp_path / "back") == digest
        assert "exited with status -9; restarting it" in log.read_text()


async def test_two_stacks_run_side_by_side(tmp_path: Path) -> None:
    src = tmp_path / "src"
    digest = make_file(src, MiB, seed=2)
    async with (
        karma8_up(tmp_path / "one", tmp_path / "one.log", "--buckets", "6") as one,
        karma8_up(tmp_path / "two", tmp_path / "two.log", "--buckets", "6") as two,
    ):
        assert one.url != two.url
        for stack in (one, two):
            client = _client(stack.url)
            await client.upload(src, "same name")
            await client.download("same name", tmp_path / "back")
            assert sha256_of(tmp_path / "back") == digest
            (tmp_path / "back").unlink()
        assert len(await _client(one.url).list()) == len(await _client(two.url).list()) == 1
