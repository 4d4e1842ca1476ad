"""Weighted rendezvous placement of parts on buckets."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karma8.core.placement import Candidate, choose_buckets
from karma8.errors import NotEnoughBuckets

GiB = 1 << 30


def _candidates(n: int, free: int = GiB) -> list[Candidate]:
    return [Candidate(f"bucket-{i:02d}", free) for i in range(n)]


def _upload_id(i: int) -> str:
    return f"{i:032x}"


@settings(max_examples=200, deadline=None)
@given(
    upload_id=st.text(min_size=1, max_size=40),
    n=st.integers(min_value=1, max_value=20),
    data=st.data(),
)
def test_choice_is_distinct_sized_and_from_candidates(upload_id: str, n: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=0, max_value=n), label="count")
    frees = data.draw(st.lists(st.integers(min_value=0, max_value=10 * GiB), min_size=n, max_size=n))
    candidates = [Candidate(f"b{i}", free) for i, free in enumerate(frees)]

    chosen = choose_buckets(upload_id, candidates, count)

    assert len(chosen) == count
    assert len(set(chosen)) == count
    assert set(chosen) <= {c.bucket_id for c in candidates}


def test_same_upload_id_same_choice_in_any_candidate_order() -> None:
    candidates = _candidates(10)
    first = choose_buckets("0123456789abcdef0123456789abcdef", candidates, 6)

    assert choose_buckets("0123456789abcdef0123456789abcdef", candidates, 6) == first
    assert choose_buckets("0123456789abcdef0123456789abcdef", candidates[::-1], 6) == first


def test_fewer_candidates_than_parts() -> None:
    with pytest.raises(NotEnoughBuckets) as info:
        choose_buckets(_upload_id(1), _candidates(5), 6)

    assert info.value.live == 5
    assert info.value.needed == 6
    assert info.value.code == "not_enough_buckets"


def test_no_candidates() -> None:
    with pytest.raises(NotEnoughBuckets) as info:
        choose_buckets(_upload_id(1), [], 1)

    assert (info.value.live, info.value.needed) == (0, 1)


def test_duplicate_candidates_count_once() -> None:
    candidates = [Candidate("a", GiB), Candidate("a", GiB), Candidate("b", GiB), Candidate("b", 2 * GiB)]

    with pytest.raises(NotEnoughBuckets) as info:
        choose_buckets(_upload_id(7), candidates, 3)
    assert (info.value.live, info.value.needed) == (2, 3)

    assert sorted(choose_buckets(_upload_id(7), candidates, 2)) == ["a", "b"]


def test_different_upload_ids_spread_over_all_buckets() -> None:
    candidates = _candidates(8)
    seen: Counter[str] = Counter()
    for i in range(500):
        seen.update(choose_buckets(_upload_id(i), candidates, 6))

    assert set(seen) == {c.bucket_id for c in candidates}
    # Equal weights: each bucket holds about 6/8 of 500 uploads.
    assert all(250 < n < 450 for n in seen.values())


def test_bucket_with_more_free_space_is_chosen_more_often() -> None:
    candidates = [Candidate("big", 4 * GiB), *_candidates(4)]
    wins: Counter[str] = Counter()
    for i in range(4000):
        (winner,) = choose_buckets(_upload_id(i), candidates, 1)
        wins[winner] += 1

    # Proportional to weight: "big" should win about 4/8 of the time, each other 1/8.
    assert wins["big"] > 1600
    assert wins["big"] > 2.5 * max(n for b, n in wins.items() if b != "big")


def test_bucket_with_more_free_space_is_in_more_placements() -> None:
    candidates = [Candidate("big", 4 * GiB), *_candidates(9)]
    seen: Counter[str] = Counter()
    for i in range(2000):
        seen.update(choose_buckets(_upload_id(i), candidates, 6))

    assert seen["big"] > 1.2 * max(n for b, n in seen.items() if b != "big")


def test_full_bucket_still_counts_as_a_candidate() -> None:
    # free=0 is clamped to a tiny weight, not excluded (liveness is the caller's filter).
    candidates = [Candidate("full", 0), *_candidates(5)]

    assert "full" in choose_buckets(_upload_id(3), candidates, 6)
