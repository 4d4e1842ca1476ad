"""Download sessions: gRPC Get streams in, WebSocket frames out, in stripe order.

karma8/api/reading.py reads the data fragments, and reads around any that fail, stall or
hand out a damaged unit by decoding from parity fragments. The file's sha256 is checked
before the final empty frame, so a client never receives the end-of-file marker for data
that does not match. A download that had to read around a fragment queues the file for
repair.
"""

from __future__ import annotations

import contextlib
import hashlib

import trio

from karma8.api.pool import Bucket
from karma8.api.reading import damaged, read_fragments
from karma8.api.session import Session
from karma8.core.layout import Layout
from karma8.core.protocol import encode_ok
from karma8.errors import (
    BucketUnavailable,
    ChecksumMismatch,
    Conflict,
    Karma8Error,
    NotFound,
)
from karma8.registry import FileRow

#: Units smaller than this are gathered into frames (see _Frames); larger ones are not copied.
GATHER_BELOW = 64 * 1024


async def handle_download(session: Session, name: str) -> None:
    """Serve ``/download/{name}``."""
    services = session.services
    with contextlib.ExitStack() as lease:
        file = await lease_current_version(session, name, lease)
        upload = file.upload
        scheme = upload.scheme
        layout = Layout(file.size, scheme.data, upload.unit, scheme.parity)
        session.log.upload_id = upload.upload_id  # every line of the session names it from now on
        session.log.info("download name=%r size=%d", name, file.size)
        await session.send(encode_ok(name=name, size=file.size, sha256=file.sha256))
        started = trio.current_time()
        hasher = hashlib.sha256()

        frames = _Frames(session)

        async def deliver(unit: bytes) -> None:
            hasher.update(unit)
            await frames.send(unit)

        failed = await read_fragments(
            deliver,
            layout,
            scheme,
            upload.upload_id,
            fragment_sources(session, file),
            session.limits,
            checked=upload.format >= 2,
        )
        await frames.flush()
    if failed:
        why = "; ".join(f"part {p}: {e.message}" for p, e in sorted(failed.items()))
        session.log.warning("download name=%r read around %d fragment(s): %s", name, len(failed), why)
        good = sum(f.state == "ok" for f in file.fragments) - len(failed)
        # Damaged or missing copies are rebuilt at once; a bucket that is down may come
        # back, and is rebuilt elsewhere only once it counts as lost (repair_after).
        await services.registry.queue_repair(
            upload.upload_id, "degraded_read", good - scheme.data, damaged(failed)
        )
        services.repairer.poke()
        services.metrics.degraded_reads.inc()
    digest = hasher.hexdigest()
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


class _Frames:
    """Sends a download's data frames: units of ``GATHER_BELOW`` and more as they are
    (split at ``max_frame``), smaller ones (a small file's) gathered into one frame of up
    to ``max_frame``, since a frame costs both ends more CPU than a small unit's bytes."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._max = session.config.max_frame
        self._gathered: list[bytes] = []
        self._size = 0

    async def send(self, unit: bytes) -> None:
        big = len(unit) >= GATHER_BELOW
        if big or self._size + len(unit) > self._max:
            await self.flush()  # in order
        if big:
            for i in range(0, len(unit), self._max):
                await self._out(unit[i : i + self._max])
        else:
            self._gathered.append(unit)
            self._size += len(unit)

    async def flush(self) -> None:
        if self._gathered:
            frame = self._gathered[0] if len(self._gathered) == 1 else b"".join(self._gathered)
            self._gathered.clear()
            self._size = 0
            await self._out(frame)

    async def _out(self, frame: bytes) -> None:
        await self._session.send(frame)
        self._session.transferred += len(frame)


def fragment_sources(session: Session, file: FileRow) -> dict[int, Bucket | Karma8Error]:
    """Each written fragment's bucket, or why it cannot be read (its bucket is not live)."""
    out: dict[int, Bucket | Karma8Error] = {}
    for f in file.fragments:
        if f.state != "ok":
            continue  # owed: never written
        try:
            out[f.part] = session.services.cluster.client(f.bucket_id)
        except BucketUnavailable as exc:
            out[f.part] = exc
    return out


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
