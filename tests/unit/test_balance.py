"""Rebalancing arithmetic: targets, spread, and the greedy plan (karma8.core.balance)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from karma8.core.balance import Fill, Move, balanced, imbalance, minimum_to_move, plan, spread, targets

GiB = 1 << 30


class FakeMovable:
    """Fragments in memory: {bucket: {(upload, part): size}}, with the registry's rules."""

    def __init__(self, layout: dict[str, dict[tuple[str, int], int]]) -> None:
        self.layout = layout
        self.moving: set[tuple[str, int]] = set()

    def largest(self, src: str, dst: str, limit: int) -> tuple[str, int, int] | None:
        on_dst = {u for u, _ in self.layout[dst]}
        fits = [
            (upload, part, size)
            for (upload, part), size in self.layout[src].items()
            if 0 < size <= limit and upload not in on_dst and (upload, part) not in self.moving
        ]
        return max(fits, key=lambda f: f[2], default=None)

    def smallest(self, src: str, dst: str, above: int) -> tuple[str, int, int] | None:
        on_dst = {u for u, _ in self.layout[dst]}
        fits = [
            (upload, part, size)
            for (upload, part), size in self.layout[src].items()
            if size > above and upload not in on_dst and (upload, part) not in self.moving
        ]
        return min(fits, key=lambda f: f[2], default=None)

    def apply(self, move: Move) -> None:
        size = self.layout[move.src].pop((move.upload_id, move.part))
        self.layout[move.dst][(move.upload_id, move.part)] = size

    def fills(self, capacity: dict[str, int]) -> list[Fill]:
        return [Fill(b, sum(frags.values()), capacity[b]) for b, frags in self.layout.items()]


def _cluster(seed: int, files: int, old: int, new: int, parts: int = 6) -> FakeMovable:
    rng = random.Random(seed)
    layout: dict[str, dict[tuple[str, int], int]] = {f"b{i}": {} for i in range(old + new)}
    for f in range(files):
        size = round(math.exp(rng.uniform(math.log(1024), math.log(32 << 20))))
        for part, bucket in enumerate(rng.sample(range(old), parts)):
            layout[f"b{bucket}"][(f"u{f}", part)] = size // parts
    return FakeMovable(layout)


def _run(movable: FakeMovable, capacity: dict[str, int], tolerance: float, parts: int = 6) -> list[Move]:
    moves = []
    for move in plan(movable.fills(capacity), tolerance, parts, movable):
        movable.apply(move)
        moves.append(move)
    return moves


def test_spread_and_balanced() -> None:
    assert spread([]) == 1.0
    assert spread([Fill("a", 0, 10), Fill("b", 0, 10)]) == 1.0
    assert spread([Fill("a", 5, 10), Fill("b", 0, 10)]) == math.inf
    assert spread([Fill("a", 6, 10), Fill("b", 3, 10)]) == pytest.approx(2.0)
    assert balanced([Fill("a", 105, 100), Fill("b", 100, 100)], 0.05, parts=1)
    assert not balanced([Fill("a", 106, 100), Fill("b", 100, 100)], 0.05, parts=1)


def test_targets_follow_capacity() -> None:
    fills = [Fill("a", 300, 100), Fill("b", 0, 200)]
    assert targets(fills, parts=1) == {"a": pytest.approx(100), "b": pytest.approx(200)}
    assert minimum_to_move(fills, parts=1) == 200


def test_no_bucket_is_targeted_above_one_part_of_every_file() -> None:
    # Six small buckets and one huge one: a file has one part per bucket at most, so the
    # huge one can hold 1/6 of all bytes, not its 50% capacity share.
    fills = [*(Fill(f"s{i}", 100, 10) for i in range(6)), Fill("huge", 0, 60)]
    goal = targets(fills, parts=6)
    assert goal["huge"] == pytest.approx(600 / 6)
    assert sum(goal.values()) == pytest.approx(600)
    assert all(goal[f"s{i}"] == pytest.approx(500 / 6) for i in range(6))
    at_target = [Fill(f.bucket_id, round(goal[f.bucket_id]), f.capacity) for f in fills]
    assert imbalance(at_target, parts=6) < 1.01


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), old=st.integers(6, 10), new=st.integers(1, 6))
@example(seed=7245, old=7, new=1)  # ends with an overshooting move
@example(seed=124, old=8, new=1)  # ends with moves that only narrow the spread (1.02539 before)
def test_plan_moves_about_the_minimum_and_reaches_the_tolerance(seed: int, old: int, new: int) -> None:
    movable = _cluster(seed, files=200, old=old, new=new)
    capacity = dict.fromkeys(movable.layout, 4 * GiB)
    minimum = minimum_to_move(movable.fills(capacity), 6)

    moves = _run(movable, capacity, tolerance=0.025)

    # Largest-fit moves never exceed the minimum; a last-resort overshoot may add a little
    # (seed 7245, 7 + 1 buckets: 1.001). The bound is 1.3.
    assert sum(m.size for m in moves) <= 1.3 * minimum
    assert imbalance(movable.fills(capacity), 6) <= 1.025 + 1e-9
    # Never two parts of one file on one bucket.
    for frags in movable.layout.values():
        uploads = [u for u, _ in frags]
        assert len(uploads) == len(set(uploads))


def test_plan_only_moves_from_fuller_to_emptier_buckets() -> None:
    movable = _cluster(3, files=100, old=6, new=2)
    capacity = dict.fromkeys(movable.layout, GiB)
    moves = _run(movable, capacity, tolerance=0.025)
    assert moves
    assert {m.src for m in moves} <= {f"b{i}" for i in range(6)}
    assert {m.dst for m in moves} == {"b6", "b7"}


def test_a_balanced_cluster_plans_nothing() -> None:
    movable = _cluster(5, files=100, old=6, new=0)
    capacity = dict.fromkeys(movable.layout, GiB)
    _run(movable, capacity, tolerance=0.025)  # even out the random start first
    assert _run(movable, capacity, tolerance=0.025) == []


def test_a_fragment_too_big_for_any_gap_stays() -> None:
    # One file, 6 parts on 6 of 7 buckets: moving a part only swaps which bucket is empty.
    movable = FakeMovable({f"b{i}": ({("u", i): 100} if i < 6 else {}) for i in range(7)})
    capacity = dict.fromkeys(movable.layout, 1000)
    assert _run(movable, capacity, tolerance=0.025) == []


def test_when_no_fragment_fits_a_gap_moves_may_overshoot_but_never_widen_the_spread() -> None:
    # Three files of six 200-byte parts on six buckets, two empty buckets: every gap
    # (150 above, 450 below the target) is smaller than a fragment.
    movable = FakeMovable(
        {f"b{i}": ({(f"u{f}", i): 200 for f in range(3)} if i < 6 else {}) for i in range(8)}
    )
    capacity = dict.fromkeys(movable.layout, 10_000)
    before = movable.fills(capacity)
    spreads = [imbalance(before, 6)]
    moves = []
    for move in plan(before, 0.025, 6, movable):
        movable.apply(move)
        moves.append(move)
        spreads.append(imbalance(movable.fills(capacity), 6))
    assert moves
    assert all(later <= earlier for earlier, later in itertools.pairwise(spreads))
    assert spreads[-1] < 2  # from infinite: both new buckets now hold data
    for frags in movable.layout.values():
        uploads = [u for u, _ in frags]
        assert len(uploads) == len(set(uploads))
