"""Small fragments as needles in a bucket's volumes: group commit, replay, torn tails,
compaction, and fragment files of earlier releases beside them (anyio, run under trio)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from karma8.bucket.errors import FragmentCorrupt
from karma8.bucket.store import FragmentStore, open_store
from karma8.bucket.volumes import scan
from karma8.core.checksums import unit_crcs
from karma8.core.needles import encode_put, needle_size, volume_name
from karma8.core.records import Piece
from tests.polling import poll_until

UNIT = 1000


def _uid(i: int) -> str:
    return f"{i:032x}"


def _fid(i: int, part: int = 0) -> str:
    return f"{_uid(i)}.{part}"


def _data(i: int, size: int = 2500) -> bytes:
    return random.Random(i).randbytes(size)


async def _open(root: Path, volume_size: int = 1 << 30) -> FragmentStore:
    return await open_store(root, fsync=True, volume_size=volume_size)


async def _put(store: FragmentStore, i: int, size: int = 2500) -> None:
    data = _data(i, size)
    await store.put_whole(_fid(i), data, UNIT, unit_crcs(data, UNIT))


async def _held(store: FragmentStore) -> dict[str, bytes]:
    """Every fragment the store lists, read back whole."""
    out = {}
    for f in await store.list_fragments():
        piece = await store.read_whole(f.fragment_id, 1 << 20)
        assert piece is not None
        out[f.fragment_id] = piece.data
    return out


def _volumes(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "volumes").iterdir())


# -- group commit ----------------------------------------------------------------------


async def test_concurrent_puts_share_flushes(tmp_path: Path) -> None:
    store = await _open(tmp_path / "b")
    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(_put, store, i)

    stats = store.volumes.stats
    assert stats.needles == 64
    assert stats.batches < 64 / 4, "64 concurrent puts should have shared flushes"
    assert {fid: data for fid, data in (await _held(store)).items()} == {_fid(i): _data(i) for i in range(64)}
    assert (store.usage().used, store.usage().fragments) == (64 * 2500, 64)


async def test_a_cancelled_put_not_yet_written_is_never_written(tmp_path: Path) -> None:
    store = await _open(tmp_path / "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_put, store, 1)  # leads: its write is under way ...
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as queued:  # ... and this one is cancelled while it waits
            queued.cancel()
            await _put(store, 3)
        assert queued.cancelled_caught
    assert store.volumes.locate(_fid(3)) is None
    reopened = await _open(tmp_path / "b")
    assert reopened.volumes.locate(_fid(3)) is None
    assert reopened.volumes.locate(_fid(1)) is not None


# -- replay ----------------------------------------------------------------------------


async def test_reopen_replays_puts_overwrites_and_deletes(tmp_path: Path) -> None:
    root = tmp_path / "b"
    store = await _open(root, volume_size=20_000)  # several volumes
    for i in range(20):
        await _put(store, i)
    await store.put_whole(_fid(3), b"replaced")
    await store.delete_upload(_uid(5))
    await store.delete_upload(_uid(7), [_fid(7)])
    before = await _held(store)
    usage = store.usage()
    store.close()

    reopened = await _open(root, volume_size=20_000)

    assert len(_volumes(root)) > 2
    assert await _held(reopened) == before
    assert before[_fid(3)] == b"replaced"
    assert _fid(5) not in before
    assert _fid(7) not in before
    assert (
        (reopened.usage().used, reopened.usage().fragments)
        == (usage.used, usage.fragments)
        == (
            17 * 2500 + 8,
            18,
        )
    )


async def test_a_torn_tail_is_truncated_at_start(tmp_path: Path) -> None:
    root = tmp_path / "b"
    store = await _open(root)
    for i in range(3):
        await _put(store, i)
    store.close()
    path = root / "volumes" / volume_name(1)
    good = path.stat().st_size
    # A crash in the middle of the next batch: one whole needle, one cut short.
    with path.open("ab") as f:
        f.write(b"".join(encode_put(_fid(8), b"x" * 100, 0, (), hashlib.sha256(b"x" * 100).digest(), 1.0)))
        f.write(b"".join(encode_put(_fid(9), b"y" * 3000, 0, (), b"\0" * 32, 1.0))[:1000])

    reopened = await _open(root)

    assert path.stat().st_size == good + needle_size(100, 0)
    assert sorted(await _held(reopened)) == [_fid(0), _fid(1), _fid(2), _fid(8)]
    await _put(reopened, 4)  # appends where the good needles end
    assert (await reopened.read_whole(_fid(4), 1 << 20)) == Piece(_data(4), unit_crcs(_data(4), UNIT))
    assert sorted(scan(root / "volumes")) == [_fid(i) for i in (0, 1, 2, 4, 8)]


def _flip(root: Path, fid: str, at: int) -> Path:
    """Flip one bit of byte ``at`` of a needle's data, in place (bit rot); its volume."""
    needle = scan(root / "volumes")[fid]
    with needle.path.open("r+b") as f:
        f.seek(needle.data_offset + at)
        byte = f.read(1)
        f.seek(needle.data_offset + at)
        f.write(bytes([byte[0] ^ 1]))
    return needle.path


