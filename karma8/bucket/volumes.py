"""Small fragments in append-only volume files, written with group commit.

A fragment that arrives whole (a Put in one message: every fragment up to a stripe unit)
becomes a *needle* appended to the bucket's active volume, ``volumes/v<8 digits>.dat``,
instead of a file of its own. Haystack and SeaweedFS are the models: a needle describes
itself, so the volumes are the only state and the in-memory index is rebuilt from them at
every start.

Needles are laid out by karma8/core/needles.py. A delete is a needle too (a tombstone, no
data): volumes are never written in place.

**Group commit.** Puts and deletes queue; whoever finds no write under way writes the whole
queue (up to ``BATCH_ITEMS`` needles, ``BATCH_BYTES``) with one ``writev`` and one
``fdatasync``, then answers every one of them, and the next waiter does the same with what
queued meanwhile. Nothing is acknowledged before its needle is on disk; many fragments share
one flush (one fdatasync for up to 128 fragments instead of two fsyncs each).

**Order.** Needles take effect in the order of volume numbers, then of offsets: the last
needle of a fragment id wins. A start replays every volume in that order. Only the newest
volume is written; it is sealed at ``volume_size`` and the next one started.

**Torn tails.** A crash can leave the last batch half written. At start, the newest
volume is truncated at the first needle whose header is unsound or which runs past the
end of the file: it and everything after it belong to that last batch, which nobody was
told was stored (a batch is answered only after its fdatasync, and the next one is
written only then). A needle whose header is sound but whose data is not stays indexed:
it may be a torn write of that batch, or bit rot in an acknowledged needle, and the two
cannot be told apart; reads report it damaged, so the API reads around it and repairs
it (or reconciliation removes it, if the registry never heard of it). Truncating it
would lose acknowledged needles after it to one flipped bit.

**Compaction.** A sealed volume whose dead needles (overwritten or deleted) reach
``garbage`` of its bytes is rewritten with only its live needles into
``v<n>.dat.compact``, fsynced, and renamed over ``v<n>.dat`` (one atomic rename: a crash
leaves the old or the new volume, never a mix; a leftover ``.compact`` is removed at
start). The rewritten volume keeps its number, so the order above still holds. Tombstones
are kept, except in the oldest volume, where there is nothing older left for them to
shadow. A volume left empty is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.to_thread

from karma8.bucket.errors import FragmentCorrupt, FragmentMissing
from karma8.core.checksums import first_bad_unit
from karma8.core.needles import (
    DELETE,
    HEADER_SIZE,
    PUT,
    Header,
    decode_header,
    encode_delete,
    encode_put,
    needle_size,
    split_body,
    volume_name,
    volume_number,
)
from karma8.core.records import Piece, StoredFragment

log = logging.getLogger(__name__)

#: A batch: at most this many needles ...
BATCH_ITEMS = 128
#: ... and this many bytes (one needle bigger than this goes alone).
BATCH_BYTES = 4 * 1024 * 1024
#: A descriptor replaced by compaction is closed after this long (reads under way end).
RETIRE_AFTER = 60.0


class Location(NamedTuple):
    """Where a fragment's needle is, and what its header says."""

    volume: int
    offset: int
    size: int
    unit: int
    appended: float


def check_body(header: Header, body: bytes) -> tuple[bytes, list[int]]:
    """The data and unit checksums of a put needle's ``body`` (the bytes after its header).

    Raises:
        FragmentCorrupt: short, or the data does not match its checksums.
    """
    fid = header.fragment_id
    split = split_body(header, body)
    if split is None:
        raise FragmentCorrupt(f"{fid}: truncated")
    data, crcs = split
    if header.unit:
        bad = first_bad_unit(data, header.unit, crcs)
        if bad is not None:
            raise FragmentCorrupt(f"{fid}: unit {bad} fails its checksum")
    elif hashlib.sha256(data).digest() != header.sha256:
        raise FragmentCorrupt(f"{fid}: checksum mismatch")
    return data, crcs


