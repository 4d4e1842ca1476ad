"""A bucket's fragment store on its local filesystem (anyio, run here under trio)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from karma8.bucket.store import (
    FOOTER_SIZE,
    FragmentCorrupt,
    FragmentMissing,
    FragmentStore,
    NoSpace,
    open_store,
    overhead,
)
from karma8.bucket.volumes import scan
from karma8.core.checksums import unit_crcs
from karma8.core.records import Piece, StoredFragment
from karma8.errors import BadRequest

UID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"

HOSTILE_IDS = [
    "../../etc/passwd",
    "x" * 32 + ".0/../..",
    f"{UID}.0/../../x",
    f"../{UID}.0",
    f"/{UID}.0",
    f"{UID}.64",
    f"{UID.upper()}.0",
    f"{UID}.0\n",
    "",
]


def _files(root: Path) -> set[str]:
    """Every regular file under ``root``, relative to it, but the volumes (see _needles)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "volumes"}


def _needles(root: Path) -> list[str]:
    """The fragment ids held as needles in the volumes under ``root``, as read from disk."""
    return sorted(scan(root / "volumes"))


def _data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _paths(root: Path) -> set[Path]:
    """Every file and directory under ``root``."""
    return set(root.rglob("*"))


async def _put(
    store: FragmentStore, fragment_id: str, data: bytes, frame: int = 1000, announce: int | None = None
) -> StoredFragment:
    size = len(data) if announce is None else announce
    async with store.open_writer(fragment_id, size) as writer:
        for i in range(0, len(data), frame):
            await writer.write(data[i : i + frame])
        return await writer.commit()


async def _get(store: FragmentStore, fragment_id: str, chunk_size: int = 4096) -> bytes:
    async with store.open_reader(fragment_id) as reader:
        return b"".join([chunk async for chunk in reader.chunks(chunk_size)])


async def _read_into(chunks: list[bytes], store: FragmentStore, fragment_id: str, chunk_size: int) -> None:
    """Read a fragment, keeping every chunk that was yielded before any error."""
    async with store.open_reader(fragment_id) as reader:
        async for chunk in reader.chunks(chunk_size):
            chunks.append(chunk)


def _fragment_path(root: Path, fragment_id: str) -> Path:
    return root / "fragments" / fragment_id[:2] / fragment_id


@pytest.fixture
async def store(tmp_path: Path) -> FragmentStore:
    return await open_store(tmp_path / "bucket", fsync=False)


# -- put and get ---------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [False, True])
async def test_put_then_get(tmp_path: Path, fsync: bool) -> None:
    root = tmp_path / "bucket"
    store = await open_store(root, fsync=fsync)
    data = _data(10_000)

    stored = await _put(store, f"{UID}.3", data, frame=777)

    assert stored == StoredFragment(f"{UID}.3", len(data), hashlib.sha256(data).hexdigest())
    assert _files(root) == {"bucket-id", f"fragments/01/{UID}.3"}
    assert _fragment_path(root, f"{UID}.3").stat().st_size == len(data) + FOOTER_SIZE
    assert await _get(store, f"{UID}.3") == data


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 1_999, 2_000, 2_001, 1 << 20])
async def test_read_in_any_chunk_size(store: FragmentStore, chunk_size: int) -> None:
    data = _data(2_000, seed=chunk_size)
    await _put(store, f"{UID}.0", data)

    async with store.open_reader(f"{UID}.0") as reader:
        assert reader.size == len(data)
        chunks = [chunk async for chunk in reader.chunks(chunk_size)]

    assert b"".join(chunks) == data
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_size


async def test_empty_fragment(store: FragmentStore) -> None:
    stored = await _put(store, f"{UID}.0", b"")

    assert stored == StoredFragment(f"{UID}.0", 0, hashlib.sha256(b"").hexdigest())
    assert await _get(store, f"{UID}.0") == b""


async def test_missing_fragment(store: FragmentStore) -> None:
    with pytest.raises(FragmentMissing):
        await _get(store, f"{UID}.0")


async def test_put_replaces_an_existing_fragment(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"a" * 100)
    await _put(store, f"{UID}.0", b"b" * 40)

    assert await _get(store, f"{UID}.0") == b"b" * 40
    usage = store.usage()
    assert (usage.used, usage.fragments) == (40, 1)


