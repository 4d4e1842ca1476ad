"""The trio <-> asyncio bridge, and cancellation of gRPC streams through it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry

from karma8 import speedups
from karma8.bucket.metrics import BucketMetrics
from karma8.bucket.service import BucketService
from karma8.bucket.store import FragmentStore, open_store
from karma8.bucket.volumes import scan
from karma8.config import MiB
from karma8.core.checksums import unit_crcs
from karma8.core.fragments import fragment_id, new_upload_id
from karma8.errors import BucketUnavailable, ChecksumMismatch, FragmentNotFound, Internal
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import open_portal
from karma8.rpc.buckets import BucketClient, connect_bucket
from karma8.rpc.servers import start_grpc_server
from tests.integration.harness import connect_test_bucket, free_port, start_bucket, stop_process, wait_until
from tests.integration.test_observability import scrape, value


async def test_run_returns_results_and_raises_errors() -> None:
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    async def boom() -> None:
        raise ValueError("boom")

    async with open_portal() as portal:
        assert await portal.run(add, 2, 3) == 5
        with pytest.raises(ValueError, match="boom"):
            await portal.run(boom)


async def test_cancelled_run_waits_for_the_asyncio_side_to_finish() -> None:
    """When run() gives up, the coroutine on the other loop has really ended."""
    events: list[str] = []
    started = trio.Event()

    async def slow_cleanup() -> None:
        try:
            started_in_trio()
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.2)  # cleanup that itself awaits
            events.append("asyncio cleanup done")

    async with open_portal() as portal:
        token = trio.lowlevel.current_trio_token()

        def started_in_trio() -> None:
            token.run_sync_soon(started.set)

        async with trio.open_nursery() as nursery:

            async def call() -> None:
                try:
                    await portal.run(slow_cleanup)
                finally:
                    events.append("trio saw the end")

            nursery.start_soon(call)
            await started.wait()
            nursery.cancel_scope.cancel()
    assert events == ["asyncio cleanup done", "trio saw the end"]


async def test_run_trio_from_asyncio() -> None:
    async def double(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return 2 * x

    async def fails() -> None:
        raise KeyError("k")

    async with open_portal() as portal:

        async def on_asyncio() -> tuple[int, str]:
            value = await portal.run_trio(double, 21)
            try:
                await portal.run_trio(fails)
            except KeyError as exc:
                return value, str(exc)
            return value, ""

        assert await portal.run(on_asyncio) == (42, "'k'")


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
async def test_cancelled_put_resets_the_grpc_stream(tmp_path: Path, uvloop: bool) -> None:
    """Cancelling a trio task mid-Put must reset the stream, so the bucket stops writing.

    The channel stays open: only a RST_STREAM sent by the (shielded) stream exit can make
    the bucket drop its temporary file here.
    """
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal(use_uvloop=uvloop) as portal:
            client = await connect_test_bucket(portal, bucket)
            fid = fragment_id(new_upload_id(), 0)
            with trio.CancelScope() as scope:
                async with client.open_put(fid, 64 * MiB) as writer:
                    await writer.send(b"x" * MiB)
                    await writer.send(b"y" * MiB)
                    await wait_until(
                        lambda: any(p.stat().st_size >= MiB for p in bucket.tmp_files()),
                        "the bucket to write the first chunk",
                    )
                    scope.cancel()
                    await writer.send(b"z" * MiB)
            assert scope.cancelled_caught
            await wait_until(lambda: not bucket.tmp_files(), "the bucket to drop the Put", within=5)
            assert not bucket.fragment_ids()

            # The channel is still usable: the same fragment can be stored afterwards.
            async with client.open_put(fid, 3) as writer:
                await writer.send(b"abc")
                stored = await writer.finish()
            assert stored.size == 3
            assert bucket.fragment_ids() == [fid]
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_unreachable_bucket_is_bucket_unavailable() -> None:
    async with open_portal() as portal:
        client = await connect_bucket(
            portal, "nobody", f"127.0.0.1:{free_port()}", close_timeout=1, security=ChannelSecurity()
        )
        with pytest.raises(BucketUnavailable) as info:
            await client.delete_upload(new_upload_id())
        assert info.value.bucket_id == "nobody"
        await client.aclose()


async def _put(client: BucketClient, fid: str, data: bytes) -> None:
    async with client.open_put(fid, len(data)) as writer:
        await writer.send(data)
        await writer.finish()


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "0" * 32 + ".0/../x",
        "0" * 31 + ".0",
        "A" * 32 + ".0",
        "0" * 32 + ".64",
    ],
)
async def test_a_bucket_refuses_malformed_fragment_ids(tmp_path: Path, bad: str) -> None:
    """Whatever id arrives over gRPC, nothing is created outside (or inside) the bucket."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            with pytest.raises(Internal, match="refused"):
                await _put(client, bad, b"abc")
            with pytest.raises(Internal, match="refused"):
                await client.verify(bad)
            with pytest.raises(Internal, match="refused"):
                await client.delete_upload(bad)
            await client.aclose()
        left = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
        # The bucket's first volume is created at its start, and stays empty.
        assert left == [Path("b/bucket-id"), Path("b/volumes/v00000001.dat"), Path("b.ready")]
        assert (tmp_path / "b/volumes/v00000001.dat").stat().st_size == 0
    finally:
        await stop_process(bucket.proc)