@dataclass(eq=False)
class _Item:
    kind: int
    fragment_id: str
    buffers: list[bytes]
    size: int
    unit: int
    appended: float
    done: bool = False
    error: BaseException | None = None
    #: A delete: the location it removed from the index (None: there was none).
    removed: Location | None = None

    @property
    def length(self) -> int:
        return sum(len(b) for b in self.buffers)


@dataclass
class _Volume:
    end: int = 0
    #: Bytes of the needles the index points at (live puts).
    live: int = 0


@dataclass
class VolumeStats:
    """Counters since the store opened (for metrics and tests)."""

    compactions: int = 0
    reclaimed: int = 0
    truncated: int = 0
    batches: int = 0
    needles: int = 0


class Volumes:
    """The volumes of one bucket (``root``: its ``volumes/`` directory). Open with :meth:`open`."""

    def __init__(self, root: Path, *, fsync: bool, volume_size: int) -> None:
        self.root = root
        self.fsync = fsync
        self.volume_size = volume_size
        self._lock = threading.Lock()
        #: shard (first 2 hex digits) -> fragment id -> location.
        self._index: dict[str, dict[str, Location]] = {}
        self._volumes: dict[int, _Volume] = {}
        self._readers: dict[int, int] = {}
        self._retired: list[tuple[float, int]] = []
        self._active = 0
        self._writer = -1
        self.used = 0
        self.count = 0
        self.stats = VolumeStats()
        self._queue: deque[_Item] = deque()
        self._writing = False
        self._round = anyio.Event()

    # -- start -------------------------------------------------------------------------

    def open(self) -> None:
        """Replay every volume into the index (synchronous: run it in a worker thread)."""
        self.root.mkdir(parents=True, exist_ok=True)
        numbers = []
        for path in self.root.iterdir():
            if path.name.endswith(".compact"):
                path.unlink()  # a compaction that did not switch: the volume is whole
                continue
            number = volume_number(path.name)
            if number is not None:
                numbers.append(number)
        numbers.sort()
        for i, number in enumerate(numbers):
            self._replay(number, last=i == len(numbers) - 1)
        if not numbers or self._volumes[numbers[-1]].end >= self.volume_size:
            self._start_volume((numbers[-1] if numbers else 0) + 1)
        else:
            self._active = numbers[-1]
            self._writer = os.open(self._path(self._active), os.O_WRONLY)

    def _path(self, number: int) -> Path:
        return self.root / volume_name(number)

    def _replay(self, number: int, *, last: bool) -> None:
        path = self._path(number)
        volume = self._volumes[number] = _Volume()
        with path.open("rb", buffering=1 << 20) as f:
            total = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < total:
                f.seek(offset)
                header = decode_header(f.read(HEADER_SIZE))
                if header is None or offset + header.length > total:
                    if last:
                        log.warning(
                            "volume %s: torn tail at offset %d (%d bytes never acknowledged), truncated",
                            path.name,
                            offset,
                            total - offset,
                        )
                        self.stats.truncated += total - offset
                        with path.open("r+b") as w:
                            w.truncate(offset)
                            os.fsync(w.fileno())
                    else:
                        log.error(
                            "volume %s: unreadable needle at offset %d; the %d bytes after it not indexed",
                            path.name,
                            offset,
                            total - offset,
                        )
                    break
                self._apply(header, number, offset)
                offset += header.length
            volume.end = offset

    def _apply(self, header: Header, number: int, offset: int) -> Location | None:
        """Make one needle take effect (under the lock, or before anyone else sees the index)."""
        fid = header.fragment_id
        shard = self._index.setdefault(fid[:2], {})
        old = shard.pop(fid, None)
        if old is not None:
            self._volumes[old.volume].live -= needle_size(old.size, old.unit)
            self.used -= old.size
            self.count -= 1
        if header.kind == PUT:
            shard[fid] = Location(number, offset, header.size, header.unit, header.appended)
            self._volumes[number].live += header.length
            self.used += header.size
            self.count += 1
        elif not shard:
            del self._index[fid[:2]]
        return old

    def _start_volume(self, number: int) -> None:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if self.fsync:
            os.fsync(fd)
            fsync_dir(self.root)
        if self._writer >= 0:
            os.close(self._writer)
        self._writer, self._active = fd, number
        self._volumes[number] = _Volume()

    def close(self) -> None:
        with self._lock:
            fds = [self._writer, *self._readers.values(), *(fd for _, fd in self._retired)]
            self._writer, self._readers, self._retired = -1, {}, []
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- writing -----------------------------------------------------------------------

    async def put(
        self, fragment_id: str, data: bytes, unit: int, crcs: Sequence[int], sha256: bytes
    ) -> float:
        """Append a fragment (its checksums already checked); returns once it is on disk."""
        now = time.time()
        buffers = encode_put(fragment_id, data, unit, crcs, sha256, now)
        item = _Item(PUT, fragment_id, buffers, len(data), unit, now)
        await self._submit(item)
        return now

    async def delete(self, fragment_ids: Iterable[str]) -> list[tuple[str, int]]:
        """Delete those of ``fragment_ids`` the volumes hold; returns (id, size) of each deleted."""
        held = [fid for fid in fragment_ids if self.locate(fid) is not None]
        if not held:
            return []
        now = time.time()
        items = [_Item(DELETE, fid, encode_delete(fid, now), 0, 0, now) for fid in held]
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(self._submit, item)
        return [(i.fragment_id, i.removed.size) for i in items if i.removed is not None]

    async def _submit(self, item: _Item) -> None:
        self._queue.append(item)
        try:
            while not item.done:
                if self._writing:
                    await self._round.wait()
                    continue
                self._writing = True
                self._round = anyio.Event()
                batch = self._take()
                try:
                    await anyio.to_thread.run_sync(self._write_batch, batch)
                finally:
                    self._writing = False
                    self._round.set()
        finally:
            if not item.done:  # cancelled before it was taken: it is never written
                with contextlib.suppress(ValueError):
                    self._queue.remove(item)
        if item.error is not None:
            raise item.error

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        total = 0
        while self._queue and len(batch) < BATCH_ITEMS:
            length = self._queue[0].length
            if batch and total + length > BATCH_BYTES:
                break
            batch.append(self._queue.popleft())
            total += length
        return batch

    def _write_batch(self, batch: list[_Item]) -> None:
        volume = self._volumes[self._active]
        start = volume.end
        buffers = [b for item in batch for b in item.buffers]
        try:
            written = os.pwritev(self._writer, buffers, start)
            total = sum(len(b) for b in buffers)
            if written != total:  # short write: the rest one by one
                blob = b"".join(buffers)
                while written < total:
                    written += os.pwrite(self._writer, blob[written:], start + written)
            if self.fsync:
                os.fdatasync(self._writer)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._writer, start)
            for item in batch:
                item.error, item.done = exc, True
            return
        offset = start
        with self._lock:
            for item in batch:
                header = Header(item.kind, item.fragment_id, item.appended, item.size, item.unit, b"")
                item.removed = self._apply(header, self._active, offset)
                offset += item.length
                item.done = True
            volume.end = offset
            self.stats.batches += 1
            self.stats.needles += len(batch)
        if volume.end >= self.volume_size:
            try:
                self._start_volume(self._active + 1)
            except OSError as exc:  # the next batch goes on in this volume and tries again
                log.error("volume %s: cannot start the next volume: %s", volume_name(self._active + 1), exc)

    # -- reading -----------------------------------------------------------------------

    def locate(self, fragment_id: str) -> Location | None:
        with self._lock:
            return self._index.get(fragment_id[:2], {}).get(fragment_id)

    def _reader(self, number: int) -> int:
        """A read descriptor of volume ``number`` (under the lock)."""
        fd = self._readers.get(number)
        if fd is None:
            fd = self._readers[number] = os.open(self._path(number), os.O_RDONLY)
        return fd

    def _pread(self, fragment_id: str, whole: bool, cached: bool = False) -> tuple[Header, bytes, Location]:
        with self._lock:
            loc = self._index.get(fragment_id[:2], {}).get(fragment_id)
            if loc is None:
                raise FragmentMissing(f"no fragment {fragment_id}")
            # The location and the descriptor are taken together: compaction swaps both
            # at once, and keeps a replaced descriptor open a while (RETIRE_AFTER).
            fd = self._reader(loc.volume)
        size = needle_size(loc.size, loc.unit) if whole else HEADER_SIZE
        if cached:
            buf = bytearray(size)
            if os.preadv(fd, [buf], loc.offset, os.RWF_NOWAIT) != size:
                raise BlockingIOError("the needle is only partly in the page cache")
            raw = bytes(buf)
        else:
            raw = os.pread(fd, size, loc.offset)
        header = decode_header(raw)
        if header is None or header.fragment_id != fragment_id or header.kind != PUT:
            raise FragmentCorrupt(f"{fragment_id}: bad needle header")
        return header, raw[HEADER_SIZE:], loc

    def read(self, fragment_id: str, *, cached: bool = False) -> tuple[Piece, Header]:
        """The whole fragment, checked, and its needle's header (synchronous).

        With ``cached``, only from the page cache (``RWF_NOWAIT``): fast enough for the
        event loop, where a thread hand-off would cost more than the read.

        Raises:
            FragmentMissing: not in the volumes.
            FragmentCorrupt: the needle fails its checksums.
            BlockingIOError: ``cached``, and the needle is not (all) in the page cache.
        """
        header, body, _ = self._pread(fragment_id, whole=True, cached=cached)
        data, crcs = check_body(header, body)
        return Piece(data, crcs), header

    def describe(self, fragment_ids: Sequence[str], now: float) -> list[StoredFragment]:
        """Size, sha256 and age of each of ``fragment_ids`` still held (synchronous)."""
        out = []
        for fid in fragment_ids:
            loc = self.locate(fid)
            if loc is None:
                continue
            try:
                digest = self._pread(fid, whole=False)[0].sha256.hex()
            except FragmentMissing:  # deleted meanwhile
                continue
            except FragmentCorrupt:  # listed as a damaged footer is: no checksum
                digest = ""
            out.append(StoredFragment(fid, loc.size, digest, max(0.0, now - loc.appended)))
        return out

    def ids(self, shard: str) -> list[str]:
        """The fragment ids held in one shard (first 2 hex digits), sorted."""
        with self._lock:
            return sorted(self._index.get(shard, ()))

    def shards(self) -> list[str]:
        with self._lock:
            return sorted(self._index)

    def of_upload(self, upload_id: str) -> list[str]:
        """The fragment ids of one upload held (all of them for ``""``), sorted."""
        with self._lock:
            if not upload_id:
                return sorted(fid for shard in self._index.values() for fid in shard)
            shard = self._index.get(upload_id[:2], {})
            return sorted(fid for fid in shard if fid.startswith(upload_id + "."))

    # -- compaction --------------------------------------------------------------------

    def garbage(self) -> dict[int, float]:
        """Sealed volumes and the share of their bytes that is dead."""
        with self._lock:
            return {
                n: 1.0 - v.live / v.end if v.end else 1.0
                for n, v in self._volumes.items()
                if n != self._active
            }

    def compact(self, number: int) -> int:
        """Rewrite sealed volume ``number`` with its live needles (synchronous); returns the
        bytes reclaimed."""
        with self._lock:
            if number == self._active or number not in self._volumes:
                return 0
            oldest = number == min(self._volumes)
        path = self._path(number)
        tmp = path.with_name(path.name + ".compact")
        moved: list[tuple[str, int, int]] = []  # fragment id, old offset, new offset
        with path.open("rb", buffering=1 << 20) as src, tmp.open("wb") as dst:
            end = self._volumes[number].end
            offset = out = tombstones = 0
            while offset < end:
                src.seek(offset)
                raw = src.read(HEADER_SIZE)
                header = decode_header(raw)
                if header is None:
                    break  # never indexed past here either
                keep = header.kind == DELETE and not oldest
                if header.kind == PUT:
                    loc = self.locate(header.fragment_id)
                    keep = loc is not None and (loc.volume, loc.offset) == (number, offset)
                if keep:
                    dst.write(raw + src.read(header.length - HEADER_SIZE))
                    if header.kind == PUT:
                        moved.append((header.fragment_id, offset, out))
                    else:
                        tombstones += header.length
                    out += header.length
                offset += header.length
            dst.flush()
            os.fsync(dst.fileno())
        reader = os.open(tmp, os.O_RDONLY)
        with self._lock:
            volume = self._volumes[number]
            live = 0
            for fid, old, new in moved:
                shard = self._index.get(fid[:2], {})
                loc = shard.get(fid)
                if loc is not None and (loc.volume, loc.offset) == (number, old):
                    shard[fid] = loc._replace(offset=new)
                    live += needle_size(loc.size, loc.unit)
            reclaimed = volume.end - out
            old_fd = self._readers.pop(number, None)
            if old_fd is not None:
                self._retired.append((time.monotonic(), old_fd))
            if out:
                os.replace(tmp, path)
                # Kept tombstones count as live: compacting again would not reclaim them.
                volume.end, volume.live = out, live + tombstones
                self._readers[number] = reader
            else:
                os.unlink(path)
                tmp.unlink()
                del self._volumes[number]
                os.close(reader)
            self.stats.compactions += 1
            self.stats.reclaimed += reclaimed
        fsync_dir(self.root)
        self._close_retired()
        log.info("volume %s compacted: %d bytes reclaimed, %d kept", path.name, reclaimed, out)
        return reclaimed

    def _close_retired(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [fd for at, fd in self._retired if now - at > RETIRE_AFTER]
            self._retired = [(at, fd) for at, fd in self._retired if now - at <= RETIRE_AFTER]
        for fd in old:
            os.close(fd)

    def sizes(self) -> tuple[int, int, int]:
        """Volumes, their bytes, and the bytes of their live needles."""
        with self._lock:
            vols = list(self._volumes.values())
        return len(vols), sum(v.end for v in vols), sum(v.live for v in vols)


def fsync_dir(path: Path) -> None:
    """fsync a directory (what a create, rename or unlink in it changed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Needle(NamedTuple):
    """A live needle found by :func:`scan`: its volume file, where its data starts, its size."""

    path: Path
    data_offset: int
    size: int


def scan(volumes_dir: Path) -> dict[str, Needle]:
    """The live needles of a (stopped) bucket's ``volumes/`` directory, read without
    changing anything: for tools and tests that look at a bucket's disk."""
    found: dict[str, Needle] = {}
    numbers = sorted(n for n in (volume_number(p.name) for p in volumes_dir.glob("v*.dat")) if n is not None)
    for number in numbers:
        path = volumes_dir / volume_name(number)
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + HEADER_SIZE <= total:
                f.seek(offset)
                header = decode_header(f.read(HEADER_SIZE))
                if header is None or offset + header.length > total:  # the end, or a torn tail
                    break
                if header.kind == PUT:
                    found[header.fragment_id] = Needle(path, offset + HEADER_SIZE, header.size)
                else:
                    found.pop(header.fragment_id, None)
                offset += header.length
    return found