# -- failed writes leave nothing -----------------------------------------------------


async def test_writing_more_than_announced(store: FragmentStore) -> None:
    with pytest.raises(BadRequest, match="more than the announced"):
        await _put(store, f"{UID}.0", b"x" * 11, frame=6, announce=10)

    assert _files(store.root) == {"bucket-id"}
    assert store.usage().used == 0


async def test_commit_short(store: FragmentStore) -> None:
    with pytest.raises(BadRequest, match="got 9 of 10 bytes"):
        await _put(store, f"{UID}.0", b"x" * 9, announce=10)

    assert list((store.root / "tmp").iterdir()) == []
    assert list((store.root / "fragments").rglob("*")) == []
    assert store.usage().fragments == 0


async def test_exception_in_the_block_leaves_no_file(store: FragmentStore) -> None:
    class Boom(Exception):
        pass

    seen: list[set[str]] = []

    async def fail_midway() -> None:
        async with store.open_writer(f"{UID}.0", 10) as writer:
            await writer.write(b"x" * 5)
            seen.append(_files(store.root))
            raise Boom

    with pytest.raises(Boom):
        await fail_midway()

    assert len(seen[0]) == 2  # bucket-id and the temporary file, while writing
    assert _files(store.root) == {"bucket-id"}
    with pytest.raises(FragmentMissing):
        await _get(store, f"{UID}.0")


async def test_cancelled_write_leaves_no_file(store: FragmentStore) -> None:
    with trio.CancelScope() as scope:
        async with store.open_writer(f"{UID}.0", 10) as writer:
            await writer.write(b"x" * 5)
            scope.cancel()
            await writer.write(b"x" * 5)
            await writer.commit()

    assert scope.cancelled_caught
    assert _files(store.root) == {"bucket-id"}
    assert store.usage().fragments == 0


async def test_writer_open_without_writes_leaves_no_file(store: FragmentStore) -> None:
    async with store.open_writer(f"{UID}.0", 10):
        pass

    assert _files(store.root) == {"bucket-id"}


# -- corruption ------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 4_999, 9_999])
async def test_flipped_byte_is_detected_before_the_last_chunk(store: FragmentStore, offset: int) -> None:
    data = _data(10_000)
    await _put(store, f"{UID}.0", data)
    path = _fragment_path(store.root, f"{UID}.0")
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)

    chunks: list[bytes] = []
    with pytest.raises(FragmentCorrupt, match="checksum"):
        await _read_into(chunks, store, f"{UID}.0", 1000)

    # Chunks before the final one may have gone out; the final one never does.
    assert b"".join(chunks) == raw[:9_000]


async def test_flipped_byte_in_a_single_chunk_fragment_yields_nothing(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"hello")
    path = _fragment_path(store.root, f"{UID}.0")
    raw = bytearray(path.read_bytes())
    raw[1] ^= 0x20
    path.write_bytes(raw)

    chunks: list[bytes] = []
    with pytest.raises(FragmentCorrupt):
        await _read_into(chunks, store, f"{UID}.0", 1 << 20)
    assert chunks == []


@pytest.mark.parametrize("damage", ["truncate", "extend", "magic", "footer_size", "tiny"])
async def test_damaged_footer(store: FragmentStore, damage: str) -> None:
    await _put(store, f"{UID}.0", b"0123456789")
    path = _fragment_path(store.root, f"{UID}.0")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        del raw[3]
    elif damage == "extend":
        raw[:0] = b"!"
    elif damage == "magic":
        raw[-FOOTER_SIZE] ^= 0xFF
    elif damage == "footer_size":
        raw[-FOOTER_SIZE + 8] ^= 0x01
    else:
        raw = raw[:10]
    path.write_bytes(raw)

    with pytest.raises(FragmentCorrupt):
        await _get(store, f"{UID}.0", 4)


# -- hostile ids ---------------------------------------------------------------------


@pytest.mark.parametrize("fragment_id", HOSTILE_IDS)
async def test_hostile_fragment_ids(tmp_path: Path, fragment_id: str) -> None:
    root = tmp_path / "deep" / "bucket"
    store = await open_store(root, fsync=False)
    before = _paths(tmp_path)

    with pytest.raises(BadRequest):
        await _put(store, fragment_id, b"x")
    with pytest.raises(BadRequest):
        await _get(store, fragment_id)

    assert _paths(tmp_path) == before


