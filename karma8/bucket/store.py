"""The fragment store of one bucket: files on its local filesystem, via anyio.

Layout under the data directory::

    bucket-id                         the bucket's identity, created on first start
    volumes/v<n>.dat                  fragments that arrived whole, as needles appended
                                      with group commit (karma8/bucket/volumes.py)
    fragments/<uu>/<upload id>.<part> fragments streamed in pieces, one file each
                                      (<uu>: first 2 hex digits); before volumes, all
    tmp/                              streamed Puts in progress; emptied at every start

A fragment id lives in a volume or in a file; the store looks in the volumes first. A
fragment file carries its own checksums, so one rename commits data and checksums
together. Two formats, told apart by the footer (the last bytes of the file):

- format 1 (``K8FRAG01``, every fragment before erasure coding): the data, then a
  48-byte footer (magic, data length, sha256 of the data);
- format 2 (``K8FRAG02``): the data, the crc32c of every unit of ``unit`` bytes (4 bytes
  each, little-endian), then a 56-byte footer (data length, unit, sha256, magic). A read
  checks each unit as it goes, so corruption is reported at the unit it hit.

Fragments keep the format they were written in. Fragment ids are checked by
:func:`parse_fragment_id` before they become file names, so no input can reach outside
``fragments/``.

Nothing is cached that the filesystem does not hold: the bytes-used counter is rebuilt by
a scan at start and kept in step with every commit and delete, and the volumes' index is
rebuilt from the volumes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread

from karma8.bucket.errors import FragmentCorrupt, FragmentMissing, NoSpace
from karma8.bucket.volumes import Volumes, fsync_dir
from karma8.core.checksums import CRC_SIZE, first_bad_unit
from karma8.core.fragments import check_upload_id, parse_fragment_id
from karma8.core.records import Piece, StoredFragment, Usage
from karma8.errors import BadRequest

__all__ = ["FragmentCorrupt", "FragmentMissing", "FragmentStore", "NoSpace", "open_store"]

log = logging.getLogger(__name__)

MAGIC = b"K8FRAG01"
MAGIC_UNITS = b"K8FRAG02"
#: Chunks up to this size are written (and hashed) on the event loop: a few
#: microseconds into the page cache, less than a hop to a worker thread and back.
INLINE_WRITE_MAX = 64 * 1024
#: Default size at which a volume is sealed and the next one started.
VOLUME_SIZE = 256 * 1024 * 1024
_FOOTER = struct.Struct("<8sQ32s")
FOOTER_SIZE = _FOOTER.size
_FOOTER_UNITS = struct.Struct("<QQ32s8s")
FOOTER_UNITS_SIZE = _FOOTER_UNITS.size


def overhead(size: int, unit: int) -> int:
    """Bytes a fragment of ``size`` bytes takes on disk beyond its data (``unit`` 0: format 1)."""
    if not unit:
        return FOOTER_SIZE
    return CRC_SIZE * -(-size // unit) + FOOTER_UNITS_SIZE


@dataclass(frozen=True, slots=True)
class Footer:
    """What a fragment file says about itself."""

    size: int
    #: Bytes per checksummed unit; 0 for format 1 (one sha256, no unit checksums).
    unit: int
    sha256: bytes


def _read_footer(f: BinaryIO, path: Path) -> Footer:
    total = os.fstat(f.fileno()).st_size
    if total >= FOOTER_UNITS_SIZE:
        f.seek(total - FOOTER_UNITS_SIZE)
        size, unit, digest, magic = _FOOTER_UNITS.unpack(f.read(FOOTER_UNITS_SIZE))
        if magic == MAGIC_UNITS:
            if unit < 1 or total != size + overhead(size, unit):
                raise FragmentCorrupt(f"{path.name}: bad footer")
            f.seek(0)
            return Footer(size, unit, digest)
    if total < FOOTER_SIZE:
        raise FragmentCorrupt(f"{path.name}: shorter than its footer")
    f.seek(total - FOOTER_SIZE)
    magic, size, digest = _FOOTER.unpack(f.read(FOOTER_SIZE))
    if magic != MAGIC or size != total - FOOTER_SIZE:
        raise FragmentCorrupt(f"{path.name}: bad footer")
    f.seek(0)
    return Footer(size, 0, digest)


def _read_crcs(f: BinaryIO, footer: Footer, first: int, count: int) -> list[int]:
    f.seek(footer.size + CRC_SIZE * first)
    raw = f.read(CRC_SIZE * count)
    return list(struct.unpack(f"<{len(raw) // CRC_SIZE}I", raw))


def _data_size(path: Path) -> int:
    """The data bytes of a fragment file (a guess from its length if the footer is bad)."""
    with path.open("rb") as f:
        try:
            return _read_footer(f, path).size
        except FragmentCorrupt:
            return max(0, os.fstat(f.fileno()).st_size - FOOTER_SIZE)


@dataclass
class _Counters:
    used: int = 0
    fragments: int = 0


class FragmentWriter:
    """One fragment being written to a temporary file.

    With a ``unit`` (format 2), every write holds whole units (only the fragment's last
    may be short) with the crc32c of each, checked before anything reaches the disk.
    """

    def __init__(
        self, store: FragmentStore, fragment_id: str, size: int, unit: int, tmp: Path, f: BinaryIO
    ) -> None:
        self._store = store
        self.fragment_id = fragment_id
        self.size = size
        self.unit = unit
        self._tmp = tmp
        self._f = f
        self._hash = hashlib.sha256()
        self._crcs: list[int] = []
        self.written = 0

    def _check(self, data: bytes, crcs: Sequence[int]) -> None:
        if self.written + len(data) > self.size:
            raise BadRequest(f"{self.fragment_id}: more than the announced {self.size} bytes")
        if not self.unit:
            if crcs:
                raise BadRequest(f"{self.fragment_id}: unit checksums without a unit")
            return
        if len(data) % self.unit and self.written + len(data) != self.size:
            raise BadRequest(f"{self.fragment_id}: a write of {len(data)} bytes is not whole units")
        bad = first_bad_unit(data, self.unit, crcs)
        if bad is not None:
            unit = self.written // self.unit + bad
            raise FragmentCorrupt(f"{self.fragment_id}: unit {unit} arrived with a wrong checksum")

    def _write(self, data: bytes, crcs: Sequence[int]) -> None:
        self._check(data, crcs)
        self._crcs.extend(crcs)
        self.written += len(data)
        self._hash.update(data)
        self._f.write(data)

    async def write(self, data: bytes, crcs: Sequence[int] = ()) -> None:
        """Append ``data`` (and the crc32c of each of its units, in format 2).

        Raises:
            BadRequest: more than the announced size, or not whole units.
            FragmentCorrupt: a unit does not match its checksum.
        """
        if len(data) > INLINE_WRITE_MAX:
            await anyio.to_thread.run_sync(self._write, data, crcs)
        elif data:
            self._write(data, crcs)

    def _commit(self, final: Path, fsync: bool) -> StoredFragment:
        digest = self._hash.digest()
        if self.unit:
            self._f.write(struct.pack(f"<{len(self._crcs)}I", *self._crcs))
            self._f.write(_FOOTER_UNITS.pack(self.size, self.unit, digest, MAGIC_UNITS))
        else:
            self._f.write(_FOOTER.pack(MAGIC, self.size, digest))
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        final.parent.mkdir(exist_ok=True)
        replaced = _data_size(final) if final.exists() else None
        os.replace(self._tmp, final)
        if fsync:
            fsync_dir(final.parent)
        self._store._account(self.size, replaced)
        return StoredFragment(self.fragment_id, self.size, digest.hex())

    async def commit(self) -> StoredFragment:
        """Write the checksums and footer, fsync, rename into place; the fragment now exists."""
        if self.written != self.size:
            raise BadRequest(f"{self.fragment_id}: got {self.written} of {self.size} bytes")
        final = self._store._path(self.fragment_id)
        stored = await anyio.to_thread.run_sync(self._commit, final, self._store.fsync)
        # The file is the fragment now: a needle of the same id would shadow it.
        await self._store.volumes.delete([self.fragment_id])
        return stored

    def _discard(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class FragmentStore:
    """Fragments of one bucket on its filesystem. Open with :func:`open_store`."""

    def __init__(self, root: Path, bucket_id: str, capacity: int, fsync: bool, volume_size: int) -> None:
        self.root = root
        self.bucket_id = bucket_id
        self.capacity = capacity
        self.fsync = fsync
        self.volumes = Volumes(root / "volumes", fsync=fsync, volume_size=volume_size)
        self._fragments = root / "fragments"
        self._tmp = root / "tmp"
        self._counters = _Counters()
        self._lock = threading.Lock()
        #: The sorted names of the fan-out directory listed last, with its mtime.
        self._names: tuple[str, int, list[str]] | None = None
        #: Unfinished Put files that the start removed from tmp/.
        self.tmp_removed = 0

    # -- paths -----------------------------------------------------------------------

    def _path(self, fragment_id: str) -> Path:
        upload_id, part = parse_fragment_id(fragment_id)
        return self._fragments / upload_id[:2] / f"{upload_id}.{part}"

    def _account(self, size: int, replaced: int | None) -> None:
        with self._lock:  # called from worker threads
            self._counters.used += size - (replaced or 0)
            self._counters.fragments += replaced is None

    # -- startup ---------------------------------------------------------------------

    def _scan(self) -> None:
        self._fragments.mkdir(parents=True, exist_ok=True)
        if self._tmp.exists():
            leftovers = list(self._tmp.iterdir())
            shutil.rmtree(self._tmp)
            self.tmp_removed = len(leftovers)
            if leftovers:
                log.info("bucket=%s removed %d unfinished upload file(s)", self.bucket_id, len(leftovers))
        self._tmp.mkdir()
        counters = _Counters()
        for path in self._iter_files():
            counters.used += _data_size(path)
            counters.fragments += 1
        self._counters = counters
        self.volumes.open()

    def close(self) -> None:
        """Close the volumes' descriptors (the store is not used afterwards)."""
        self.volumes.close()

    def _iter_files(self, upload_id: str = "") -> Iterator[Path]:
        if upload_id:
            yield from sorted((self._fragments / upload_id[:2]).glob(f"{upload_id}.*"))
            return
        for shard in sorted(self._fragments.iterdir()):
            yield from sorted(shard.iterdir())

    # -- operations ------------------------------------------------------------------

    def usage(self) -> Usage:
        """Bytes used by fragment data, bytes free, capacity, fragment count."""
        disk = shutil.disk_usage(self.root)
        used = self._counters.used + self.volumes.used
        if self.capacity:
            capacity = self.capacity
            free = max(0, min(disk.free, capacity - used))
        else:
            capacity = disk.total
            free = disk.free
        fragments = self._counters.fragments + self.volumes.count
        return Usage(used=used, free=free, capacity=capacity, fragments=fragments)

    @contextlib.asynccontextmanager
    async def open_writer(self, fragment_id: str, size: int, unit: int = 0) -> AsyncIterator[FragmentWriter]:
        """A writer for a new fragment; if the block fails, no file is left behind.

        ``unit`` > 0 writes format 2 (a checked crc32c per unit); 0 writes format 1.
        """
        self._path(fragment_id)  # validates the id before anything touches the disk
        if size > self.usage().free:
            raise NoSpace(f"{fragment_id}: {size} bytes do not fit")
        tmp = self._tmp / f"{fragment_id}.{uuid.uuid4().hex}"
        # Creating and discarding the temporary file are synchronous on purpose (each is
        # a few microseconds): grpclib cancels a reset Put with a native task.cancel(),
        # which can land on the checkpoint anyio takes before every thread call, and then
        # a file created in a worker thread would be lost without being discarded.
        f = tmp.open("xb")
        writer = FragmentWriter(self, fragment_id, size, unit, tmp, f)
        try:
            yield writer
        finally:
            if not f.closed:  # not committed
                writer._discard()

    async def put_whole(
        self, fragment_id: str, data: bytes, unit: int = 0, crcs: Sequence[int] = ()
    ) -> StoredFragment:
        """Store a whole fragment as a needle in the active volume (group commit: it
        returns once the needle is on disk, with those of the Puts queued beside it).

        Raises:
            BadRequest: unit checksums without a unit, or a malformed id.
            FragmentCorrupt: a unit does not match its checksum.
            NoSpace: the fragment does not fit.
        """
        self._path(fragment_id)  # validates the id before anything touches the disk
        if len(data) > self.usage().free:
            raise NoSpace(f"{fragment_id}: {len(data)} bytes do not fit")
        if len(data) > INLINE_WRITE_MAX:
            digest = await anyio.to_thread.run_sync(_check_whole, fragment_id, data, unit, crcs)
        else:
            digest = _check_whole(fragment_id, data, unit, crcs)
        await self.volumes.put(fragment_id, data, unit, crcs, digest)
        path = self._path(fragment_id)
        if path.exists():  # written as a file before: the needle is the fragment now
            await anyio.to_thread.run_sync(self._delete, [path])
        return StoredFragment(fragment_id, len(data), digest.hex())

    def _read_whole(self, fragment_id: str, limit: int, first_unit: int) -> Piece | None:
        path = self._path(fragment_id)
        if self.volumes.locate(fragment_id) is not None:
            piece, _ = self._read_needle(fragment_id, first_unit)
            return piece if len(piece.data) <= limit else None
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise FragmentMissing(f"no fragment {fragment_id}") from None
        with f:
            footer = _read_footer(f, path)
            if footer.unit:
                start = min(footer.size, first_unit * footer.unit)
                if footer.size - start > limit:
                    return None
                return _read_units(f, footer, fragment_id, first_unit, footer.size - start)
            _check_first_unit(fragment_id, first_unit)
            if footer.size > limit:
                return None
            data = f.read(footer.size)
        if len(data) != footer.size:
            raise FragmentCorrupt(f"{fragment_id}: truncated")
        if hashlib.sha256(data).digest() != footer.sha256:
            raise FragmentCorrupt(f"{fragment_id}: checksum mismatch")
        return Piece(data, [])

    async def read_whole(self, fragment_id: str, limit: int, first_unit: int = 0) -> Piece | None:
        """A fragment (from ``first_unit`` on) of at most ``limit`` bytes, read and verified
        in one worker-thread call.

        None when there is more: read it with :meth:`open_reader` instead. A needle in the
        page cache is read right here (profiled: the thread hand-off cost more CPU than
        the read of a small fragment); one that is not, or a file, in a worker thread.
        """
        if self.volumes.locate(fragment_id) is not None:
            with contextlib.suppress(BlockingIOError):
                piece, _ = self._read_needle(fragment_id, first_unit, cached=True)
                return piece if len(piece.data) <= limit else None
        return await anyio.to_thread.run_sync(self._read_whole, fragment_id, limit, first_unit)

    def _read_needle(self, fragment_id: str, first_unit: int, cached: bool = False) -> tuple[Piece, int]:
        """A fragment held in the volumes, from ``first_unit`` on (checked whole), and its
        unit (0: none), both from the one needle read."""
        piece, header = self.volumes.read(fragment_id, cached=cached)
        unit = header.unit
        if not unit:
            _check_first_unit(fragment_id, first_unit)
            return piece, unit
        return Piece(piece.data[first_unit * unit :], piece.crcs[first_unit:]), unit

    @contextlib.asynccontextmanager
    async def open_reader(self, fragment_id: str) -> AsyncIterator[FragmentReader | NeedleReader]:
        """A reader that checks the data against the fragment's checksums as it goes."""
        path = self._path(fragment_id)
        if self.volumes.locate(fragment_id) is not None:
            piece, unit = await anyio.to_thread.run_sync(self._read_needle, fragment_id, 0)
            yield NeedleReader(fragment_id, piece, unit)
            return
        try:
            f = await anyio.to_thread.run_sync(path.open, "rb")
        except FileNotFoundError:
            raise FragmentMissing(f"no fragment {fragment_id}") from None
        try:
            footer = await anyio.to_thread.run_sync(_read_footer, f, path)
            yield FragmentReader(fragment_id, f, footer)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(f.close)

    def _delete(self, paths: list[Path]) -> tuple[int, int]:
        count = freed = 0
        for path in paths:
            try:
                size = _data_size(path)
                path.unlink()
            except FileNotFoundError:  # already gone (a concurrent delete)
                continue
            count += 1
            freed += size
        if count:
            if self.fsync:
                for parent in {p.parent for p in paths}:
                    fsync_dir(parent)
            with self._lock:
                self._counters.used -= freed
                self._counters.fragments -= count
        return count, freed

    async def delete_upload(self, upload_id: str, fragment_ids: Sequence[str] = ()) -> tuple[int, int]:
        """Delete the fragments of ``upload_id`` (all, or the named ones); return (count, bytes)."""
        check_upload_id(upload_id)
        paths: list[Path] | None = None  # the upload's files, found when deleting them
        if fragment_ids:
            paths = []
            for fid in fragment_ids:
                if parse_fragment_id(fid)[0] != upload_id:
                    raise BadRequest(f"fragment {fid} is not part of upload {upload_id}")
                paths.append(self._path(fid))
            needles = list(fragment_ids)
        else:
            needles = self.volumes.of_upload(upload_id)
        deleted = await self.volumes.delete(needles)

        def delete_files() -> tuple[int, int]:  # one worker-thread call
            return self._delete(list(self._iter_files(upload_id)) if paths is None else paths)

        count, freed = await anyio.to_thread.run_sync(delete_files)
        return count + len(deleted), freed + sum(size for _, size in deleted)

    def _list(self, upload_id: str) -> list[StoredFragment]:
        needles = self.volumes.of_upload(upload_id)
        paths = [p for p in self._iter_files(upload_id) if p.name not in needles]
        listed = self._describe(paths) + self.volumes.describe(needles, time.time())
        return sorted(listed, key=lambda f: f.fragment_id)

    def _shard_names(self, shard: str, after: str) -> list[str]:
        """The names in one fan-out directory, in order, of uploads after ``after``.

        The sorted names of the last directory listed are kept while its mtime stays
        the same: the pages of one pass mostly fall in the directory the page before
        ended in (a directory holds 1/256 of the fragments, many pages' worth), which
        is then listed and sorted once, not once per page.
        """
        path = self._fragments / shard
        try:
            mtime = os.stat(path).st_mtime_ns
            with self._lock:
                cached = self._names
            if cached is not None and cached[:2] == (shard, mtime):
                names = cached[2]
            else:
                names = sorted(os.listdir(path))
                # Kept only if the directory was last changed a while before it was
                # listed: any change after the listing then has a later mtime (file
                # times are coarse, a few milliseconds).
                if time.time_ns() - mtime > 1_000_000_000:
                    with self._lock:
                        self._names = (shard, mtime, names)
        except (FileNotFoundError, NotADirectoryError):
            return []
        # "<after>/" sorts after every "<after>.<part>" and before any later upload id.
        return names[bisect.bisect_right(names, after + "/") :] if after else list(names)

    def _describe_names(self, shard: str, names: list[str]) -> list[StoredFragment]:
        """``names`` (fragment ids of one shard, in order) described, needles or files."""
        needles = [n for n in names if self.volumes.locate(n) is not None]
        held = set(needles)
        files = self._describe([self._fragments / shard / n for n in names if n not in held])
        listed = files + self.volumes.describe(needles, time.time())
        return sorted(listed, key=lambda f: f.fragment_id) if files and needles else listed

    def _describe(self, paths: Sequence[Path]) -> list[StoredFragment]:
        out = []
        now = time.time()
        for path in paths:
            try:
                with path.open("rb") as f:
                    mtime = os.fstat(f.fileno()).st_mtime
                    try:
                        footer = _read_footer(f, path)
                        size, digest = footer.size, footer.sha256
                    except FragmentCorrupt:
                        size, digest = max(0, path.stat().st_size - FOOTER_SIZE), b""
            except FileNotFoundError:  # deleted while we listed
                continue
            out.append(StoredFragment(path.name, size, digest.hex(), max(0.0, now - mtime)))
        return out

    def _verify(self, fragment_id: str) -> tuple[str, int, str]:
        path = self._path(fragment_id)
        loc = self.volumes.locate(fragment_id)
        if loc is not None:
            try:
                piece, _ = self.volumes.read(fragment_id)
            except FragmentMissing:
                return "missing", 0, ""
            except FragmentCorrupt as exc:
                return f"corrupt: {exc.message.removeprefix(fragment_id + ': ')}", loc.size, ""
            return "", len(piece.data), hashlib.sha256(piece.data).hexdigest()
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return "missing", 0, ""
        with f:
            try:
                footer = _read_footer(f, path)
            except FragmentCorrupt as exc:
                return f"corrupt: {exc.message}", 0, ""
            h = hashlib.sha256()
            step = max(1, (1 << 20) // footer.unit) * footer.unit if footer.unit else 1 << 20
            done = 0
            while done < footer.size:
                data = f.read(min(footer.size - done, step))
                if not data:
                    return "corrupt: truncated", footer.size, ""
                if footer.unit:
                    first = done // footer.unit
                    here = f.tell()
                    crcs = _read_crcs(f, footer, first, -(-len(data) // footer.unit))
                    f.seek(here)
                    bad = first_bad_unit(data, footer.unit, crcs)
                    if bad is not None:
                        return f"corrupt: unit {first + bad} fails its checksum", footer.size, ""
                h.update(data)
                done += len(data)
        if h.digest() != footer.sha256:
            return "corrupt: checksum mismatch", footer.size, h.hexdigest()
        return "", footer.size, h.hexdigest()

    async def verify(self, fragment_id: str) -> tuple[str, int, str]:
        """Read a whole fragment; return (problem or "", size, sha256 of the data read)."""
        return await anyio.to_thread.run_sync(self._verify, fragment_id)

    async def list_fragments(self, upload_id: str = "") -> list[StoredFragment]:
        """Every stored fragment (or those of one upload), with sizes and checksums."""
        if upload_id:
            check_upload_id(upload_id)
        return await anyio.to_thread.run_sync(self._list, upload_id)

    async def compact(self, garbage: float) -> int:
        """Compact every sealed volume whose dead share is at least ``garbage``; returns the
        bytes reclaimed."""
        reclaimed = 0
        for number, dead in sorted(self.volumes.garbage().items()):
            if dead >= garbage:
                reclaimed += await anyio.to_thread.run_sync(self.volumes.compact, number)
        return reclaimed

    async def iter_fragments(
        self, after: str = "", limit: int = 0, batch: int = 1000
    ) -> AsyncIterator[list[StoredFragment]]:
        """The stored fragments in order of their ids, ``batch`` at a time.

        Only fragments of uploads whose id sorts after ``after``; with a ``limit``, the
        listing stops once it has at least that many, at the end of an upload's
        fragments. Memory holds one fan-out directory's names at most (the fragments
        spread over 256 of them), never the whole listing.
        """
        dirs = await anyio.to_thread.run_sync(lambda: [p.name for p in self._fragments.iterdir()])
        listed = 0
        last = ""
        for shard in sorted({*dirs, *self.volumes.shards()}):
            if shard < after[:2]:
                continue  # every upload in it sorts before ``after``
            names = await anyio.to_thread.run_sync(self._shard_names, shard, after)
            needles = self.volumes.ids(shard)
            if needles:
                needles = needles[bisect.bisect_right(needles, after + "/") :] if after else needles
                names = sorted({*names, *needles})
            for i in range(0, len(names), batch):
                chunk = names[i : i + batch]
                if limit:
                    for j, name in enumerate(chunk):
                        upload = name.partition(".")[0]
                        if listed + j >= limit and upload != last:
                            chunk = chunk[:j]
                            break
                        last = upload
                if chunk:
                    yield await anyio.to_thread.run_sync(self._describe_names, shard, chunk)
                listed += len(chunk)
                if limit and listed >= limit and len(chunk) < len(names[i : i + batch]):
                    return


def _check_whole(fragment_id: str, data: bytes, unit: int, crcs: Sequence[int]) -> bytes:
    """Check a whole fragment against its unit checksums; return the sha256 of its data."""
    if not unit:
        if crcs:
            raise BadRequest(f"{fragment_id}: unit checksums without a unit")
    else:
        bad = first_bad_unit(data, unit, crcs)
        if bad is not None:
            raise FragmentCorrupt(f"{fragment_id}: unit {bad} arrived with a wrong checksum")
    return hashlib.sha256(data).digest()


def _check_first_unit(fragment_id: str, first_unit: int) -> None:
    if first_unit:
        raise BadRequest(f"{fragment_id} has no units to start from (format 1)")


def _read_units(f: BinaryIO, footer: Footer, fragment_id: str, first: int, n: int) -> Piece:
    """``n`` bytes of whole units from unit ``first`` on, each checked against its crc32c."""
    start = min(footer.size, first * footer.unit)
    n = min(n, footer.size - start)
    crcs = _read_crcs(f, footer, first, -(-n // footer.unit))
    f.seek(start)
    data = f.read(n)
    if len(data) != n:
        raise FragmentCorrupt(f"{fragment_id}: truncated")
    bad = first_bad_unit(data, footer.unit, crcs)
    if bad is not None:
        raise FragmentCorrupt(f"{fragment_id}: unit {first + bad} fails its checksum")
    return Piece(data, crcs)


class FragmentReader:
    """Reads one fragment in pieces, verifying it as it goes.

    Format 2 is checked unit by unit. Format 1 has one sha256 for the whole fragment:
    the final piece is held back until it matched.
    """

    def __init__(self, fragment_id: str, f: BinaryIO, footer: Footer) -> None:
        self.fragment_id = fragment_id
        self.size = footer.size
        self.unit = footer.unit
        self._f = f
        self._footer = footer

    def _read(self, n: int, h: hashlib._Hash) -> bytes:
        data = self._f.read(n)
        h.update(data)
        return data

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield the data in chunks of ``chunk_size`` (whole units in format 2)."""
        async for piece in self.pieces(chunk_size):
            yield piece.data

    async def pieces(self, chunk_size: int, first_unit: int = 0) -> AsyncIterator[Piece]:
        """Yield the data from ``first_unit`` on, at most ``chunk_size`` bytes at a time
        (format 2: whole units, at least one, with their crc32c)."""
        if self.unit:
            step = max(1, chunk_size // self.unit) * self.unit
            unit = first_unit
            while unit * self.unit < self.size:
                piece = await anyio.to_thread.run_sync(
                    _read_units, self._f, self._footer, self.fragment_id, unit, step
                )
                unit += len(piece.crcs)
                yield piece
            return
        _check_first_unit(self.fragment_id, first_unit)
        h = hashlib.sha256()
        left = self.size
        pending: bytes | None = None
        while left:
            data = await anyio.to_thread.run_sync(self._read, min(chunk_size, left), h)
            if not data:
                raise FragmentCorrupt(f"{self.fragment_id}: truncated")
            left -= len(data)
            if pending is not None:
                yield Piece(pending, [])
            pending = data
        if h.digest() != self._footer.sha256:
            raise FragmentCorrupt(f"{self.fragment_id}: checksum mismatch")
        if pending is not None:
            yield Piece(pending, [])


class NeedleReader:
    """Serves a fragment read whole from a volume (checked) in pieces, as
    :class:`FragmentReader` serves a file."""

    def __init__(self, fragment_id: str, piece: Piece, unit: int) -> None:
        self.fragment_id = fragment_id
        self.size = len(piece.data)
        self.unit = unit
        self._piece = piece

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield the data in chunks of ``chunk_size`` (whole units when there are units)."""
        async for piece in self.pieces(chunk_size):
            yield piece.data

    async def pieces(self, chunk_size: int, first_unit: int = 0) -> AsyncIterator[Piece]:
        """Yield the data from ``first_unit`` on, at most ``chunk_size`` bytes at a time
        (with units: whole units, at least one, with their crc32c)."""
        data, crcs = self._piece.data, self._piece.crcs
        if not self.unit:
            _check_first_unit(self.fragment_id, first_unit)
            for i in range(0, len(data), chunk_size):
                yield Piece(data[i : i + chunk_size], [])
            return
        per = max(1, chunk_size // self.unit)
        for first in range(first_unit, len(crcs), per):
            yield Piece(data[first * self.unit : (first + per) * self.unit], crcs[first : first + per])


def _load_identity(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bucket-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    bucket_id = uuid.uuid4().hex[:16]
    tmp = root / "bucket-id.tmp"
    tmp.write_text(bucket_id + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(root)
    return bucket_id


async def open_store(
    root: Path, *, capacity: int = 0, fsync: bool = True, volume_size: int = VOLUME_SIZE
) -> FragmentStore:
    """Open (creating on first start) the store at ``root``; clears unfinished Puts and
    rebuilds the volumes' index."""
    bucket_id = await anyio.to_thread.run_sync(_load_identity, root)
    store = FragmentStore(root, bucket_id, capacity, fsync, volume_size)
    await anyio.to_thread.run_sync(store._scan)
    return store
