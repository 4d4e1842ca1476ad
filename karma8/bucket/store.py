"""The fragment store of one bucket: files on its local filesystem, via anyio.

Layout under the data directory::

    bucket-id                         the bucket's identity, created on first start
    fragments/<uu>/<upload id>.<part> committed fragments (<uu>: first 2 hex digits)
    tmp/                              Puts in progress; emptied at every start

A fragment file is the fragment's bytes followed by a 48-byte footer (magic, data length,
sha256 of the data), so a fragment carries its own checksum and one rename commits data
and checksum together. Fragment ids are checked by :func:`parse_fragment_id` before they
become file names, so no input can reach outside ``fragments/``.

Nothing is cached that the filesystem does not hold: the bytes-used counter is rebuilt by
a scan at start and kept in step with every commit and delete.
"""

from __future__ import annotations

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

from karma8.core.fragments import check_upload_id, parse_fragment_id
from karma8.core.records import StoredFragment, Usage
from karma8.errors import BadRequest, Karma8Error

log = logging.getLogger(__name__)

MAGIC = b"K8FRAG01"
#: Chunks up to this size are written (and hashed) on the event loop: a few
#: microseconds into the page cache, less than a hop to a worker thread and back.
INLINE_WRITE_MAX = 64 * 1024
_FOOTER = struct.Struct("<8sQ32s")
FOOTER_SIZE = _FOOTER.size


class FragmentMissing(Karma8Error):
    """The bucket does not hold the requested fragment."""

    code = "not_found"


class FragmentCorrupt(Karma8Error):
    """A fragment's data does not match its footer."""

    code = "checksum_mismatch"


class NoSpace(Karma8Error):
    """The fragment does not fit in the bucket's free space."""

    code = "no_space"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_footer(f: BinaryIO, path: Path) -> tuple[int, bytes]:
    total = os.fstat(f.fileno()).st_size
    if total < FOOTER_SIZE:
        raise FragmentCorrupt(f"{path.name}: shorter than its footer")
    f.seek(total - FOOTER_SIZE)
    magic, size, digest = _FOOTER.unpack(f.read(FOOTER_SIZE))
    if magic != MAGIC or size != total - FOOTER_SIZE:
        raise FragmentCorrupt(f"{path.name}: bad footer")
    f.seek(0)
    return size, digest


@dataclass
class _Counters:
    used: int = 0
    fragments: int = 0


