"""The API server SIGKILLed in the middle of uploads: nothing lost, nothing left behind."""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.registry.db import RegistryDB
from tests.integration.harness import (
    free_port,
    make_file,
    open_api_process,
    open_raw,
    start_bucket,
    start_buckets,
    stop_process,
    upload_rows,
    wait_live,
    wait_until,
)


def kill_api(root: Path) -> None:
    """SIGKILL the ``karma8 api`` process serving ``root / "api"``."""
    marker = f"--data-dir\0{root / 'api'}\0".encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"karma8\0api\0" in cmdline and marker in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            return
    raise AssertionError("no API process found")


def _no_fragments(db: RegistryDB, upload_id: str) -> bool:
    return db.fragments(upload_id) == []


async def test_api_killed_mid_upload(tmp_path: Path) -> None:
    membership = free_port()
    src = tmp_path / "keep"
    digest = make_file(src, 2 * MiB + 9)
    buckets = await start_buckets(tmp_path, membership)
    try:
        async with open_api_process(tmp_path, membership) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            await client.upload(src, "keep")

            async def doomed_upload(name: str) -> None:
                try:
                    async with open_raw(url, f"/upload/{name}") as ws:
                        await ws.send_message(encode_upload_header(UploadHeader(size=512 * MiB)))
                        while True:
                            await ws.send_message(b"\x07" * MiB)
                except ConnectionClosed:
                    pass  # the API died under us

            async with trio.open_nursery() as uploads:
                for name in ("doomed-1", "doomed-2"):
                    uploads.start_soon(doomed_upload, name)
                await wait_until(
                    lambda: sum(bool(b.tmp_files()) for b in buckets) >= 6,
                    "both uploads to be writing on the buckets",
                )
                kill_api(tmp_path)  # the uploads end when their connections break

        db = RegistryDB(tmp_path / "api" / "registry.sqlite3")
        try:
            assert [s for _, s in upload_rows(db, "doomed-1")] == ["in_progress"]
        finally:
            db.close()

        async with open_api_process(tmp_path, membership) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            keep_id = str((await client.stat("keep"))["upload_id"])
            await wait_until(
                lambda: (
                    all(fid.startswith(keep_id) for b in buckets for fid in b.fragment_ids())
                    and not any(b.tmp_files() for b in buckets)
                ),
                "the interrupted uploads' data to be gone from every bucket",
            )
            db = RegistryDB(tmp_path / "api" / "registry.sqlite3")
            try:
                for name in ("doomed-1", "doomed-2"):
                    ((upload_id, state),) = upload_rows(db, name)
                    assert state == "failed"
                    await wait_until(partial(_no_fragments, db, upload_id), "pending deletions to finish")
                    assert db.lookup(name) is None
            finally:
                db.close()
            assert [f["name"] for f in await client.list()] == ["keep"]
            assert (await client.download("keep", tmp_path / "out")).sha256 == digest
    finally:
        for b in buckets:
            await stop_process(b.proc, signal.SIGTERM)


async def test_api_killed_mid_repair_loses_nothing_and_resumes(tmp_path: Path) -> None:
    membership = free_port()
    src = tmp_path / "file"
    digest = make_file(src, 24 * MiB + 3, seed=6)
    buckets = await start_buckets(tmp_path, membership)
    # Slow repairs, so that the kill lands in the middle of one.
    settings = {"repair_bandwidth": 4 * MiB, "repair_interval": 0.3}
    try:
        async with open_api_process(tmp_path, membership, settings) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            await client.upload(src, "file")  # 6 buckets: the parity is owed
            upload_id = str((await client.stat("file"))["upload_id"])
            new = [await start_bucket(tmp_path / f"bucket-{i}", membership) for i in (6, 7)]
            buckets += new
            await wait_until(lambda: any(b.tmp_files() for b in new), "the repair writing to a new bucket")
            kill_api(tmp_path)

        db = RegistryDB(tmp_path / "api" / "registry.sqlite3")
        try:
            assert [r.upload_id for r in db.repairs()] == [upload_id]
            assert db._query("SELECT COUNT(*) FROM moves WHERE src = ''") != [(0,)]
        finally:
            db.close()

        async with open_api_process(tmp_path, membership, settings) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 8)

            def repaired() -> bool:
                db = RegistryDB(tmp_path / "api" / "registry.sqlite3")
                try:
                    rows = db.fragments(upload_id)
                    return (
                        not db.repairs()
                        and not db.pending_stale()
                        and len(rows) == 8
                        and all(f.state == "ok" for f in rows)
                    )
                finally:
                    db.close()

            await wait_until(repaired, "the repair resumed and finished", within=60)
            every = [fid for b in buckets for fid in b.fragment_ids()]
            assert sorted(every) == sorted(f"{upload_id}.{p}" for p in range(8)), "garbage left"
            assert not any(b.tmp_files() for b in buckets)
            assert (await client.download("file", tmp_path / "out")).sha256 == digest
    finally:
        for b in buckets:
            await stop_process(b.proc, signal.SIGTERM)