@pytest.mark.parametrize("upload_id", ["../../etc", UID[:-1], UID + "/..", f"{UID}.0", "*", ""])
async def test_hostile_upload_ids(store: FragmentStore, upload_id: str) -> None:
    await _put(store, f"{UID}.0", b"keep")

    with pytest.raises(BadRequest):
        await store.delete_upload(upload_id)
    if upload_id:  # "" lists everything, by design
        with pytest.raises(BadRequest):
            await store.list_fragments(upload_id)

    assert await _get(store, f"{UID}.0") == b"keep"


# -- delete, list, usage ---------------------------------------------------------------


async def test_delete_upload_removes_only_that_upload(store: FragmentStore) -> None:
    for part in range(3):
        await _put(store, f"{UID}.{part}", b"u" * 100)
    await _put(store, f"{OTHER}.0", b"o" * 30)
    # Same shard directory as UID, different upload.
    neighbour = UID[:2] + "f" * 30
    await _put(store, f"{neighbour}.1", b"n" * 7)
    assert store.usage().used == 337
    assert store.usage().fragments == 5

    assert await store.delete_upload(UID) == (3, 300)

    assert (store.usage().used, store.usage().fragments) == (37, 2)
    for part in range(3):
        with pytest.raises(FragmentMissing):
            await _get(store, f"{UID}.{part}")
    assert await _get(store, f"{OTHER}.0") == b"o" * 30
    assert await _get(store, f"{neighbour}.1") == b"n" * 7
    assert await store.delete_upload(UID) == (0, 0)
    assert await store.delete_upload("9" * 32) == (0, 0)


async def _listed(store: FragmentStore, upload_id: str = "") -> list[StoredFragment]:
    """The listing without ages (which only listings carry), sorted by id."""
    listed = await store.list_fragments(upload_id)
    assert all(0 <= f.age < 60 for f in listed)
    return sorted((dataclasses.replace(f, age=0.0) for f in listed), key=lambda f: f.fragment_id)


async def test_list_fragments(store: FragmentStore) -> None:
    assert await store.list_fragments() == []
    a = await _put(store, f"{UID}.0", b"aaa")
    b = await _put(store, f"{UID}.11", b"bbbbbb")
    c = await _put(store, f"{OTHER}.5", b"")

    assert await _listed(store) == sorted([a, b, c], key=lambda f: f.fragment_id)
    assert await _listed(store, UID) == [a, b]
    assert await _listed(store, OTHER) == [c]
    assert await store.list_fragments("9" * 32) == []


async def _walk(store: FragmentStore, limit: int, batch: int) -> list[list[str]]:
    """Every page of a paged listing (fragment ids), as the API asks for them."""
    pages: list[list[str]] = []
    after = ""
    while True:
        page = [f.fragment_id async for chunk in store.iter_fragments(after, limit, batch) for f in chunk]
        pages.append(page)
        if len(page) < limit:
            return pages
        after = page[-1].partition(".")[0]


