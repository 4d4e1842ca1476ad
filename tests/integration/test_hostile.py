"""Broken and hostile clients: clear errors, nothing stored, the server keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from karma8.config import MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from tests.integration.harness import expect_error, make_file, open_cluster, open_raw, wait_until


async def test_a_client_that_stops_sending_times_out(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, idle_timeout=1.0) as cluster:
        async with open_raw(cluster.url, "/upload/stalled") as ws:
            await ws.send_message(encode_upload_header(UploadHeader(size=8 * MiB)))
            await ws.send_message(b"\x08" * MiB)
            # ... and nothing more.
            reply = await expect_error(ws)
        assert reply["error"] == "timeout"
        await wait_until(lambda: not cluster.all_files(), "the stalled upload's data to go")
        db = cluster.registry()
        try:
            assert db.lookup("stalled") is None
            assert db.pending_deletions() == []
        finally:
            db.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_thousands_of_abandoned_connections(tmp_path: Path) -> None:
    """Silent sockets, half-sent handshakes and handshaken-then-silent clients: the server
    closes them all by its deadlines, serves others meanwhile, and frees every descriptor."""
    async with open_cluster(tmp_path, idle_timeout=2.0, handshake_timeout=2.0) as cluster:
        host, port = "127.0.0.1", int(cluster.url.rsplit(":", 1)[1])
        src = tmp_path / "f"
        digest = make_file(src, MiB + 1)
        baseline = open_fds()
        closed_by_server = 0

        async def silent(payload: bytes) -> None:
            nonlocal closed_by_server
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                if payload:
                    await stream.send_all(payload)
                with trio.fail_after(30):
                    while await stream.receive_some(65536):
                        pass  # whatever the server says, until it hangs up
            closed_by_server += 1

        async def handshaken_then_silent() -> None:
            nonlocal closed_by_server
            async with open_websocket_url(f"{cluster.url}/upload/abandoned") as ws:
                await expect_error(ws)  # "timeout", sent by the server's idle limit
            closed_by_server += 1

        async with trio.open_nursery() as nursery:
            for i in range(1500):
                nursery.start_soon(silent, b"" if i % 2 else b"GET /upload/x HTTP/1.1\r\nHost: x\r\n")
            for _ in range(100):
                nursery.start_soon(handshaken_then_silent)
            # Meanwhile, real work goes on.
            await cluster.client.upload(src, "served")
            assert (await cluster.client.download("served", tmp_path / "out")).sha256 == digest
        assert closed_by_server == 1600

        await wait_until(lambda: open_fds() <= baseline + 10, "the server to free its descriptors")
        assert [f["name"] for f in await cluster.client.list()] == ["served"]
        served_id = str((await cluster.client.stat("served"))["upload_id"])
        assert all(n.startswith(served_id) for n in cluster.all_files())
