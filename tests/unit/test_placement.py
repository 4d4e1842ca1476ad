"""Fill-aware placement of parts on buckets."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karma8.core.placement import Candidate, choose_buckets
from karma8.errors import NotEnoughBuckets

GiB = 1 << 30
MiB = 1 << 20


def _candidates(n: int, used: int = 0, capacity: int = GiB) -> list[Candidate]:
    return [Candidate(f"bucket-{i:02d}", used, capacity, capacity - used) for i in range(n)]


def _upload_id(i: int) -> str:
    return f"{i:032x}"


@settings(max_examples=200, deadline=None)
@given(
    upload_id=st.text(min_size=1, max_size=40),
    n=st.integers(min_value=1, max_value=20),
    data=st.data(),
)
def test_choice_is_distinct_has_room_and_prefers_the_emptiest(
    upload_id: str, n: int, data: st.DataObject
) -> None:
    count = data.draw(st.integers(min_value=1, max_value=n), label="count")
    part = data.draw(st.integers(min_value=0, max_value=GiB), label="part size")
    candidates = []
    for i in range(n):
        capacity = data.draw(st.integers(min_value=1, max_value=10 * GiB))
        used = data.draw(st.integers(min_value=0, max_value=capacity))
        candidates.append(Candidate(f"b{i}", used, capacity, capacity - used))
    roomy = [c for c in candidates if c.capacity - c.used >= part]
    if len(roomy) < count:
        with pytest.raises(NotEnoughBuckets):
            choose_buckets(upload_id, candidates, [part] * count)
        return

    chosen = choose_buckets(upload_id, candidates, [part] * count)

    assert len(chosen) == count
    assert len(set(chosen)) == count
    assert set(chosen) <= {c.bucket_id for c in roomy}
    # Nobody left out would have been emptier after taking the part.
    by_id = {c.bucket_id: c for c in candidates}
    worst = max((by_id[b].used + part) / by_id[b].capacity for b in chosen)
    assert all((c.used + part) / c.capacity >= worst for c in roomy if c.bucket_id not in chosen)


def test_choice_is_deterministic_and_independent_of_candidate_order() -> None:
    candidates = _candidates(10)
    first = choose_buckets(_upload_id(1), candidates, [MiB] * 6)
    assert choose_buckets(_upload_id(1), candidates, [MiB] * 6) == first
    assert choose_buckets(_upload_id(1), candidates[::-1], [MiB] * 6) == first


def test_too_few_buckets() -> None:
    with pytest.raises(NotEnoughBuckets, match="5 live bucket"):
        choose_buckets(_upload_id(1), _candidates(5), [1] * 6)


def test_too_few_buckets_with_room() -> None:
    candidates = [*_candidates(5), Candidate("full", GiB - 10, GiB, 10)]
    with pytest.raises(NotEnoughBuckets, match="with room"):
        choose_buckets(_upload_id(1), candidates, [MiB] * 6)


def test_reported_free_space_also_bounds_what_fits() -> None:
    # A disk shared with other data can be fuller than the registry knows.
    candidates = [*_candidates(6), Candidate("shared-disk", 0, GiB, MiB - 1)]
    for i in range(50):
        assert "shared-disk" not in choose_buckets(_upload_id(i), candidates, [MiB] * 6)


def test_duplicate_candidates_count_once() -> None:
    candidates = [*_candidates(2), *_candidates(2)]
    with pytest.raises(NotEnoughBuckets):
        choose_buckets(_upload_id(7), candidates, [1] * 3)
    assert sorted(choose_buckets(_upload_id(7), candidates, [1] * 2)) == ["bucket-00", "bucket-01"]


def test_equal_buckets_share_the_load() -> None:
    # Ties are broken by a hash of the upload id: every bucket gets picked.
    candidates = _candidates(12)
    seen: Counter[str] = Counter()
    for i in range(600):
        seen.update(choose_buckets(_upload_id(i), candidates, [MiB] * 6))
    assert set(seen) == {c.bucket_id for c in candidates}
    assert max(seen.values()) < 1.25 * min(seen.values())


def test_a_new_empty_bucket_gets_a_part_of_every_upload() -> None:
    candidates = [*_candidates(6, used=GiB // 2), Candidate("new", 0, GiB, GiB)]
    for i in range(100):
        assert "new" in choose_buckets(_upload_id(i), candidates, [MiB] * 6)


def test_fill_is_relative_to_capacity() -> None:
    # Same bytes used, but the big bucket is the emptiest by percentage.
    small = _candidates(6, used=GiB // 4)
    big = Candidate("big", GiB // 4, 4 * GiB, 4 * GiB - GiB // 4)
    for i in range(50):
        assert "big" in choose_buckets(_upload_id(i), [*small, big], [MiB] * 6)


def test_the_emptiest_bucket_takes_the_largest_part() -> None:
    candidates = [*_candidates(5, used=GiB // 2), Candidate("empty", 0, GiB, GiB)]
    sizes = [3, 3, 4, 3, 3]
    assert choose_buckets(_upload_id(1), candidates, sizes)[2] == "empty"


def test_repeated_placement_keeps_buckets_even() -> None:
    used = dict.fromkeys((f"b{i}" for i in range(8)), 0)
    for i in range(400):
        candidates = [Candidate(b, u, GiB, GiB - u) for b, u in used.items()]
        size = (i * 7919) % (8 * MiB) + 1
        for b in choose_buckets(_upload_id(i), candidates, [size] * 6):
            used[b] += size
    assert max(used.values()) / min(used.values()) < 1.02
