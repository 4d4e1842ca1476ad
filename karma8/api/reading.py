"""Reading a file's fragments: its data fragments while they serve, any ``k`` of ``k+m`` when not.

One nursery per read. Each fragment being read has a source: a task that streams it from
its bucket into a bounded channel, checking every unit's crc32c (format 2), and that
records its failure instead of raising it, so one bucket's trouble never cancels the
others. The reader (the caller's task) takes stripe after stripe: one unit from each data
fragment, no decoding. When a data fragment fails, stalls past ``limits.stripe``, or a
unit fails its checksum, the reader starts parity fragments at that stripe and decodes
every stripe from then on. The caller hears which fragments were read around, to queue
their repair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping

import trio

from karma8.api.errors import first_error
from karma8.api.pool import Bucket, Limits
from karma8.api.streams import bucket_step, open_bucket_stream
from karma8.core.checksums import crc
from karma8.core.coding import Scheme, StripeCoder
from karma8.core.fragments import fragment_id
from karma8.core.layout import Layout
from karma8.core.records import Piece
from karma8.errors import BucketUnavailable, ChecksumMismatch, FragmentNotFound, Karma8Error, Unreadable


def damaged(failed: Mapping[int, Karma8Error]) -> set[int]:
    """The parts among ``failed`` whose copy is damaged or gone (to rebuild at once), as
    opposed to out of reach (their bucket may come back; see ``repair_after``)."""
    return {p for p, e in failed.items() if isinstance(e, (ChecksumMismatch, FragmentNotFound))}


class _Source:
    """One fragment, streamed unit by unit from stripe ``first`` on."""

    def __init__(self, bucket: Bucket, part: int, first: int, depth: int) -> None:
        self.bucket = bucket
        self.part = part
        self.next = first
        self.delivered = 0
        self.error: Karma8Error | None = None
        self._send, self._receive = trio.open_memory_channel[bytes](depth)
        self._scope = trio.CancelScope()

    async def run(self, upload_id: str, layout: Layout, limits: Limits, checked: bool) -> None:
        bucket = self.bucket
        fid = fragment_id(upload_id, self.part)
        unit = layout.unit
        remaining = layout.part_size(self.part) - self.next * unit
        received = 0

        async def deliver(piece: Piece) -> None:
            nonlocal received
            received += len(piece.data)
            if received > remaining:
                raise BucketUnavailable(bucket.bucket_id, f"{fid} is longer than recorded")
            units = [piece.data[i : i + unit] for i in range(0, len(piece.data), unit)]
            if checked and (
                len(piece.crcs) != len(units)
                or any(crc(u) != c for u, c in zip(units, piece.crcs, strict=True))
            ):
                raise ChecksumMismatch(f"bucket {bucket.bucket_id}: a unit of {fid} arrived damaged")
            for u in units:
                await self._send.send(u)

        try:
            with self._scope:
                if remaining <= limits.small:
                    pieces = await bucket_step(
                        bucket, bucket.get_whole(fid, remaining, unit, self.next), limits.step
                    )
                    for whole in pieces:
                        await deliver(whole)
                else:
                    async with contextlib.AsyncExitStack() as stack:
                        reader = await open_bucket_stream(
                            stack, bucket, bucket.open_get(fid, unit, self.next), limits.connect
                        )
                        while (piece := await bucket_step(bucket, reader.receive(), limits.step)) is not None:
                            await deliver(piece)
                if received != remaining:
                    raise BucketUnavailable(bucket.bucket_id, f"{fid}: {received} of {remaining} bytes")
        except Karma8Error as exc:
            self.error = exc
        finally:
            self._send.close()

    async def unit(self) -> bytes | None:
        """The unit of stripe ``self.next``; None once the fragment failed (see ``error``)."""
        try:
            data = await self._receive.receive()
        except trio.EndOfChannel:
            if self.error is None:
                self.error = BucketUnavailable(self.bucket.bucket_id, f"part {self.part} ended early")
            return None
        self.next += 1
        self.delivered += 1
        return data

    def stalled(self, seconds: float) -> None:
        """Give the fragment up: it delivered nothing for ``seconds``."""
        self.error = BucketUnavailable(self.bucket.bucket_id, f"part {self.part} stalled for {seconds:g} s")
        self._scope.cancel()


async def read_fragments(
    deliver: Callable[[bytes], Awaitable[None]],
    layout: Layout,
    scheme: Scheme,
    upload_id: str,
    buckets: Mapping[int, Bucket | Karma8Error],
    limits: Limits,
    checked: bool,
    failed: dict[int, Karma8Error] | None = None,
) -> dict[int, Karma8Error]:
    """Pass the file's data units, in order, to ``deliver``.

    Args:
        buckets: the bucket of each fragment that was written, or why it cannot be read
            (its bucket is not live); fragments never written (owed) are left out.
        checked: the fragments carry a crc32c per unit (format 2).
        failed: where to record the fragments read around as they fail (also when the read
            then fails as a whole); a new dict by default.

    Returns:
        The written fragments read around (part -> why): the file needs repair if any.

    Raises:
        Unreadable: fewer than ``k`` fragments of a stripe could be read. When a single
            fragment failed (the others were never written), its own error instead.
    """
    try:
        async with trio.open_nursery() as nursery:
            reader = _Reader(nursery, layout, scheme, upload_id, buckets, limits, checked, failed)
            await reader.run(deliver)
            nursery.cancel_scope.cancel()  # parity read ahead past the end, if any
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return reader.failed


class _Reader:
    def __init__(
        self,
        nursery: trio.Nursery,
        layout: Layout,
        scheme: Scheme,
        upload_id: str,
        buckets: Mapping[int, Bucket | Karma8Error],
        limits: Limits,
        checked: bool,
        failed: dict[int, Karma8Error] | None,
    ) -> None:
        self._nursery = nursery
        self._layout = layout
        self._scheme = scheme
        self._upload_id = upload_id
        self._buckets = buckets
        self._limits = limits
        self._checked = checked
        self._sources: dict[int, _Source] = {}
        self._next_parity = scheme.data
        self.failed: dict[int, Karma8Error] = failed if failed is not None else {}
        #: Parts never written (owed to repair).
        self.absent: list[int] = []

    def _start(self, part: int, stripe: int) -> None:
        bucket = self._buckets.get(part)
        if bucket is None:
            self.absent.append(part)
            return
        if isinstance(bucket, Karma8Error):
            self.failed[part] = bucket
            return
        source = self._sources[part] = _Source(bucket, part, stripe, self._limits.queue_depth)
        self._nursery.start_soon(source.run, self._upload_id, self._layout, self._limits, self._checked)

    async def _take(self, part: int, got: dict[int, bytes]) -> None:
        source = self._sources[part]
        # A fragment's first unit may also wait for its stream to open.
        seconds = self._limits.stripe + (0.0 if source.delivered else self._limits.connect)
        data = None
        with trio.move_on_after(seconds) as scope:
            data = await source.unit()
        if scope.cancelled_caught:
            source.stalled(seconds)
        if data is None:
            assert source.error is not None
            self.failed[part] = source.error
            del self._sources[part]
        else:
            got[part] = data

    async def run(self, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        layout, k = self._layout, self._scheme.data
        coder = StripeCoder(self._scheme) if self._scheme.parity else None
        for part in range(k):
            if layout.part_size(part):
                self._start(part, 0)
        for s in range(layout.stripe_count):
            lengths = layout.stripe_lengths(s)
            got: dict[int, bytes] = {}
            for part in range(k):
                if not lengths[part]:
                    got[part] = b""  # past the end of the file: zeros, known without reading
                elif part in self._sources:
                    await self._take(part, got)
            if len(got) < k:
                await self._parity(s, got)
                assert coder is not None
                units = coder.decode(got, lengths)
            else:
                units = [got[p] for p in range(k)]
            for part, unit in enumerate(units):
                if lengths[part]:
                    await deliver(unit)

    async def _parity(self, stripe: int, got: dict[int, bytes]) -> None:
        """Add parity units of ``stripe`` to ``got`` until it has ``k`` units."""
        scheme = self._scheme
        for part in sorted(p for p in self._sources if p >= scheme.data):
            await self._take(part, got)
        while len(got) < scheme.data and self._next_parity < scheme.width:
            part, self._next_parity = self._next_parity, self._next_parity + 1
            self._start(part, stripe)
            if part in self._sources:
                await self._take(part, got)
        if len(got) < scheme.data:
            if len(self.failed) == 1:
                raise next(iter(self.failed.values()))
            why = "; ".join(f"part {p}: {e.message}" for p, e in sorted(self.failed.items()))
            if self.absent:
                why += f"; never written: part(s) {', '.join(map(str, self.absent))}"
            raise Unreadable(
                f"only {len(got)} of the {scheme.data} fragments needed for stripe {stripe}"
                f" are readable ({why})"
            )
