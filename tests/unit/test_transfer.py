"""Writing and reading a file's fragments against in-memory buckets that fail on demand."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from karma8.api.pool import Limits
from karma8.api.reading import damaged, read_fragments
from karma8.api.writing import write_fragments
from karma8.core.coding import Scheme
from karma8.core.layout import Layout
from karma8.errors import BucketUnavailable, ChecksumMismatch, Karma8Error, Unreadable
from tests.unit.fakes import FakeBucket, fleet, usable

UPLOAD = "0123456789abcdef0123456789abcdef"
UNIT = 1000
LIMITS = Limits(connect=5.0, step=30.0, stripe=2.0, queue_depth=2, small=1500)
SCHEME = Scheme.of(6, 2)
#: Several stripes and a partial last one; parts beyond `small`, so they stream.
SIZE = 6 * UNIT * 3 + 2_345


def _frames(data: bytes, frame: int = 777) -> Callable[[], Awaitable[bytes]]:
    pieces = [data[i : i + frame] for i in range(0, len(data), frame)] + [b""]
    it = iter(pieces)

    async def receive() -> bytes:
        await trio.lowlevel.checkpoint()
        return next(it)

    return receive


async def _write(
    data: bytes, buckets: Sequence[FakeBucket], quorum: int | None = None, scheme: Scheme = SCHEME
) -> tuple[Layout, dict[int, str], dict[int, Karma8Error]]:
    layout = Layout.for_size(len(data), scheme.data, UNIT, scheme.parity)
    written = await write_fragments(
        _frames(data), layout, scheme, UPLOAD, dict(enumerate(buckets)), quorum or len(buckets), LIMITS
    )
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    return layout, written.stored, written.failed


async def _read(
    layout: Layout, buckets: Sequence[FakeBucket], scheme: Scheme = SCHEME
) -> tuple[bytes, dict[int, Karma8Error]]:
    out = bytearray()

    async def deliver(unit: bytes) -> None:
        out.extend(unit)

    failed = await read_fragments(deliver, layout, scheme, UPLOAD, usable(buckets), LIMITS, checked=True)
    return bytes(out), failed


def _data(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("size", [0, 1, 5, 6 * UNIT - 1, SIZE])
async def test_healthy_round_trip_reads_only_data_fragments(size: int) -> None:
    buckets = fleet(8)
    data = _data(size)
    layout, stored, failed = await _write(data, buckets)
    assert sorted(stored) == list(range(8))
    assert not failed
    assert [len(buckets[p].fragments[f"{UPLOAD}.{p}"].data) for p in range(8)] == layout.part_sizes()

    back, failed = await _read(layout, buckets)
    assert back == data
    assert not failed
    assert [b.gets for b in buckets[6:]] == [0, 0]


@pytest.mark.parametrize("lost", list(itertools.combinations(range(8), 2)))
async def test_any_two_lost_fragments_still_read(lost: tuple[int, int]) -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    layout, _, _ = await _write(data, buckets)
    for b in lost:
        buckets[b].down = True

    back, failed = await _read(layout, buckets)

    assert back == data
    assert set(failed) <= set(lost)  # no healthy fragment was blamed
    assert {p for p in lost if p < 6} <= set(failed)


async def test_a_third_lost_fragment_is_a_clear_error_not_wrong_bytes() -> None:
    buckets = fleet(8)
    layout, _, _ = await _write(_data(SIZE), buckets)
    for b in (0, 3, 7):
        buckets[b].down = True
    delivered: list[bytes] = []

    async def deliver(unit: bytes) -> None:
        delivered.append(unit)

    with pytest.raises(Unreadable, match="only 5 of the 6 fragments needed for stripe 0"):
        await read_fragments(deliver, layout, SCHEME, UPLOAD, usable(buckets), LIMITS, checked=True)
    assert delivered == []


async def test_a_read_that_fails_still_tells_which_fragments_it_found_damaged() -> None:
    """What repair needs to rebuild a damaged fragment it ran into, rather than read it
    again, when the read as a whole failed (a part owed, a parity down, one damaged)."""
    buckets = fleet(8)
    layout, _, _ = await _write(_data(SIZE), buckets)
    buckets[2].fragments.clear()  # never written (owed)
    buckets[6].damage_at = 0
    buckets[7].down = True
    failed: dict[int, Karma8Error] = {}

    async def deliver(unit: bytes) -> None:
        pass

    with pytest.raises(Unreadable):
        await read_fragments(
            deliver, layout, SCHEME, UPLOAD, usable(buckets), LIMITS, checked=True, failed=failed
        )
    assert damaged(failed) == {2, 6}  # gone and damaged: rebuild both
    assert isinstance(failed[7], BucketUnavailable)  # down: not damaged


@pytest.mark.parametrize("at", [0, 1, 3])
async def test_a_fragment_failing_mid_read_is_read_around_from_that_stripe(at: int) -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    layout, _, _ = await _write(data, buckets)
    buckets[2].fail_after = at

    back, failed = await _read(layout, buckets)

    assert back == data
    assert list(failed) == [2]
    assert "failed mid-get" in failed[2].message
    assert buckets[6].gets == 1
    assert buckets[7].gets == 0


async def test_a_damaged_unit_is_caught_and_read_around() -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    layout, _, _ = await _write(data, buckets)
    buckets[4].damage_at = 2

    back, failed = await _read(layout, buckets)

    assert back == data
    assert isinstance(failed[4], ChecksumMismatch)


async def test_a_stalled_fragment_is_read_around_after_the_stripe_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    layout, _, _ = await _write(data, buckets)
    buckets[1].stall_at = 2
    started = trio.current_time()

    back, failed = await _read(layout, buckets)

    assert back == data
    assert "stalled for 2 s" in failed[1].message
    assert trio.current_time() - started == pytest.approx(LIMITS.stripe)


async def test_a_bucket_failing_mid_upload_leaves_the_quorum_met() -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    buckets[5].fail_after = 1

    layout, stored, failed = await _write(data, buckets, quorum=7)

    assert sorted(stored) == [0, 1, 2, 3, 4, 6, 7]
    assert list(failed) == [5]
    assert f"{UPLOAD}.5" not in buckets[5].fragments
    buckets[5].fail_after = None
    back, read_failed = await _read(layout, buckets)
    assert back == data
    assert list(read_failed) == [5]


async def test_an_upload_fails_once_the_quorum_is_out_of_reach() -> None:
    buckets = fleet(8)
    buckets[1].fail_after = 1
    buckets[6].down = True
    with pytest.raises(BucketUnavailable):
        await _write(_data(SIZE), buckets, quorum=7)


async def test_six_buckets_write_the_data_parts_only() -> None:
    buckets = fleet(6)
    data = _data(SIZE)
    layout, stored, failed = await _write(data, buckets)
    assert sorted(stored) == list(range(6))
    assert not failed
    assert (await _read(layout, buckets))[0] == data


async def test_without_parity_a_lost_fragment_is_its_own_error() -> None:
    scheme = Scheme.of(6, 0)
    buckets = fleet(6)
    layout, _, _ = await _write(_data(SIZE), buckets, scheme=scheme)
    buckets[3].down = True
    with pytest.raises(BucketUnavailable, match="down"):
        await _read(layout, buckets, scheme)


async def test_parity_written_with_fewer_buckets_is_the_same_parity() -> None:
    """A 6+1 write (7 buckets) stores the first parity fragment a 6+2 write would."""
    data = _data(SIZE)
    seven, eight = fleet(7), fleet(8)
    await _write(data, seven)
    await _write(data, eight)
    assert seven[6].fragments == eight[6].fragments


async def test_damaged_or_missing_copies_are_told_from_buckets_out_of_reach() -> None:
    buckets = fleet(8)
    data = _data(SIZE)
    layout, _, _ = await _write(data, buckets)
    buckets[0].damage_at = 1
    buckets[5].down = True
    back, failed = await _read(layout, buckets)
    assert back == data
    assert sorted(failed) == [0, 5]
    assert damaged(failed) == {0}

    buckets[0].damage_at = None
    del buckets[3].fragments[f"{UPLOAD}.3"]
    back, failed = await _read(layout, buckets)
    assert back == data
    assert sorted(failed) == [3, 5]
    assert damaged(failed) == {3}
