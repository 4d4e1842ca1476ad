"""Metrics, health checks and logs of real ``karma8 api`` / ``karma8 bucket`` processes.

Everything is read the way a monitoring system reads it: ``/metrics``, ``/healthz`` and
``/ready`` over HTTP, the gRPC health service through ``karma8 health``, log lines from
the processes' stderr.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.errors import ConfigError, RemoteError
from karma8.metrics_http import start_endpoint
from tests.integration.harness import (
    TEST_SECRET,
    BucketProcess,
    expect_error,
    free_port,
    karma8_cmd,
    make_file,
    open_api_process,
    open_raw,
    start_bucket,
    stop_process,
    wait_until,
)
from tests.integration.up_harness import cli_env

#: Every bucket of these tests picks a free metrics port (the default 9101 is shared).
BUCKET_ENV = {"KARMA8_BUCKET_METRICS_PORT": "0"}
#: A size that puts data on all 6 parts, one of them streamed (more than a stripe unit).
SIZE = 3 * MiB + 5

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def http_get(url: str) -> tuple[int, str]:
    """GET ``url`` (on a worker thread); (status, body)."""
    return await trio.to_thread.run_sync(_get, url)


async def scrape(port: int) -> Samples:
    """The samples of ``/metrics`` on ``port``, by (name, labels)."""
    status, text = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample (0 if the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def per_bucket(samples: Samples, name: str) -> dict[str, float]:
    """A gauge labelled ``bucket``: bucket id -> value."""
    return {dict(labels)["bucket"]: v for (n, labels), v in samples.items() if n == name}


def ready_info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(path.read_text())
    return info


@dataclass
class Stack:
    """A real API process and bucket processes, with their metrics ports."""

    root: Path
    membership_port: int
    url: str
    api_metrics: int
    buckets: list[BucketProcess] = field(default_factory=list)
    bucket_metrics: dict[str, int] = field(default_factory=dict)
    _started: int = 0

    @property
    def client(self) -> Client:
        return Client(ClientConfig.model_validate({"api": self.url}))

    async def add_bucket(self) -> BucketProcess:
        self._started += 1  # before the first await: buckets start concurrently
        data = self.root / f"bucket-{self._started}"
        bucket = await start_bucket(data, self.membership_port, BUCKET_ENV)
        self.buckets.append(bucket)
        port = ready_info(data.with_name(data.name + ".ready"))["metrics_port"]
        assert isinstance(port, int)
        assert port > 0
        self.bucket_metrics[bucket.bucket_id] = port
        return bucket

    async def live(self) -> int:
        return int((await self.client.status())["live"])


@contextlib.asynccontextmanager
async def open_stack(root: Path, **settings: object) -> AsyncIterator[Stack]:
    """A ``karma8 api`` process on free ports (``settings``: more [api] keys), no bucket yet."""
    membership_port = free_port()
    async with open_api_process(root, membership_port, {"metrics_port": 0, **settings}) as url:
        metrics_port = ready_info(root / "api.ready")["metrics_port"]
        assert isinstance(metrics_port, int)
        assert metrics_port > 0
        stack = Stack(root, membership_port, url, metrics_port)
        try:
            yield stack
        finally:
            for b in stack.buckets:
                await stop_process(b.proc)


async def karma8_health(*args: str) -> tuple[int, str, str]:
    """``karma8 health ARGS`` as a container runs it: (exit status, stdout, stderr)."""
    with trio.fail_after(30):
        proc = await trio.run_process(
            karma8_cmd("health", *args), capture_stdout=True, capture_stderr=True, check=False, env=cli_env()
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def closed_port() -> int:
    """A port nothing listens on (bound and released a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_metrics_and_health_through_a_round_trip(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        ready = f"http://127.0.0.1:{stack.api_metrics}/ready"
        assert await http_get(f"http://127.0.0.1:{stack.api_metrics}/healthz") == (200, "ok\n")

        # Not ready until `parts` (6) buckets are live.
        status, body = await http_get(ready)
        assert (status, body) == (503, "not ready: 0 live bucket(s), 6 needed to store a file\n")
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(stack.add_bucket)

        async def five_live() -> bool:
            return await stack.live() == 5

        await wait_until(five_live, "5 live buckets")
        assert await http_get(ready) == (503, "not ready: 5 live bucket(s), 6 needed to store a file\n")
        code, _, err = await karma8_health(ready)
        assert code == 1
        assert err == f"karma8: error: {ready}: 503 not ready: 5 live bucket(s), 6 needed to store a file\n"

        await stack.add_bucket()

        async def api_ready() -> bool:
            return await http_get(ready) == (200, "ready\n")

        await wait_until(api_ready, "the API to be ready")
        code, out, _ = await karma8_health(ready)
        assert (code, out) == (0, f"{ready}: 200 ready\n")

        # Every bucket: alive, ready (the API acknowledged it), SERVING without the secret.
        for bucket in stack.buckets:
            port = stack.bucket_metrics[bucket.bucket_id]
            assert await http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
            assert await http_get(f"http://127.0.0.1:{port}/ready") == (200, "ready\n")
        target = f"grpc://127.0.0.1:{stack.buckets[0].port}"
        code, out, err = await karma8_health(target)
        assert (code, out, err) == (0, f"{target}: SERVING\n", "")
        code, out, err = await karma8_health(f"{target}/karma8.v1.Bucket")
        assert code == 0, err
        code, out, err = await karma8_health(f"{target}/no.such.Service")
        assert code == 1
        assert err.startswith(f"karma8: error: {target}/no.such.Service: NOT_FOUND"), err

        # One round trip of a file of known size.
        src = tmp_path / "src"
        make_file(src, SIZE, seed=6)
        client = stack.client
        await client.upload(src, "obs/file")
        await client.download("obs/file", tmp_path / "back")
        stat = await client.stat("obs/file")
        part_size = {p["bucket"]: p["size"] for p in stat["parts"] if p["bucket"]}  # parity owed
        assert len(part_size) == 6

        # Counted once each session has ended (just after its last frame).
        async def sessions_ended() -> bool:
            api = await scrape(stack.api_metrics)
            return value(api, "karma8_api_download_duration_seconds_count") == 1

        await wait_until(sessions_ended, "the download to be counted")
        api = await scrape(stack.api_metrics)
        assert value(api, "karma8_api_uploaded_bytes_total") == SIZE
        assert value(api, "karma8_api_downloaded_bytes_total") == SIZE
        assert value(api, "karma8_api_upload_duration_seconds_count") == 1
        assert value(api, "karma8_api_download_duration_seconds_count") == 1
        assert value(api, "karma8_api_uploads_total", outcome="ok") == 1
        assert value(api, "karma8_api_downloads_total", outcome="ok") == 1
        assert value(api, "karma8_api_live_buckets") == 6
        for op in ("upload", "download"):
            assert value(api, "karma8_api_sessions", op=op) == 0, "a session is still counted as active"

        # Per bucket, from the heartbeats (they lag by up to one heartbeat).
        async def heartbeats_caught_up() -> bool:
            api = await scrape(stack.api_metrics)
            fragments = per_bucket(api, "karma8_api_bucket_fragments")
            used = per_bucket(api, "karma8_api_bucket_used_bytes")
            return (
                len(fragments) == 6
                and all(n > 0 for n in fragments.values())
                and sum(used.values()) == SIZE
                and used == {b: float(s) for b, s in part_size.items()}
            )

        await wait_until(heartbeats_caught_up, "per-bucket gauges to show the file")
        api = await scrape(stack.api_metrics)
        assert per_bucket(api, "karma8_api_bucket_live") == dict.fromkeys(part_size, 1.0)
        assert all(v > 0 for v in per_bucket(api, "karma8_api_bucket_free_bytes").values())

        # Each bucket counted its Put and its Get, with the fragment's bytes.
        for bucket_id, size in part_size.items():
            samples = await scrape(stack.bucket_metrics[bucket_id])
            assert value(samples, "karma8_bucket_puts_total", result="ok") == 1
            assert value(samples, "karma8_bucket_gets_total", result="ok") == 1
            assert value(samples, "karma8_bucket_written_bytes_total") == size
            assert value(samples, "karma8_bucket_read_bytes_total") == size
            assert value(samples, "karma8_bucket_used_bytes") == size
            assert value(samples, "karma8_bucket_fragments") == 1
            assert value(samples, "karma8_bucket_registered") == 1
            assert value(samples, "karma8_bucket_tmp_files_removed_at_start") == 0
            assert value(samples, "karma8_bucket_info", bucket=bucket_id) == 1

        # A request for a missing file is an error a client saw, by its code.
        with pytest.raises(RemoteError, match="no file named"):
            await client.download("obs/missing", tmp_path / "missing")
        api = await scrape(stack.api_metrics)
        assert value(api, "karma8_api_errors_total", code="not_found") == 1
        assert value(api, "karma8_api_downloads_total", outcome="not_found") == 1
        assert value(api, "karma8_api_download_duration_seconds_count") == 1, "a failure was timed"

        # A failed upload: its bytes count, its fragments are cleaned up, it is not timed.
        data = b"\x04" * (2 * MiB + 7)
        async with open_raw(stack.url, "/upload/obs/bad") as ws:
            wrong = hashlib.sha256(b"something else").hexdigest()
            await ws.send_message(encode_upload_header(UploadHeader(size=len(data), sha256=wrong)))
            for i in range(0, len(data), MiB):
                await ws.send_message(data[i : i + MiB])
            await ws.send_message(b"")
            assert (await expect_error(ws))["error"] == "checksum_mismatch"
        api = await scrape(stack.api_metrics)
        assert value(api, "karma8_api_uploaded_bytes_total") == SIZE + len(data)
        assert value(api, "karma8_api_uploads_total", outcome="checksum_mismatch") == 1
        assert value(api, "karma8_api_errors_total", code="checksum_mismatch") == 1
        assert value(api, "karma8_api_upload_cleanups_total", result="done") == 1
        # The janitor's periodic sweep may reach a bucket before the cleanup does (the
        # upload is marked failed first): between them they deleted all 6 fragments.
        deleted = {
            r: value(api, "karma8_api_deleted_fragments_total", reason=r) for r in ("cleanup", "janitor")
        }
        assert sum(deleted.values()) == 6, deleted
        assert deleted["cleanup"] > 0, deleted
        assert value(api, "karma8_api_upload_duration_seconds_count") == 1

        # The background work reports too.
        assert value(api, "karma8_api_rebalance_running") == 0
        assert value(api, "karma8_api_rebalance_pending_moves") == 0
        assert ("karma8_api_rebalance_moves_total", frozenset({("result", "done")})) in api
        assert ("karma8_api_rebalance_moved_bytes_total", frozenset()) in api
        assert value(api, "karma8_api_missing_fragments") == 0
        assert ("karma8_api_janitor_pending_deletions", frozenset()) in api

        async def background_reported() -> bool:
            api = await scrape(stack.api_metrics)
            return (
                value(api, "karma8_api_janitor_sweeps_total") >= 2
                and value(api, "karma8_api_reconciliations_total", result="ok") >= 6  # one per join
            )

        await wait_until(background_reported, "janitor passes and reconciliations")

        # Deleting the file: the janitor deletes its 6 fragments, and the counters say so.
        await client.delete("obs/file")

        async def janitor_deleted() -> bool:
            api = await scrape(stack.api_metrics)
            return value(api, "karma8_api_deleted_fragments_total", reason="janitor") == 6

        await wait_until(janitor_deleted, "the janitor to delete the fragments")
        deletes = [await scrape(p) for p in stack.bucket_metrics.values()]
        # 6 by the failed upload's cleanup, 6 by the janitor.
        assert sum(value(b, "karma8_bucket_deleted_fragments_total") for b in deletes) == 12
        assert all(value(b, "karma8_bucket_deletes_total", result="ok") >= 1 for b in deletes)

    # Everything stopped: nothing answers any more.
    code, _, err = await karma8_health(ready)
    assert code == 1
    assert err.startswith(f"karma8: error: {ready}: cannot connect"), err


async def test_rebalance_progress_is_counted(tmp_path: Path) -> None:
    # Without parity: repairs would also write to the bucket that joins.
    async with open_stack(tmp_path, rebalance_auto=False, rebalance_bandwidth=0, parity=0) as stack:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(stack.add_bucket)

        async def live(n: int) -> bool:
            return await stack.live() == n

        await wait_until(functools.partial(live, 6), "6 live buckets")
        client = stack.client
        for i in range(12):
            make_file(tmp_path / f"src-{i}", 96 * 1024, seed=i)
            await client.upload(tmp_path / f"src-{i}", f"f{i}")
        new = await stack.add_bucket()
        await wait_until(functools.partial(live, 7), "7 live buckets")
        assert (await client.rebalance())["started"]

        async def run_over() -> bool:
            last = (await client.status())["rebalancer"]["last"]
            return last is not None and last["moves"] > 0

        await wait_until(run_over, "the rebalance run to end")
        last = (await client.status())["rebalancer"]["last"]
        moves, moved = int(last["moves"]), int(last["moved"])
        api = await scrape(stack.api_metrics)
        assert value(api, "karma8_api_rebalance_runs_total") == 1
        assert value(api, "karma8_api_rebalance_running") == 0
        assert value(api, "karma8_api_rebalance_pending_moves") == 0
        assert value(api, "karma8_api_rebalance_moves_total", result="done") == moves
        assert value(api, "karma8_api_rebalance_moves_total", result="failed") == last["failed"] == 0
        assert value(api, "karma8_api_rebalance_moved_bytes_total") == moved
        # Each move is one Put on the new bucket, and leaves one stale copy for the janitor.
        moved_in = await scrape(stack.bucket_metrics[new.bucket_id])
        assert value(moved_in, "karma8_bucket_puts_total", result="ok") == moves
        assert value(moved_in, "karma8_bucket_written_bytes_total") == moved

        async def stale_copies_deleted() -> bool:
            api = await scrape(stack.api_metrics)
            return value(api, "karma8_api_deleted_fragments_total", reason="stale") == moves

        await wait_until(stale_copies_deleted, "the janitor to delete the moved fragments' old copies")


async def test_health_fails_for_a_closed_port_with_one_line() -> None:
    for target in (f"http://127.0.0.1:{closed_port()}/ready", f"grpc://127.0.0.1:{closed_port()}"):
        code, out, err = await karma8_health(target, "--timeout", "2")
        assert code == 1, out
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith(f"karma8: error: {target}: cannot "), err


async def test_health_rejects_a_malformed_target() -> None:
    code, _, err = await karma8_health("tcp://127.0.0.1:1")
    assert code == 1
    assert err.startswith("karma8: error: TARGET must be http://HOST:PORT/PATH or grpc://HOST:PORT"), err


async def test_a_bucket_the_api_has_not_acknowledged_is_alive_but_not_ready(tmp_path: Path) -> None:
    """Its store is open and it serves gRPC, but no API answers its heartbeats.

    It runs with JSON logs (``KARMA8_LOG_FORMAT``): every line is one JSON object, and
    the bucket's lines carry its id as a field.
    """
    ready_file, log = tmp_path / "b.ready", tmp_path / "b.log"
    env = cli_env(KARMA8_BUCKET_SECRET=TEST_SECRET, KARMA8_LOG_FORMAT="json", **BUCKET_ENV)
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            karma8_cmd(
                "bucket",
                "--data-dir",
                str(tmp_path / "b"),
                "--port",
                "0",
                "--api",
                f"127.0.0.1:{closed_port()}",
                "--ready-file",
                str(ready_file),
            ),
            env=env,
            stderr=err,
        )
    try:
        await wait_until(ready_file.exists, "the bucket to start")
        info = ready_info(ready_file)
        port = info["metrics_port"]
        assert isinstance(port, int)
        assert await http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        status, body = await http_get(f"http://127.0.0.1:{port}/ready")
        assert status == 503
        assert body.startswith("not ready: "), body
        assert body.count("\n") == 1, body
        code, _, _ = await karma8_health(f"grpc://127.0.0.1:{info['port']}")
        assert code == 0, "the store is open: the gRPC server is SERVING"

        async def failure_counted() -> bool:
            metrics = await scrape(port)
            return value(metrics, "karma8_bucket_heartbeat_failures_total") >= 2

        await wait_until(failure_counted, "failed heartbeats to be counted")
        metrics = await scrape(port)
        assert value(metrics, "karma8_bucket_registered") == 0
        await wait_until(lambda: "cannot be reached" in log.read_text(), "the warning about the API")
    finally:
        await stop_process(proc)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines, "the bucket logged nothing"
    for line in lines:
        assert {"ts", "level", "role", "logger", "msg"} <= set(line), line
        assert line["role"] == "bucket"
        assert line["ts"].endswith("Z")
    warning = next(line for line in lines if "cannot be reached" in line["msg"])
    assert warning["level"] == "WARNING"
    assert warning["bucket"] == info["bucket_id"]


async def test_a_configured_metrics_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with trio.fail_after(30):
            proc = await trio.run_process(
                karma8_cmd(
                    "bucket", "--data-dir", str(tmp_path / "b"), "--port", "0", "--metrics-port", str(port)
                ),
                env=cli_env(KARMA8_BUCKET_SECRET=TEST_SECRET),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"karma8: error: bucket cannot listen on 127.0.0.1:{port} for /metrics"), err


@contextlib.contextmanager
def _held_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_the_default_metrics_port_in_use_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    with _held_port() as port:
        with pytest.raises(ConfigError, match="choose another metrics_port"):
            start_endpoint(
                "127.0.0.1", port, registry, lambda: None, required=True, who="test", on_error=lambda: None
            )
        with caplog.at_level(logging.ERROR, logger="karma8.metrics_http"):
            assert (
                start_endpoint(
                    "127.0.0.1",
                    port,
                    registry,
                    lambda: None,
                    required=False,
                    who="test",
                    on_error=lambda: None,
                )
                is None
            )
    assert any(f"cannot listen on 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