async def test_bucket_connections_use_large_http2_frames(tmp_path: Path) -> None:
    """Both ends announce 256 KiB frames and send data from the caller's buffers (karma8.speedups).

    A 4 MiB message is larger than a stream's 4 MiB receive window: its frames wait for
    window updates half-way. The data round-trips unchanged.
    """
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            fid = fragment_id(new_upload_id(), 0)
            data = bytes(range(256)) * 4096 * 4  # 4 MiB, the buckets' max_chunk
            async with client.open_put(fid, len(data) + 3) as writer:
                await writer.send(data)
                await writer.send(b"end")  # a message too small for the zero-copy path
                stored = await writer.finish()
            data += b"end"
            assert stored.sha256 == hashlib.sha256(data).hexdigest()
            back = b""
            async with client.open_get(fid, 4 * MiB) as reader:
                while (chunk := await reader.receive()) is not None:
                    back += chunk.data
            assert back == data

            async def frame_size() -> int:
                return int(client._channel._protocol.connection._connection.max_outbound_frame_size)

            assert await portal.run(frame_size) == speedups.MAX_FRAME_SIZE
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_whole_fragments_in_one_call(tmp_path: Path) -> None:
    """put_whole / get_whole: the bytes come back, in chunks, and a size mismatch is caught."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            fid = fragment_id(new_upload_id(), 3)
            data = bytes(i % 251 for i in range(100_000))
            stored = await client.put_whole(fid, data)
            assert (stored.fragment_id, stored.size) == (fid, len(data))
            assert stored.sha256 == hashlib.sha256(data).hexdigest()
            assert bucket.fragment_ids() == [fid]
            chunks = await client.get_whole(fid, len(data), 30_000)
            assert [c.data for c in chunks] == [data]  # one piece: a GetMany item is whole
            client.batches = False  # as with a bucket of an earlier release: a Get each
            chunks = await client.get_whole(fid, len(data), 30_000)
            assert [len(c.data) for c in chunks] == [30_000, 30_000, 30_000, 10_000]
            assert b"".join(c.data for c in chunks) == data
            client.batches = True
            with pytest.raises(BucketUnavailable, match="longer than recorded"):
                await client.get_whole(fid, len(data) - 1, 30_000)
            with pytest.raises(BucketUnavailable, match="100000 of 100001 bytes"):
                await client.get_whole(fid, len(data) + 1, 30_000)
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_cancelled_put_whole_resets_the_grpc_stream(tmp_path: Path) -> None:
    """A cancelled single-Put put_whole (to a bucket without PutMany) returns at once and
    leaves nothing once the bucket reads on."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            client.batches = False
            await client.put_whole(fragment_id(new_upload_id(), 0), b"warm")  # connected
            fid = fragment_id(new_upload_id(), 0)
            bucket.proc.send_signal(signal.SIGSTOP)  # it reads nothing: the call hangs
            try:
                with trio.move_on_after(0.5) as scope:
                    await client.put_whole(fid, b"x" * 4 * MiB)
                assert scope.cancelled_caught
            finally:
                bucket.proc.send_signal(signal.SIGCONT)
            # The channel is still usable, and this call flushes the reset queued behind
            # the data the stopped bucket did not read. Without the reset the bucket would
            # keep the half-sent Put's temporary file open forever.
            assert (await client.put_whole(fragment_id(new_upload_id(), 1), b"abc")).size == 3
            await wait_until(lambda: not bucket.tmp_files(), "the bucket to drop the Put", within=5)
            assert fid not in bucket.fragment_ids()
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_a_cancelled_batched_put_is_back_once_its_call_ended(tmp_path: Path) -> None:
    """put_whole in a PutMany: the call goes on for the others; the cancelled caller is
    back once it ended, so the fragment is stored whole (never half) before the caller's
    cleanup could look for it."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal, trio.open_nursery() as nursery:
            client = await connect_test_bucket(portal, bucket)
            await client.put_whole(fragment_id(new_upload_id(), 0), b"warm")  # connected
            fid = fragment_id(new_upload_id(), 0)
            data = bytes(range(256)) * 4096
            bucket.proc.send_signal(signal.SIGSTOP)  # it reads nothing: the call hangs

            async def resume() -> None:
                await trio.sleep(1)
                bucket.proc.send_signal(signal.SIGCONT)

            nursery.start_soon(resume)
            try:
                with trio.move_on_after(0.2) as scope:
                    await client.put_whole(fid, data)
                assert scope.cancelled_caught
                assert fid in bucket.fragment_ids()  # the call ended before the caller was back
            finally:
                bucket.proc.send_signal(signal.SIGCONT)
            assert [p.data for p in await client.get_whole(fid, len(data), len(data))] == [data]
            assert not bucket.tmp_files()
            assert (client.puts.calls, client.puts.requests) == (2, 2)
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_a_complete_first_message_followed_by_more_is_streamed(tmp_path: Path) -> None:
    """The bucket's one-call path is taken only when the first message is the whole stream."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            fid = fragment_id(new_upload_id(), 0)
            async with client.open_put(fid, 3) as writer:
                await writer.send(b"abc")
                await writer.send(b"")  # nothing more, but another message
                assert (await writer.finish()).size == 3
            assert [c.data for c in await client.get_whole(fid, 3, 1)] == [b"abc"]  # a file, read whole

            async def too_much() -> None:
                async with client.open_put(fragment_id(new_upload_id(), 0), 3) as writer:
                    await writer.send(b"abc")
                    await writer.send(b"d")
                    await writer.finish()

            with pytest.raises(Internal, match="more than the announced 3 bytes"):
                await too_much()
            await wait_until(lambda: not bucket.tmp_files(), "the bucket to drop the refused Put")
            assert bucket.fragment_ids() == [fid]
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_a_stalled_put_is_dropped_by_the_bucket(tmp_path: Path) -> None:
    """A sender that goes silent (no reset, no data) loses its Put after idle_timeout."""
    bucket = await start_bucket(
        tmp_path / "b", membership_port=free_port(), env={"KARMA8_BUCKET_IDLE_TIMEOUT": "0.5"}
    )
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)

            async def stall() -> None:
                async with client.open_put(fragment_id(new_upload_id(), 0), 3 * MiB) as writer:
                    await writer.send(b"x" * MiB)
                    await wait_until(lambda: bool(bucket.tmp_files()), "the bucket to start the Put")
                    # Silence: the bucket gives up, drops the file and ends the call.
                    await wait_until(lambda: not bucket.tmp_files(), "the bucket to drop the Put", within=5)
                    await writer.finish()

            with pytest.raises(BucketUnavailable, match=r"nothing received for 0\.5 s"):
                await stall()
            assert not bucket.fragment_ids()
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_a_batch_answers_each_fragment_on_its_own(tmp_path: Path) -> None:
    """Concurrent put_whole calls share PutMany calls; a damaged or missing one fails alone."""
    bucket = await start_bucket(tmp_path / "b", membership_port=free_port())
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            upload = new_upload_id()
            good = {fragment_id(upload, p): bytes([p]) * 3000 for p in range(6)}
            bad = fragment_id(upload, 6)
            outcomes: dict[str, object] = {}

            async def put(fid: str, data: bytes, crcs: list[int]) -> None:
                try:
                    outcomes[fid] = (await client.put_whole(fid, data, 1000, crcs)).size
                except ChecksumMismatch as exc:
                    outcomes[fid] = exc

            async with trio.open_nursery() as nursery:
                for fid, data in good.items():
                    nursery.start_soon(put, fid, data, unit_crcs(data, 1000))
                crcs = unit_crcs(b"x" * 3000, 1000)
                crcs[2] ^= 1  # damaged on the way
                nursery.start_soon(put, bad, b"x" * 3000, crcs)
            assert {fid: outcomes[fid] for fid in good} == dict.fromkeys(good, 3000)
            assert isinstance(outcomes[bad], ChecksumMismatch)
            assert client.puts.requests == 7
            assert client.puts.calls < 7, "concurrent puts should have shared calls"
            assert bucket.fragment_ids() == sorted(good)

            missing = fragment_id(upload, 7)
            got: dict[str, object] = {}

            async def get(fid: str) -> None:
                try:
                    got[fid] = b"".join(p.data for p in await client.get_whole(fid, 3000, 1000))
                except FragmentNotFound as exc:
                    got[fid] = exc

            async with trio.open_nursery() as nursery:
                for fid in [*good, missing]:
                    nursery.start_soon(get, fid)
            assert {fid: got[fid] for fid in good} == good
            assert isinstance(got[missing], FragmentNotFound)
            await client.aclose()
    finally:
        await stop_process(bucket.proc)


