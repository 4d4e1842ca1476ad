"""Writing a file's fragments: data in, ``k`` data and ``m`` parity fragments out.

One nursery per file. The producer (the caller's task) reads the file's bytes, hashes
them, cuts them into stripe units, computes each unit's crc32c and, at the end of every
stripe, its parity units; each unit goes to its fragment's bounded channel, and one task
per fragment streams its channel to its bucket. A full channel blocks the producer, and
so the client (backpressure).

A fragment whose bucket fails does not stop the others while the write quorum can still
be met: its task records the failure and drains its channel from then on. Once fewer
fragments can succeed than the quorum, the failure propagates and cancels the whole
write (the caller cleans up).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from karma8.api.errors import first_error
from karma8.api.pool import Bucket, Limits
from karma8.api.streams import bucket_step, open_bucket_stream
from karma8.core.checksums import crc
from karma8.core.coding import Scheme, StripeCoder
from karma8.core.fragments import fragment_id
from karma8.core.layout import Layout, Striper
from karma8.core.records import StoredFragment
from karma8.errors import BucketUnavailable, Karma8Error, SizeMismatch

#: A unit on its way to a bucket, with its crc32c.
Unit = tuple[bytes, int]


@dataclass
class Written:
    """The outcome of :func:`write_fragments`."""

    #: sha256 of the whole file, as received.
    sha256: str = ""
    #: part -> sha256 of the fragment, for the fragments their buckets committed.
    stored: dict[int, str] = field(default_factory=dict)
    #: part -> why its fragment could not be written.
    failed: dict[int, Karma8Error] = field(default_factory=dict)


async def write_fragments(
    receive: Callable[[], Awaitable[bytes]],
    layout: Layout,
    scheme: Scheme,
    upload_id: str,
    buckets: Mapping[int, Bucket],
    quorum: int,
    limits: Limits,
) -> Written:
    """Write the file that ``receive`` yields (frame by frame, ``b""`` at the end).

    Args:
        buckets: part -> the bucket its fragment goes to. An upload places every data part
            and as many parity parts as there were buckets for; a repair, the parts it
            rebuilds.
        quorum: fragments that must be committed; fewer, and the write fails.

    Raises:
        SizeMismatch: more or fewer bytes than ``layout.size``.
        BucketUnavailable: (or another bucket error) the quorum can no longer be met.
    """
    if not all(0 <= p < scheme.width for p in buckets) or not 0 < quorum <= len(buckets):
        raise ValueError(f"parts {sorted(buckets)}, quorum {quorum} for {scheme}")
    written = Written()
    try:
        async with trio.open_nursery() as nursery:
            senders: dict[int, trio.MemorySendChannel[Unit]] = {}
            for part, bucket in sorted(buckets.items()):
                send, receive_units = trio.open_memory_channel[Unit](limits.queue_depth)
                senders[part] = send
                nursery.start_soon(
                    _part_task,
                    bucket,
                    upload_id,
                    part,
                    layout,
                    receive_units,
                    limits,
                    written,
                    quorum,
                    len(buckets),
                )
            with contextlib.ExitStack() as stack:
                for send in senders.values():
                    stack.enter_context(send)
                written.sha256 = await _produce(receive, layout, scheme, senders)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return written


async def _produce(
    receive: Callable[[], Awaitable[bytes]],
    layout: Layout,
    scheme: Scheme,
    senders: dict[int, trio.MemorySendChannel[Unit]],
) -> str:
    hasher = hashlib.sha256()
    striper = Striper(layout)
    k = scheme.data
    coder = StripeCoder(scheme) if any(p >= k for p in senders) else None
    stripe: list[bytes] = []

    async def flush_parity() -> None:
        if coder is not None and stripe:
            for j, unit in enumerate(coder.encode(stripe)):
                if k + j in senders:
                    await senders[k + j].send((unit, crc(unit)))
        stripe.clear()

    while data := await receive():
        hasher.update(data)
        try:
            units = striper.feed(data)
        except OverflowError:
            raise SizeMismatch(f"more than the announced {layout.size} bytes") from None
        for part, unit in units:
            if part in senders:
                await senders[part].send((unit, crc(unit)))
            if coder is not None:
                stripe.append(unit)
                if part == k - 1:
                    await flush_parity()
    if not striper.complete:
        raise SizeMismatch(f"got {striper.received} of the announced {layout.size} bytes")
    await flush_parity()  # the last, partial stripe
    return hasher.hexdigest()


async def _part_task(
    bucket: Bucket,
    upload_id: str,
    part: int,
    layout: Layout,
    receive: trio.MemoryReceiveChannel[Unit],
    limits: Limits,
    written: Written,
    quorum: int,
    placed: int,
) -> None:
    try:
        stored = await _put(bucket, fragment_id(upload_id, part), layout, part, receive, limits)
    except Karma8Error as exc:
        written.failed[part] = exc
        if placed - len(written.failed) < quorum:
            raise
        # The others can still make the quorum: take this fragment's units from now on
        # and drop them, so the producer never waits for a bucket that is gone.
        async for _ in receive:
            pass
        return
    written.stored[part] = stored.sha256


async def _put(
    bucket: Bucket,
    fid: str,
    layout: Layout,
    part: int,
    receive: trio.MemoryReceiveChannel[Unit],
    limits: Limits,
) -> StoredFragment:
    size = layout.part_size(part)
    if size <= limits.small:
        # A small fragment goes in one call once it is complete: at most one unit is held.
        units = [u async for u in receive]
        data = b"".join(u for u, _ in units)
        stored = await bucket_step(
            bucket, bucket.put_whole(fid, data, layout.unit, [c for _, c in units]), limits.step
        )
    else:
        async with contextlib.AsyncExitStack() as stack:
            writer = await open_bucket_stream(
                stack, bucket, bucket.open_put(fid, size, layout.unit), limits.connect
            )
            # The receive side is never closed here: if this task fails while the quorum
            # is lost, the producer blocks on the full channel and is cancelled with the
            # nursery, so the bucket's error is the one reported.
            async for unit, unit_crc in receive:
                await bucket_step(bucket, writer.send(unit, [unit_crc]), limits.step)
            stored = await bucket_step(bucket, writer.finish(), limits.step)
    if stored.size != size:
        raise BucketUnavailable(bucket.bucket_id, f"stored {stored.size} of {size} bytes")
    return stored
