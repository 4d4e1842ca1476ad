"""Upload sessions: WebSocket frames in, six gRPC Put streams out.

One nursery per upload owns the bucket streams. The session task reads frames, hashes
them, cuts them into stripe units and hands each unit to its part's bounded channel; one
task per part streams its channel to its bucket. Any failure (client gone, garbage, a
bucket down) cancels the nursery, and the shielded cleanup with its deadline deletes what
was stored and marks the upload failed; what it cannot delete stays pending for the
janitor. The previous version of the name is untouched until the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import trio

from karma8.api.errors import first_error
from karma8.api.metrics import CLEANUP
from karma8.api.session import Session
from karma8.core.fragments import fragment_id, new_upload_id
from karma8.core.layout import Layout, Striper
from karma8.core.protocol import encode_ok, parse_upload_header
from karma8.core.records import StoredFragment
from karma8.errors import (
    BadRequest,
    BucketUnavailable,
    ChecksumMismatch,
    Conflict,
    SizeMismatch,
)
from karma8.registry import UploadRow
from karma8.rpc.buckets import BucketClient


async def handle_upload(session: Session, name: str) -> None:
    """Serve ``/upload/{name}``."""
    services = session.services
    config = session.config
    message = await session.receive()
    if isinstance(message, bytes):
        raise BadRequest('an upload starts with a text frame holding {"size": N}')
    header = parse_upload_header(message, config.max_file_size)
    if name in services.uploading:
        raise Conflict(f"an upload of {name!r} is already in progress")
    services.uploading.add(name)
    try:
        upload_id = new_upload_id()
        layout = Layout.for_size(header.size, config.parts, config.stripe_unit)
        bucket_ids = await services.registry.place_upload(
            UploadRow(
                upload_id, name, header.size, config.parts, layout.unit, "in_progress", created=time.time()
            ),
            [layout.part_size(p) for p in range(config.parts)],
            services.cluster.live(),
        )
        log = session.log
        log.upload_id = upload_id  # every line of the session names it from now on
        log.info("name=%r size=%d to %s", name, header.size, ",".join(bucket_ids))
        started = trio.current_time()
        try:
            # Inside the try: a bucket that stopped being live since placement fails the
            # upload through the cleanup below, like any other failure.
            clients = [services.cluster.client(b) for b in bucket_ids]
            digest, checksums = await _transfer(session, upload_id, layout, clients)
            if header.sha256 is not None and header.sha256 != digest:
                raise ChecksumMismatch(f"data has sha256 {digest}, client announced {header.sha256}")
            replaced = await services.registry.commit_upload(upload_id, digest, checksums)
        except BaseException as exc:
            log.warning("name=%r failed (%s); cleaning up", name, type(exc).__name__)
            clean = False
            with trio.move_on_after(config.cleanup_timeout, shield=True) as scope:
                await services.registry.fail_upload(upload_id)
                clean = await services.janitor.delete(upload_id, bucket_ids, reason=CLEANUP)
                log.info("cleanup %s", "done" if clean else "incomplete, left to the janitor")
            if scope.cancelled_caught:
                log.warning("cleanup timed out; left to the janitor")
            services.metrics.upload_cleanups.labels("done" if clean else "left_to_janitor").inc()
            raise
    finally:
        services.uploading.discard(name)
    elapsed = max(trio.current_time() - started, 1e-9)
    log.info(
        "name=%r committed: %d bytes in %.2f s (%.1f MB/s)",
        name,
        header.size,
        elapsed,
        header.size / elapsed / 1e6,
    )
    if replaced is not None:
        services.janitor.poke()
    await session.send(encode_ok(name=name, size=header.size, sha256=digest))


async def _transfer(
    session: Session, upload_id: str, layout: Layout, clients: list[BucketClient]
) -> tuple[str, dict[int, str]]:
    """Stream the client's data to the buckets; return (sha256, part checksums)."""
    checksums: dict[int, str] = {}
    try:
        async with trio.open_nursery() as nursery:
            senders: list[trio.MemorySendChannel[bytes]] = []
            for part, client in enumerate(clients):
                send, receive = trio.open_memory_channel[bytes](session.config.queue_depth)
                senders.append(send)
                nursery.start_soon(
                    _put_part, session, client, upload_id, part, layout.part_size(part), receive, checksums
                )
            with contextlib.ExitStack() as stack:
                for send in senders:
                    stack.enter_context(send)
                digest = await _receive_file(session, layout, senders)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return digest, checksums


async def _receive_file(
    session: Session, layout: Layout, senders: list[trio.MemorySendChannel[bytes]]
) -> str:
    hasher = hashlib.sha256()
    striper = Striper(layout)
    while True:
        data = await session.receive_data()
        if not data:
            break
        session.transferred += len(data)
        hasher.update(data)
        try:
            units = striper.feed(data)
        except OverflowError:
            raise SizeMismatch(f"more than the announced {layout.size} bytes") from None
        for part, unit in units:
            await senders[part].send(unit)
    if not striper.complete:
        raise SizeMismatch(f"got {striper.received} of the announced {layout.size} bytes")
    return hasher.hexdigest()


async def _put_part(
    session: Session,
    client: BucketClient,
    upload_id: str,
    part: int,
    size: int,
    receive: trio.MemoryReceiveChannel[bytes],
    checksums: dict[int, str],
) -> None:
    fid = fragment_id(upload_id, part)
    if size <= session.config.stripe_unit:
        # A small fragment goes in one call once it is complete: at most one unit is held.
        data = b"".join([unit async for unit in receive])
        stored = await session.bucket_step(client, client.put_whole(fid, data))
    else:
        stored = await _stream_part(session, client, fid, size, receive)
    if stored.size != size:
        raise BucketUnavailable(client.bucket_id, f"stored {stored.size} of {size} bytes")
    checksums[part] = stored.sha256


async def _stream_part(
    session: Session, client: BucketClient, fid: str, size: int, receive: trio.MemoryReceiveChannel[bytes]
) -> StoredFragment:
    async with contextlib.AsyncExitStack() as stack:
        writer = await session.open_stream(stack, client, client.open_put(fid, size))
        # The receive side is never closed here: if this task fails, the session task
        # blocks on the full channel and is cancelled with the nursery, so the bucket's
        # error is the one reported, not a BrokenResourceError on the other side.
        async for unit in receive:
            await session.bucket_step(client, writer.send(unit))
        return await session.bucket_step(client, writer.finish())