async def test_a_listing_comes_in_order_in_pages_of_whole_uploads(store: FragmentStore) -> None:
    rng = random.Random(7)
    uploads = sorted({f"{rng.getrandbits(128):032x}" for _ in range(40)})
    fids = []
    for upload_id in uploads:
        for part in rng.sample(range(12), rng.choice((1, 1, 2, 3))):
            await _put(store, f"{upload_id}.{part}", b"x")
            fids.append(f"{upload_id}.{part}")
    fids.sort()  # the order of names: upload ids, then parts as text (".10" before ".2")

    listed = [f.fragment_id async for chunk in store.iter_fragments(batch=3) for f in chunk]
    assert listed == fids
    assert max([len(chunk) async for chunk in store.iter_fragments(batch=3)]) == 3

    pages = await _walk(store, limit=3, batch=2)
    assert [fid for page in pages for fid in page] == fids
    assert len(pages) > 5
    for page in pages[:-1]:
        assert len(page) >= 3
        last = page[-1].partition(".")[0]
        assert sum(f.startswith(last) for f in fids) == sum(f.startswith(last) for f in page)
    middle = uploads[len(uploads) // 2]
    after = [f.fragment_id async for chunk in store.iter_fragments(middle) for f in chunk]
    assert after == [f for f in fids if f.partition(".")[0] > middle]


async def test_a_directory_listed_again_sees_what_changed_since(store: FragmentStore) -> None:
    # Every fragment in one fan-out directory, last changed long ago: the pages of a
    # walk reuse its sorted names; a fragment added then is listed all the same.
    fids = [f"{UID[:2]}{n:030x}.0" for n in range(10)]
    for fid in fids:
        await _put(store, fid, b"x")
    shard = store.root / "fragments" / UID[:2]
    os.utime(shard, (time.time() - 10, time.time() - 10))
    assert [fid for page in await _walk(store, limit=3, batch=2) for fid in page] == fids
    await _put(store, f"{UID[:2]}{5:030x}.1", b"y")
    walked = [fid for page in await _walk(store, limit=3, batch=2) for fid in page]
    assert walked == sorted([*fids, f"{UID[:2]}{5:030x}.1"])


async def test_listed_age_is_time_since_commit(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"old")
    then = time.time() - 7200
    os.utime(_fragment_path(store.root, f"{UID}.0"), (then, then))
    (listed,) = await store.list_fragments(UID)
    assert 7200 <= listed.age < 7260


async def test_delete_named_fragments_only(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"a")
    await _put(store, f"{UID}.1", b"b")
    assert await store.delete_upload(UID, [f"{UID}.1"]) == (1, 1)
    assert [f.fragment_id for f in await store.list_fragments(UID)] == [f"{UID}.0"]
    with pytest.raises(BadRequest):
        await store.delete_upload(UID, [f"{OTHER}.0"])  # not part of that upload


async def test_verify_reads_the_whole_fragment(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"0123456789")
    assert await store.verify(f"{UID}.0") == ("", 10, hashlib.sha256(b"0123456789").hexdigest())
    assert (await store.verify(f"{UID}.1"))[0] == "missing"
    path = _fragment_path(store.root, f"{UID}.0")
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    assert (await store.verify(f"{UID}.0"))[0] == "corrupt: checksum mismatch"


async def test_list_fragments_reports_corrupt_ones_without_checksum(store: FragmentStore) -> None:
    await _put(store, f"{UID}.0", b"0123456789")
    path = _fragment_path(store.root, f"{UID}.0")
    path.write_bytes(path.read_bytes()[:-1])

    # The size is what the file holds beyond a footer's length.
    assert await _listed(store, UID) == [StoredFragment(f"{UID}.0", 9, "")]


async def test_usage_counts_data_bytes(store: FragmentStore) -> None:
    empty = store.usage()
    assert (empty.used, empty.fragments) == (0, 0)
    assert empty.capacity > 0

    await _put(store, f"{UID}.0", b"x" * 1000)
    await _put(store, f"{UID}.1", b"x" * 24)

    usage = store.usage()
    assert (usage.used, usage.fragments) == (1024, 2)


async def test_capacity_limits_free_space(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "bucket", capacity=100, fsync=False)
    assert (store.usage().capacity, store.usage().free) == (100, 100)

    await _put(store, f"{UID}.0", b"x" * 60)
    assert (store.usage().used, store.usage().free) == (60, 40)

    with pytest.raises(NoSpace):
        await _put(store, f"{UID}.1", b"y" * 41)
    assert _files(store.root) == {"bucket-id", f"fragments/01/{UID}.0"}

    await _put(store, f"{UID}.1", b"y" * 40)
    assert store.usage().free == 0

    await store.delete_upload(UID)
    assert (store.usage().used, store.usage().free) == (0, 100)


# -- startup ---------------------------------------------------------------------------


async def test_identity_is_stable(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    first = await open_store(root, fsync=False)
    second = await open_store(root, fsync=False)
    other = await open_store(tmp_path / "other", fsync=False)

    assert first.bucket_id
    assert second.bucket_id == first.bucket_id
    assert other.bucket_id != first.bucket_id
    assert (root / "bucket-id").read_text().strip() == first.bucket_id


async def test_reopen_clears_tmp_and_rebuilds_usage(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    store = await open_store(root, fsync=False)
    await _put(store, f"{UID}.0", b"x" * 50)
    await _put(store, f"{OTHER}.2", b"y" * 25)
    (root / "tmp" / f"{UID}.1.deadbeef").write_bytes(b"half a fragment")
    (root / "tmp" / "nested").mkdir()
    (root / "tmp" / "nested" / "junk").write_bytes(b"junk")

    reopened = await open_store(root, fsync=False)

    assert list((root / "tmp").iterdir()) == []
    assert (reopened.usage().used, reopened.usage().fragments) == (75, 2)
    assert await _get(reopened, f"{UID}.0") == b"x" * 50


# -- whole fragments in one thread call ---------------------------------------------------


async def test_put_whole_then_read_whole(store: FragmentStore) -> None:
    data = _data(11_000)
    stored = await store.put_whole(f"{UID}.2", data)

    assert stored == StoredFragment(f"{UID}.2", len(data), hashlib.sha256(data).hexdigest())
    assert _files(store.root) == {"bucket-id"}
    assert _needles(store.root) == [f"{UID}.2"]
    assert (await store.read_whole(f"{UID}.2", len(data))) == Piece(data, [])
    assert await store.read_whole(f"{UID}.2", len(data) - 1) is None  # too big: stream it
    assert await _get(store, f"{UID}.2") == data  # read as a streamed Put's file is
    assert (store.usage().used, store.usage().fragments) == (len(data), 1)

    await store.put_whole(f"{UID}.2", b"shorter")  # replaces, and the counters follow
    assert (store.usage().used, store.usage().fragments) == (7, 1)
    assert (await store.read_whole(f"{UID}.2", 100)) == Piece(b"shorter", [])


async def test_put_whole_refusals_leave_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "bucket", capacity=100, fsync=False)
    before = _paths(store.root)
    with pytest.raises(NoSpace):
        await store.put_whole(f"{UID}.0", b"x" * 101)
    for hostile in HOSTILE_IDS:
        with pytest.raises(BadRequest):
            await store.put_whole(hostile, b"x")
    assert _paths(store.root) == before


async def test_put_whole_failing_on_disk_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    store = await open_store(root, fsync=False)
    await store.put_whole(f"{UID}.0", b"kept")
    os.close(store.volumes._writer)  # the next write fails (EBADF), as a failing disk would
    with pytest.raises(OSError, match="Bad file descriptor"):
        await store.put_whole(f"{UID}.1", b"data")
    assert (store.usage().used, store.usage().fragments) == (4, 1)
    with pytest.raises(FragmentMissing):
        await store.read_whole(f"{UID}.1", 100)
    assert _files(root) == {"bucket-id"}
    assert _needles(root) == [f"{UID}.0"]


async def test_cancelled_put_whole_commits_or_leaves_nothing(store: FragmentStore) -> None:
    for attempt in range(20):
        fid = f"{UID}.{attempt}"
        with trio.CancelScope() as scope:
            if attempt % 2:
                scope.cancel()  # before the call starts; otherwise while it runs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.put_whole, fid, b"x" * 100_000)
                await trio.lowlevel.checkpoint()
                scope.cancel()
        assert _files(store.root) == {"bucket-id"}
        if fid in _needles(store.root):
            assert (await store.read_whole(fid, 100_000)) == Piece(b"x" * 100_000, [])
        else:
            assert store.volumes.locate(fid) is None


async def test_read_whole_checks_the_data(store: FragmentStore) -> None:
    with pytest.raises(FragmentMissing):
        await store.read_whole(f"{UID}.0", 100)
    await store.put_whole(f"{UID}.0", b"hello")
    path, offset, _ = scan(store.root / "volumes")[f"{UID}.0"]
    raw = bytearray(path.read_bytes())
    raw[offset + 1] ^= 0x20
    path.write_bytes(raw)
    with pytest.raises(FragmentCorrupt, match="checksum"):
        await store.read_whole(f"{UID}.0", 100)
    assert (await store.verify(f"{UID}.0"))[0] == "corrupt: checksum mismatch"
    path.write_bytes(raw[: offset + 3])
    with pytest.raises(FragmentCorrupt):
        await store.read_whole(f"{UID}.0", 100)


# -- format 2: a crc32c per unit -------------------------------------------------------


async def _put_units(store: FragmentStore, fragment_id: str, data: bytes, unit: int) -> StoredFragment:
    async with store.open_writer(fragment_id, len(data), unit) as writer:
        for i in range(0, len(data), 3 * unit):  # three units per write
            piece = data[i : i + 3 * unit]
            await writer.write(piece, unit_crcs(piece, unit))
        return await writer.commit()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 25_000])