@pytest.mark.parametrize(("damaged", "at", "unit"), [(2, 10, 0), (1, 1500, 1)], ids=["last", "middle"])
async def test_a_damaged_needle_is_kept_and_reported(
    tmp_path: Path, damaged: int, at: int, unit: int
) -> None:
    """A sound header over bad data may be rot in an acknowledged needle: never truncated,
    nor the needles after it."""
    root = tmp_path / "b"
    store = await _open(root)
    for i in range(3):
        await _put(store, i)
    store.close()
    size = (root / "volumes" / volume_name(1)).stat().st_size
    path = _flip(root, _fid(damaged), at)

    reopened = await _open(root)

    assert path.stat().st_size == size, "acknowledged needles truncated as a torn tail"
    assert sorted(scan(root / "volumes")) == [_fid(0), _fid(1), _fid(2)]
    assert (await reopened.verify(_fid(damaged)))[0] == f"corrupt: unit {unit} fails its checksum"
    for i in {0, 1, 2} - {damaged}:
        piece = await reopened.read_whole(_fid(i), 1 << 20)
        assert piece is not None
        assert piece.data == _data(i)
    await _put(reopened, damaged)  # repair writes it again: a new needle shadows the damaged one
    good = Piece(_data(damaged), unit_crcs(_data(damaged), UNIT))
    assert (await reopened.read_whole(_fid(damaged), 1 << 20)) == good


async def test_a_damaged_needle_is_reported_not_served(tmp_path: Path) -> None:
    store = await _open(tmp_path / "b")
    await _put(store, 1)
    _flip(tmp_path / "b", _fid(1), 1500)
    with pytest.raises(FragmentCorrupt, match="unit 1 fails its checksum"):
        await store.read_whole(_fid(1), 1 << 20)
    assert (await store.verify(_fid(1)))[0] == "corrupt: unit 1 fails its checksum"
    (listed,) = await store.list_fragments(_uid(1))
    assert listed.size == 2500


