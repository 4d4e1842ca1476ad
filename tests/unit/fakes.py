"""In-memory buckets for the transfer logic's unit tests (karma8/api/pool.py's seam).

A :class:`FakeBucket` keeps fragments as the real store does in format 2 (data and a
crc32c per unit, checked on arrival) and fails on demand: down, failing after some units,
stalling, or handing out a unit damaged on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import trio

from karma8.core.checksums import first_bad_unit, unit_crcs
from karma8.core.records import Piece, StoredFragment
from karma8.errors import BucketUnavailable, ChecksumMismatch, FragmentNotFound, Karma8Error


@dataclass
class Stored:
    data: bytes
    unit: int
    crcs: list[int]


@dataclass
class FakeBucket:
    bucket_id: str
    fragments: dict[str, Stored] = field(default_factory=dict)
    #: Every call fails.
    down: bool = False
    #: Streams fail after this many units (reads and writes).
    fail_after: int | None = None
    #: Reads wait forever before this unit.
    stall_at: int | None = None
    #: Reads hand out this unit with one bit flipped (its stored crc32c unchanged).
    damage_at: int | None = None
    gets: int = 0
    puts: int = 0

    def _check(self) -> None:
        if self.down:
            raise BucketUnavailable(self.bucket_id, "down")

    def _store(self, fid: str, data: bytes, unit: int, crcs: Sequence[int]) -> StoredFragment:
        if first_bad_unit(data, unit, crcs) is not None:
            raise ChecksumMismatch(f"bucket {self.bucket_id}: {fid} arrived damaged")
        self.fragments[fid] = Stored(data, unit, list(crcs))
        return StoredFragment(fid, len(data), hashlib.sha256(data).hexdigest())

    @contextlib.asynccontextmanager
    async def open_put(self, fragment_id: str, size: int, unit: int = 0) -> AsyncIterator[_Put]:
        self._check()
        self.puts += 1
        await trio.lowlevel.checkpoint()
        yield _Put(self, fragment_id, unit)

    async def put_whole(
        self, fragment_id: str, data: bytes, unit: int = 0, crcs: Sequence[int] = ()
    ) -> StoredFragment:
        self._check()
        self.puts += 1
        await trio.lowlevel.checkpoint()
        if self.fail_after is not None and len(crcs) > self.fail_after:
            raise BucketUnavailable(self.bucket_id, "failed mid-put")
        return self._store(fragment_id, data, unit, crcs)

    def _pieces(self, fragment_id: str, first_unit: int) -> list[Piece]:
        self._check()
        self.gets += 1
        try:
            stored = self.fragments[fragment_id]
        except KeyError:
            raise FragmentNotFound(self.bucket_id, f"NOT_FOUND: no fragment {fragment_id}") from None
        u = stored.unit
        out = []
        for i in range(first_unit, len(stored.crcs)):
            data = stored.data[i * u : (i + 1) * u]
            if i == self.damage_at:
                data = bytes([data[0] ^ 1]) + data[1:]
            out.append(Piece(data, [stored.crcs[i]]))
        return out

    async def _gate(self, index: int) -> None:
        await trio.lowlevel.checkpoint()
        if index == self.stall_at:
            await trio.sleep_forever()
        if self.fail_after is not None and index >= self.fail_after:
            raise BucketUnavailable(self.bucket_id, "failed mid-get")

    @contextlib.asynccontextmanager
    async def open_get(self, fragment_id: str, chunk_size: int, first_unit: int = 0) -> AsyncIterator[_Get]:
        pieces = self._pieces(fragment_id, first_unit)
        await trio.lowlevel.checkpoint()
        yield _Get(self, pieces, first_unit)

    async def get_whole(
        self, fragment_id: str, size: int, chunk_size: int, first_unit: int = 0
    ) -> list[Piece]:
        pieces = self._pieces(fragment_id, first_unit)
        for i in range(len(pieces)):
            await self._gate(first_unit + i)
        return pieces


class _Put:
    def __init__(self, bucket: FakeBucket, fid: str, unit: int) -> None:
        self._bucket = bucket
        self._fid = fid
        self._unit = unit
        self._data = bytearray()
        self._crcs: list[int] = []

    async def send(self, data: bytes, crcs: Sequence[int] = ()) -> None:
        await trio.lowlevel.checkpoint()
        self._bucket._check()
        if self._bucket.fail_after is not None and len(self._crcs) >= self._bucket.fail_after:
            raise BucketUnavailable(self._bucket.bucket_id, "failed mid-put")
        self._data += data
        self._crcs += crcs

    async def finish(self) -> StoredFragment:
        await trio.lowlevel.checkpoint()
        self._bucket._check()
        return self._bucket._store(self._fid, bytes(self._data), self._unit, self._crcs)


class _Get:
    def __init__(self, bucket: FakeBucket, pieces: list[Piece], first: int) -> None:
        self._bucket = bucket
        self._pieces = pieces
        self._index = first
        self._next = 0

    async def receive(self) -> Piece | None:
        if self._next == len(self._pieces):
            await trio.lowlevel.checkpoint()
            return None
        await self._bucket._gate(self._index)
        piece = self._pieces[self._next]
        self._next += 1
        self._index += 1
        return piece


def fleet(n: int) -> list[FakeBucket]:
    """``n`` healthy fake buckets."""
    return [FakeBucket(f"b{i}") for i in range(n)]


def usable(buckets: Sequence[FakeBucket]) -> dict[int, FakeBucket | Karma8Error]:
    """Part -> bucket, as the download handler maps them (fragment ``i`` on bucket ``i``)."""
    return dict(enumerate(buckets))


def crcs_of(data: bytes, unit: int) -> list[int]:
    return unit_crcs(data, unit)