async def test_the_pipes_outlive_a_bucket_restart(tmp_path: Path) -> None:
    """Batched calls travel as messages on long-lived streams; when the bucket restarts,
    the next batch finds its stream dead and goes once more on a new one (no error)."""
    membership = free_port()
    bucket = await start_bucket(tmp_path / "b", membership_port=membership)
    try:
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            try:
                upload = new_upload_id()
                fid = fragment_id(upload, 0)
                await client.put_whole(fid, b"before" * 1000)
                assert [p.data for p in await client.get_whole(fid, 6000, 6000)] == [b"before" * 1000]
                assert (client.puts.calls, client.gets.calls) == (1, 1)
                bucket.proc.kill()  # its streams die with it
                await bucket.proc.wait()
                bucket = await start_bucket(tmp_path / "b", membership_port=membership, port=bucket.port)
                assert [p.data for p in await client.get_whole(fid, 6000, 6000)] == [b"before" * 1000]
                other = new_upload_id()
                await client.put_whole(fragment_id(other, 1), b"after" * 1000)
                assert await client.delete_upload(other) == 1
                assert bucket.fragment_ids() == [fid]
                assert client.pipes
                assert client.batches
                port = json.loads(bucket.data_dir.with_name("b.ready").read_text())["metrics_port"]
                samples = await scrape(port)  # the restarted bucket's: a message of each pipe
                for call in ("get_many_stream", "put_many_stream", "delete_many_stream"):
                    assert value(samples, "karma8_bucket_batch_calls_total", call=call) == 1
                assert value(samples, "karma8_bucket_batch_calls_total", call="get_many") == 0
            finally:
                await client.aclose()
    finally:
        await stop_process(bucket.proc)