async def test_units_round_trip(tmp_path: Path, size: int) -> None:
    root = tmp_path / "bucket"
    store = await open_store(root, fsync=False)
    data = _data(size, seed=size)
    stored = await _put_units(store, f"{UID}.7", data, unit=1000)

    assert stored == StoredFragment(f"{UID}.7", size, hashlib.sha256(data).hexdigest())
    assert _fragment_path(root, f"{UID}.7").stat().st_size == size + overhead(size, 1000)
    async with store.open_reader(f"{UID}.7") as reader:
        assert reader.unit == 1000
        pieces = [p async for p in reader.pieces(2500, first_unit=1)]
    assert b"".join(p.data for p in pieces) == data[1000:]
    assert all(len(p.data) == 2000 for p in pieces[:-1])  # whole units, at most 2500 bytes
    assert [c for p in pieces for c in p.crcs] == unit_crcs(data, 1000)[1:]
    assert await store.read_whole(f"{UID}.7", size, first_unit=2) == Piece(
        data[2000:], unit_crcs(data, 1000)[2:]
    )
    assert await store.verify(f"{UID}.7") == ("", size, hashlib.sha256(data).hexdigest())
    assert [f.size for f in await store.list_fragments(UID)] == [size]
    assert (await open_store(root, fsync=False)).usage().used == size  # the scan reads the footer


