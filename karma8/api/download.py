"""Download sessions: six gRPC Get streams in, WebSocket frames out, in stripe order.

One task per part pulls its fragment into a bounded channel; the session task takes
stripe units round-robin from the parts, hashes them and sends them to the client. The
file's sha256 is checked before the final empty frame, so a client never receives the
end-of-file marker for data that does not match.
"""

from __future__ import annotations

import contextlib
import hashlib

import trio

from karma8.api.errors import first_error
from karma8.api.session import Session
from karma8.core.fragments import fragment_id
from karma8.core.layout import Layout
from karma8.core.protocol import encode_ok
from karma8.errors import BucketUnavailable, ChecksumMismatch, Conflict, NotFound
from karma8.registry import FileRow, FragmentRow
from karma8.rpc.buckets import BucketClient


class PartStream:
    """Reads exact byte counts from one part's chunk channel."""

    def __init__(self, bucket_id: str, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._bucket_id = bucket_id
        self._receive = receive
        self._buffer = b""

    async def read_exactly(self, n: int) -> bytes:
        """The next ``n`` bytes of the part."""
        if len(self._buffer) == n:  # the common case: chunks are stripe units
            out, self._buffer = self._buffer, b""
            return out
        while len(self._buffer) < n:
            try:
                chunk = await self._receive.receive()
            except trio.EndOfChannel:
                raise BucketUnavailable(self._bucket_id, "fragment ended early") from None
            if not self._buffer and len(chunk) == n:
                return chunk
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


async def handle_download(session: Session, name: str) -> None:
    """Serve ``/download/{name}``."""
    services = session.services
    with contextlib.ExitStack() as lease:
        file = await lease_current_version(session, name, lease)
        upload = file.upload
        layout = Layout(file.size, upload.parts, upload.unit)
        clients = [services.cluster.client(f.bucket_id) for f in file.fragments if f.size]
        session.log.upload_id = upload.upload_id  # every line of the session names it from now on
        session.log.info("download name=%r size=%d", name, file.size)
        await session.send(encode_ok(name=name, size=file.size, sha256=file.sha256))
        started = trio.current_time()
        try:
            digest = await _stream(session, layout, file.fragments, clients)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    if digest != file.sha256:
        raise ChecksumMismatch(f"{name!r}: data read back has sha256 {digest}, expected {file.sha256}")
    await session.send(b"")
    elapsed = max(trio.current_time() - started, 1e-9)
    session.log.info(
        "download name=%r done: %d bytes in %.2f s (%.1f MB/s)",
        name,
        file.size,
        elapsed,
        file.size / elapsed / 1e6,
    )


async def lease_current_version(session: Session, name: str, lease: contextlib.ExitStack) -> FileRow:
    """Look ``name`` up and hold a read lease on the version found.

    The lease is taken first and the file looked up again afterwards: the janitor deletes
    only copies whose upload is not leased (replaced versions, and the sources of finished
    moves), so the version and the fragment locations read under the lease stay readable
    until it is released, even if the rebalancer moves a fragment meanwhile.
    """
    registry = session.services.registry
    for _ in range(3):
        found = await registry.lookup(name)
        if found is None:
            raise NotFound(name)
        upload_id = found.upload.upload_id
        with contextlib.ExitStack() as held:
            held.enter_context(session.services.leases.hold(upload_id))
            current = await registry.lookup(name)
            if current is not None and current.upload.upload_id == upload_id:
                lease.enter_context(held.pop_all())  # the caller's stack keeps the lease
                return current
        # Replaced meanwhile: look again.
    raise Conflict(f"{name!r} is being replaced too often to download; try again")


async def _stream(
    session: Session,
    layout: Layout,
    fragments: tuple[FragmentRow, ...],
    clients: list[BucketClient],
) -> str:
    config = session.config
    hasher = hashlib.sha256()
    async with trio.open_nursery() as nursery:
        parts: dict[int, PartStream] = {}
        nonempty = [f for f in fragments if f.size]
        for fragment, client in zip(nonempty, clients, strict=True):
            send, receive = trio.open_memory_channel[bytes](config.queue_depth)
            parts[fragment.part] = PartStream(client.bucket_id, receive)
            nursery.start_soon(_get_part, session, client, fragment, layout.unit, send)
        for k in range(layout.unit_count):
            unit = await parts[layout.part_of(k)].read_exactly(layout.unit_length(k))
            hasher.update(unit)
            for i in range(0, len(unit), config.max_frame):
                frame = unit[i : i + config.max_frame]
                await session.send(frame)
                session.transferred += len(frame)
    return hasher.hexdigest()


async def _get_part(
    session: Session,
    client: BucketClient,
    fragment: FragmentRow,
    unit: int,
    send: trio.MemorySendChannel[bytes],
) -> None:
    fid = fragment_id(fragment.upload_id, fragment.part)
    if fragment.size <= session.config.stripe_unit:
        # A small fragment comes in one call (at most one unit held), then goes on as chunks.
        for piece in await session.bucket_step(client, client.get_whole(fid, fragment.size, unit)):
            await send.send(piece)
        await send.aclose()
        return
    received = 0
    async with contextlib.AsyncExitStack() as stack:
        reader = await session.open_stream(stack, client, client.open_get(fid, unit))
        while (chunk := await session.bucket_step(client, reader.receive())) is not None:
            received += len(chunk)
            if received > fragment.size:
                raise BucketUnavailable(client.bucket_id, f"{fid} is longer than recorded")
            await send.send(chunk)
    if received != fragment.size:
        raise BucketUnavailable(client.bucket_id, f"{fid}: {received} of {fragment.size} bytes")
    # Closed only on success: on failure the nursery cancels the reader instead, so the
    # error above is what the client sees, not "fragment ended early".
    await send.aclose()