class FragmentWriter:
    """One fragment being written to a temporary file."""

    def __init__(self, store: FragmentStore, fragment_id: str, size: int, tmp: Path, f: BinaryIO):
        self._store = store
        self.fragment_id = fragment_id
        self.size = size
        self._tmp = tmp
        self._f = f
        self._hash = hashlib.sha256()
        self.written = 0

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._f.write(data)

    async def write(self, data: bytes) -> None:
        """Append ``data``; more than the announced size is refused."""
        if self.written + len(data) > self.size:
            raise BadRequest(f"{self.fragment_id}: more than the announced {self.size} bytes")
        self.written += len(data)
        if len(data) > INLINE_WRITE_MAX:
            await anyio.to_thread.run_sync(self._write, data)
        elif data:
            self._write(data)

    def _commit(self, final: Path, fsync: bool) -> StoredFragment:
        digest = self._hash.digest()
        self._f.write(_FOOTER.pack(MAGIC, self.size, digest))
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        final.parent.mkdir(exist_ok=True)
        replaced = final.stat().st_size - FOOTER_SIZE if final.exists() else None
        os.replace(self._tmp, final)
        if fsync:
            _fsync_dir(final.parent)
        self._store._account(self.size, replaced)
        return StoredFragment(self.fragment_id, self.size, digest.hex())

    async def commit(self) -> StoredFragment:
        """Write the footer, fsync, rename into place; the fragment now exists."""
        if self.written != self.size:
            raise BadRequest(f"{self.fragment_id}: got {self.written} of {self.size} bytes")
        final = self._store._path(self.fragment_id)
        return await anyio.to_thread.run_sync(self._commit, final, self._store.fsync)

    def _discard(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class FragmentStore:
    """Fragments of one bucket on its filesystem. Open with :func:`open_store`."""

    def __init__(self, root: Path, bucket_id: str, capacity: int, fsync: bool) -> None:
        self.root = root
        self.bucket_id = bucket_id
        self.capacity = capacity
        self.fsync = fsync
        self._fragments = root / "fragments"
        self._tmp = root / "tmp"
        self._counters = _Counters()
        self._lock = threading.Lock()
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
            counters.used += max(0, path.stat().st_size - FOOTER_SIZE)
            counters.fragments += 1
        self._counters = counters

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
        used = self._counters.used
        if self.capacity:
            capacity = self.capacity
            free = max(0, min(disk.free, capacity - used))
        else:
            capacity = disk.total
            free = disk.free
        return Usage(used=used, free=free, capacity=capacity, fragments=self._counters.fragments)

    @contextlib.asynccontextmanager
    async def open_writer(self, fragment_id: str, size: int) -> AsyncIterator[FragmentWriter]:
        """A writer for a new fragment; if the block fails, no file is left behind."""
        self._path(fragment_id)  # validates the id before anything touches the disk
        if size > self.usage().free:
            raise NoSpace(f"{fragment_id}: {size} bytes do not fit")
        tmp = self._tmp / f"{fragment_id}.{uuid.uuid4().hex}"
        # Creating and discarding the temporary file are synchronous on purpose (each is
        # a few microseconds): grpclib cancels a reset Put with a native task.cancel(),
        # which can land on the checkpoint anyio takes before every thread call, and then
        # a file created in a worker thread would be lost without being discarded.
        f = tmp.open("xb")
        writer = FragmentWriter(self, fragment_id, size, tmp, f)
        try:
            yield writer
        finally:
            if not f.closed:  # not committed
                writer._discard()

    def _put_whole(self, fragment_id: str, data: bytes) -> StoredFragment:
        tmp = self._tmp / f"{fragment_id}.{uuid.uuid4().hex}"
        writer = FragmentWriter(self, fragment_id, len(data), tmp, tmp.open("xb"))
        try:
            writer._write(data)
            return writer._commit(self._path(fragment_id), self.fsync)
        except BaseException:
            writer._discard()
            raise

    async def put_whole(self, fragment_id: str, data: bytes) -> StoredFragment:
        """Store a whole fragment: create, write, fsync and rename in one worker-thread call.

        Nothing touches the disk in the event loop thread: creating a file there can wait
        on the filesystem journal behind other fragments' fsyncs, and so block every call.
        The temporary file exists only inside the thread call, which removes it on failure.
        """
        self._path(fragment_id)  # validates the id before anything touches the disk
        if len(data) > self.usage().free:
            raise NoSpace(f"{fragment_id}: {len(data)} bytes do not fit")
        return await anyio.to_thread.run_sync(self._put_whole, fragment_id, data)

    def _read_whole(self, fragment_id: str, limit: int) -> bytes | None:
        path = self._path(fragment_id)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise FragmentMissing(f"no fragment {fragment_id}") from None
        with f:
            size, digest = _read_footer(f, path)
            if size > limit:
                return None
            data = f.read(size)
        if len(data) != size:
            raise FragmentCorrupt(f"{fragment_id}: truncated")
        if hashlib.sha256(data).digest() != digest:
            raise FragmentCorrupt(f"{fragment_id}: checksum mismatch")
        return data

    async def read_whole(self, fragment_id: str, limit: int) -> bytes | None:
        """A fragment of at most ``limit`` bytes, read and verified in one worker-thread call.

        None when the fragment is larger: read it with :meth:`open_reader` instead.
        """
        return await anyio.to_thread.run_sync(self._read_whole, fragment_id, limit)

    @contextlib.asynccontextmanager
    async def open_reader(self, fragment_id: str) -> AsyncIterator[FragmentReader]:
        """A reader that checks the data against the footer as it goes."""
        path = self._path(fragment_id)
        try:
            f = await anyio.to_thread.run_sync(path.open, "rb")
        except FileNotFoundError:
            raise FragmentMissing(f"no fragment {fragment_id}") from None
        try:
            size, digest = await anyio.to_thread.run_sync(_read_footer, f, path)
            yield FragmentReader(fragment_id, f, size, digest)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(f.close)

    def _delete(self, paths: list[Path]) -> tuple[int, int]:
        count = freed = 0
        for path in paths:
            try:
                size = max(0, path.stat().st_size - FOOTER_SIZE)
                path.unlink()
            except FileNotFoundError:  # already gone (a concurrent delete)
                continue
            count += 1
            freed += size
        if count:
            if self.fsync:
                for parent in {p.parent for p in paths}:
                    _fsync_dir(parent)
            with self._lock:
                self._counters.used -= freed
                self._counters.fragments -= count
        return count, freed

    async def delete_upload(self, upload_id: str, fragment_ids: Sequence[str] = ()) -> tuple[int, int]:
        """Delete the fragments of ``upload_id`` (all, or the named ones); return (count, bytes)."""
        check_upload_id(upload_id)
        if fragment_ids:
            paths = []
            for fid in fragment_ids:
                if parse_fragment_id(fid)[0] != upload_id:
                    raise BadRequest(f"fragment {fid} is not part of upload {upload_id}")
                paths.append(self._path(fid))
        else:
            paths = await anyio.to_thread.run_sync(lambda: list(self._iter_files(upload_id)))
        return await anyio.to_thread.run_sync(self._delete, paths)

    def _list(self, upload_id: str) -> list[StoredFragment]:
        out = []
        now = time.time()
        for path in self._iter_files(upload_id):
            try:
                with path.open("rb") as f:
                    mtime = os.fstat(f.fileno()).st_mtime
                    try:
                        size, digest = _read_footer(f, path)
                    except FragmentCorrupt:
                        size, digest = max(0, path.stat().st_size - FOOTER_SIZE), b""
            except FileNotFoundError:  # deleted while we listed
                continue
            out.append(StoredFragment(path.name, size, digest.hex(), max(0.0, now - mtime)))
        return out

    def _verify(self, fragment_id: str) -> tuple[str, int, str]:
        path = self._path(fragment_id)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return "missing", 0, ""
        with f:
            try:
                size, expected = _read_footer(f, path)
            except FragmentCorrupt as exc:
                return f"corrupt: {exc.message}", 0, ""
            h = hashlib.sha256()
            left = size
            while left:
                data = f.read(min(left, 1 << 20))
                if not data:
                    return "corrupt: truncated", size, ""
                h.update(data)
                left -= len(data)
        if h.digest() != expected:
            return "corrupt: checksum mismatch", size, h.hexdigest()
        return "", size, h.hexdigest()

    async def verify(self, fragment_id: str) -> tuple[str, int, str]:
        """Read a whole fragment; return (problem or "", size, sha256 of the data read)."""
        return await anyio.to_thread.run_sync(self._verify, fragment_id)

    async def list_fragments(self, upload_id: str = "") -> list[StoredFragment]:
        """Every stored fragment (or those of one upload), with sizes and checksums."""
        if upload_id:
            check_upload_id(upload_id)
        return await anyio.to_thread.run_sync(self._list, upload_id)


class FragmentReader:
    """Reads one fragment in chunks, verifying its sha256 before the last chunk."""

    def __init__(self, fragment_id: str, f: BinaryIO, size: int, digest: bytes) -> None:
        self.fragment_id = fragment_id
        self.size = size
        self._f = f
        self._digest = digest

    def _read(self, n: int, h: hashlib._Hash) -> bytes:
        data = self._f.read(n)
        h.update(data)
        return data

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """Yield the data; the final chunk is held back until the checksum matched."""
        h = hashlib.sha256()
        left = self.size
        pending: bytes | None = None
        while left:
            data = await anyio.to_thread.run_sync(self._read, min(chunk_size, left), h)
            if not data:
                raise FragmentCorrupt(f"{self.fragment_id}: truncated")
            left -= len(data)
            if pending is not None:
                yield pending
            pending = data
        if h.digest() != self._digest:
            raise FragmentCorrupt(f"{self.fragment_id}: checksum mismatch")
        if pending is not None:
            yield pending


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
    _fsync_dir(root)
    return bucket_id


async def open_store(root: Path, *, capacity: int = 0, fsync: bool = True) -> FragmentStore:
    """Open (creating on first start) the store at ``root``; clears unfinished Puts."""
    bucket_id = await anyio.to_thread.run_sync(_load_identity, root)
    store = FragmentStore(root, bucket_id, capacity, fsync)
    await anyio.to_thread.run_sync(store._scan)
    return store