async def test_a_needle_is_read_from_the_page_cache_or_else_in_a_thread(tmp_path: Path) -> None:
    store = await _open(tmp_path / "b")
    await _put(store, 1)
    piece, _ = store.volumes.read(_fid(1), cached=True)  # just written: in the page cache
    assert piece.data == _data(1)

    def evicted() -> bool:
        for volume in (tmp_path / "b" / "volumes").glob("*.dat"):
            fd = os.open(volume, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        try:
            store.volumes.read(_fid(1), cached=True)
        except BlockingIOError:
            return True
        return False

    try:  # the kernel may keep a page it just wrote back for a moment
        poll_until(evicted, "the volume to leave the page cache", deadline=5)
        dropped = True
    except AssertionError:
        dropped = False
    again = await store.read_whole(_fid(1), 1 << 20)  # from the disk, in a worker thread
    assert again is not None
    assert again.data == _data(1)
    store.close()
    if not dropped:
        assert _filesystem(tmp_path) == "tmpfs", "the page cache kept the volume"
        pytest.skip("tmpfs keeps the volume in memory: no read from the disk to go around")


def _filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


# -- compaction ------------------------------------------------------------------------


async def test_compaction_keeps_the_live_and_reclaims_the_dead(tmp_path: Path) -> None:
    root = tmp_path / "b"
    store = await _open(root, volume_size=30_000)
    for i in range(30):
        await _put(store, i)
    for i in range(30):
        if i % 3:
            await store.delete_upload(_uid(i))
    before = await _held(store)
    sizes = {p.name: p.stat().st_size for p in (root / "volumes").iterdir()}

    reclaimed = await store.compact(0.5)

    assert reclaimed > 0
    after = {p.name: p.stat().st_size for p in (root / "volumes").iterdir()}
    assert sum(after.values()) == sum(sizes.values()) - reclaimed
    assert await _held(store) == before == {_fid(i): _data(i) for i in range(0, 30, 3)}
    store.close()
    assert await _held(await _open(root, volume_size=30_000)) == before


async def test_a_deleted_fragment_never_comes_back(tmp_path: Path) -> None:
    """Tombstones outlive the needles they shadow, through compactions in any order."""
    root = tmp_path / "b"
    store = await _open(root, volume_size=12_000)
    for i in range(12):  # volumes 1-3 hold puts of 0-11
        await _put(store, i)
    for i in range(12):  # tombstones in later volumes
        if i % 2:
            await store.delete_upload(_uid(i))
    for i in range(12, 24):  # fill more volumes so the tombstones' volume is sealed
        await _put(store, i)
    expected = {_fid(i): _data(i) for i in range(24) if i >= 12 or i % 2 == 0}

    # Newest sealed first, one at a time, each followed by a restart: the tombstones must
    # stay while an older volume still holds a put they shadow.
    for _ in range(2):
        for number in sorted(store.volumes.garbage(), reverse=True):
            await trio.to_thread.run_sync(store.volumes.compact, number)
            assert await _held(store) == expected
            store.close()
            store = await _open(root, volume_size=12_000)
            assert await _held(store) == expected
    assert store.volumes.stats.compactions == 0  # counted since this open


async def test_a_compaction_cut_short_leaves_the_volume_whole(tmp_path: Path) -> None:
    root = tmp_path / "b"
    store = await _open(root, volume_size=10_000)
    for i in range(8):
        await _put(store, i)
    await store.delete_upload(_uid(0))
    store.close()
    first = root / "volumes" / volume_name(1)
    (first.with_name(first.name + ".compact")).write_bytes(first.read_bytes()[:1000])  # crashed mid-copy

    reopened = await _open(root, volume_size=10_000)

    assert not any(p.name.endswith(".compact") for p in (root / "volumes").iterdir())
    assert await _held(reopened) == {_fid(i): _data(i) for i in range(1, 8)}


async def test_reads_during_compaction_see_whole_fragments(tmp_path: Path) -> None:
    store = await _open(tmp_path / "b", volume_size=40_000)
    for i in range(40):
        await _put(store, i)
    for i in range(0, 40, 2):
        await store.delete_upload(_uid(i))
    survivors = [i for i in range(40) if i % 2]

    async def read_all() -> None:
        for _ in range(5):
            for i in survivors:
                piece = await store.read_whole(_fid(i), 1 << 20)
                assert piece is not None
                assert piece.data == _data(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        nursery.start_soon(store.compact, 0.4)


# -- fragment files of earlier releases --------------------------------------------------


async def _put_file(store: FragmentStore, fid: str, data: bytes) -> None:
    async with store.open_writer(fid, len(data), UNIT) as writer:
        await writer.write(data, unit_crcs(data, UNIT))
        await writer.commit()


async def test_a_bucket_of_the_previous_release_opens_and_serves(tmp_path: Path) -> None:
    root = tmp_path / "b"
    old = await _open(root)
    await _put_file(old, _fid(1), _data(1))  # streamed Puts: files, as every fragment was
    await _put_file(old, _fid(2), _data(2))
    old.close()
    os.rename(root / "volumes", tmp_path / "gone")  # the previous release had no volumes

    store = await _open(root)

    assert await _held(store) == {_fid(1): _data(1), _fid(2): _data(2)}
    await _put(store, 3)  # new small fragments go to a volume beside the files
    await store.put_whole(_fid(2), _data(2), UNIT, unit_crcs(_data(2), UNIT))  # a file rewritten whole
    assert not (root / "fragments" / _fid(2)[:2] / _fid(2)).exists()
    assert sorted(scan(root / "volumes")) == [_fid(2), _fid(3)]
    await _put_file(store, _fid(3), _data(3))  # and a needle rewritten as a file
    assert sorted(scan(root / "volumes")) == [_fid(2)]
    assert await _held(store) == {_fid(i): _data(i) for i in (1, 2, 3)}
    assert (store.usage().used, store.usage().fragments) == (3 * 2500, 3)
    assert [f.fragment_id for f in await store.list_fragments()] == [_fid(1), _fid(2), _fid(3)]
    async with store.open_reader(_fid(2)) as reader:
        pieces = [p async for p in reader.pieces(2 * UNIT, first_unit=1)]
    assert b"".join(p.data for p in pieces) == _data(2)[UNIT:]
    assert [len(p.crcs) for p in pieces] == [2]