async def test_a_flipped_bit_is_reported_at_its_unit(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    store = await open_store(root, fsync=False)
    data = _data(10_000)
    await _put_units(store, f"{UID}.0", data, unit=1000)
    path = _fragment_path(root, f"{UID}.0")
    raw = bytearray(path.read_bytes())
    raw[4321] ^= 0x10
    path.write_bytes(raw)

    got: list[bytes] = []
    with pytest.raises(FragmentCorrupt, match="unit 4 fails its checksum"):
        await _read_into(got, store, f"{UID}.0", 1000)
    assert got == [data[i : i + 1000] for i in range(0, 4000, 1000)]  # the good units came first
    async with store.open_reader(f"{UID}.0") as reader:  # the units after it still read
        assert b"".join([p.data async for p in reader.pieces(1000, first_unit=5)]) == data[5000:]
    with pytest.raises(FragmentCorrupt, match="unit 4"):
        await store.read_whole(f"{UID}.0", 10_000)
    problem, _, _ = await store.verify(f"{UID}.0")
    assert problem == "corrupt: unit 4 fails its checksum"


async def test_a_unit_with_a_wrong_checksum_is_refused_on_arrival(store: FragmentStore) -> None:
    data = _data(3000)
    crcs = unit_crcs(data, 1000)
    crcs[1] ^= 1
    with pytest.raises(FragmentCorrupt, match="unit 1 arrived with a wrong checksum"):
        async with store.open_writer(f"{UID}.0", 3000, 1000) as writer:
            await writer.write(data, crcs)
    with pytest.raises(FragmentCorrupt, match="unit 0"):
        await store.put_whole(f"{UID}.1", data, 1000, crcs[:0])  # checksums missing
    with pytest.raises(BadRequest, match="not whole units"):
        async with store.open_writer(f"{UID}.2", 3000, 1000) as writer:
            await writer.write(data[:1500], unit_crcs(data[:1500], 1000))
    with pytest.raises(BadRequest, match="without a unit"):
        await store.put_whole(f"{UID}.3", data, 0, unit_crcs(data, 1000))
    await store.put_whole(f"{UID}.4", data)
    with pytest.raises(BadRequest, match="format 1"):
        await store.read_whole(f"{UID}.4", 3000, first_unit=1)
    assert _files(store.root) == {"bucket-id"}
    assert _needles(store.root) == [f"{UID}.4"]
    assert store.usage().used == 3000