#: The bucket routes each earlier release lacked.
_BEFORE_BATCHES = ("/PutMany", "/GetMany", "/PutManyStream", "/GetManyStream", "/DeleteManyStream")
_BEFORE_PIPES = ("/PutManyStream", "/GetManyStream", "/DeleteManyStream")


class _OlderBucket(BucketService):
    """A bucket of an earlier release: grpclib answers UNIMPLEMENTED to the routes it lacks."""

    missing: tuple[str, ...] = ()

    def __mapping__(self) -> dict[str, Any]:
        routes = super().__mapping__()
        return {k: v for k, v in routes.items() if not k.endswith(self.missing)}


async def _serve_older(root: Path, missing: tuple[str, ...]) -> tuple[FragmentStore, Any, int]:
    store = await open_store(root, fsync=False)
    metrics = BucketMetrics(CollectorRegistry())
    service = _OlderBucket(store, max_chunk=4 * MiB, read_chunk_max=4 * MiB, metrics=metrics)
    service.missing = missing
    server, port = await start_grpc_server([service], "127.0.0.1", 0, secret="", who="older")
    return store, server, port


async def _stop_older(server: Any) -> None:
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("missing", [_BEFORE_BATCHES, _BEFORE_PIPES], ids=["before-batches", "before-pipes"])
async def test_a_bucket_of_an_earlier_release_gets_the_calls_it_has(
    tmp_path: Path, missing: tuple[str, ...]
) -> None:
    batches = "/PutMany" not in missing
    async with open_portal() as portal:
        store, server, port = await portal.run(_serve_older, tmp_path / "older", missing)
        try:
            client = await connect_bucket(
                portal, store.bucket_id, f"127.0.0.1:{port}", close_timeout=5, security=ChannelSecurity()
            )
            try:
                upload = new_upload_id()
                data = {fragment_id(upload, p): bytes([p + 1]) * 2000 for p in range(4)}
                async with trio.open_nursery() as nursery:
                    for fid, d in data.items():
                        nursery.start_soon(client.put_whole, fid, d)
                # Told once, then PutMany calls, or a Put per fragment.
                assert not client.pipes
                assert client.batches is batches
                assert sorted(scan(tmp_path / "older" / "volumes")) == sorted(data)
                for fid, d in data.items():
                    assert b"".join(p.data for p in await client.get_whole(fid, len(d), len(d))) == d
                # No GetMany tried once the bucket said it has none.
                assert (client.gets.calls > 0) is batches
                assert await client.delete_upload(upload) == len(data)  # a Delete, not the pipe
                assert scan(tmp_path / "older" / "volumes") == {}
            finally:
                await client.aclose()
        finally:
            await portal.run(_stop_older, server)
            store.close()
