"""Rebalancing arithmetic: how uneven the buckets are, and which fragments to move.

Each live bucket has a *target*: its share of all placed bytes in proportion to its
capacity, so every bucket ends at the same fill percentage. One limit applies: a file
puts at most one of its ``parts`` parts on a bucket, so no bucket can hold more than
1/parts of all bytes; a bucket whose capacity share is larger gets exactly that, and
the others share the rest by capacity (water-filling). The minimum any rebalance
must move is the sum of what the buckets hold above their targets. :func:`plan` moves
fragments from the fullest bucket above its target to the emptiest below its target,
each time the largest fragment that fits in both gaps (what the source holds too much
and what the destination lacks), so no move overshoots a target and the bytes moved
never exceed that minimum. It stops as soon as the fullest and the emptiest bucket are
within ``tolerance`` of each other (relative to their targets).

When no fragment fits any gap but the buckets are still uneven (few, large fragments:
a young cluster), it may overshoot a target, but only with a move that makes the sum of
all distances to the targets smaller and keeps both buckets within the current range
of fills: the spread never grows, every move makes progress, and planning ends.

The fragments themselves live in the registry; :class:`Movable` is how the plan asks
for one (the registry answers with an indexed query), so planning needs no memory
proportional to the number of fragments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Fill:
    """A live bucket for balancing: bytes placed on it and its capacity."""

    bucket_id: str
    used: int
    capacity: int

    @property
    def fill(self) -> float:
        return self.used / self.capacity


@dataclass(frozen=True, slots=True)
class Move:
    """Move one fragment (part ``part`` of ``upload_id``, ``size`` bytes) from ``src`` to ``dst``."""

    upload_id: str
    part: int
    size: int
    src: str
    dst: str


class Movable(Protocol):
    """Finds fragments that may move."""

    def largest(self, src: str, dst: str, limit: int) -> tuple[str, int, int] | None:
        """The largest fragment on ``src`` of at most ``limit`` bytes that may move to ``dst``.

        It must belong to a committed file that has no part on ``dst`` yet (counting moves
        under way) and must not be moving already. Returns (upload id, part, size).
        """
        ...

    def smallest(self, src: str, dst: str, above: int) -> tuple[str, int, int] | None:
        """Like :meth:`largest`, but the smallest fragment of more than ``above`` bytes."""
        ...


def _usable(fills: Iterable[Fill]) -> list[Fill]:
    return [f for f in fills if f.capacity > 0]


def spread(fills: Iterable[Fill]) -> float:
    """Fullest fill divided by emptiest fill (1.0 when all are empty; inf if only some are)."""
    usable = _usable(fills)
    if not usable:
        return 1.0
    high = max(f.fill for f in usable)
    low = min(f.fill for f in usable)
    if high == 0:
        return 1.0
    return math.inf if low == 0 else high / low


def targets(fills: Iterable[Fill], parts: int) -> dict[str, float]:
    """Bytes each bucket holds when balanced: by capacity, none above 1/``parts`` of all."""
    usable = _usable(fills)
    total = sum(f.used for f in usable)
    ceiling = total / parts
    goal: dict[str, float] = {}
    rest = usable
    while rest:
        share = (total - sum(goal.values())) / sum(f.capacity for f in rest)
        capped = [f for f in rest if share * f.capacity > ceiling]
        if not capped:
            goal.update((f.bucket_id, share * f.capacity) for f in rest)
            break
        goal.update((f.bucket_id, ceiling) for f in capped)
        rest = [f for f in rest if f.bucket_id not in goal]
    return goal


def imbalance(fills: Iterable[Fill], parts: int) -> float:
    """The largest used/target divided by the smallest (1.0: perfectly balanced)."""
    usable = _usable(fills)
    goal = targets(usable, parts)
    ratios = [f.used / goal[f.bucket_id] for f in usable if goal[f.bucket_id] > 0]
    if not ratios:
        return 1.0
    return math.inf if min(ratios) == 0 else max(ratios) / min(ratios)


def balanced(fills: Iterable[Fill], tolerance: float, parts: int) -> bool:
    """True when every bucket's used/target is within ``tolerance`` of every other's."""
    return imbalance(fills, parts) <= 1 + tolerance


def minimum_to_move(fills: Iterable[Fill], parts: int) -> int:
    """Bytes any perfect rebalance moves: the sum of what buckets hold above their targets."""
    usable = _usable(fills)
    goal = targets(usable, parts)
    return round(sum(max(0.0, f.used - goal[f.bucket_id]) for f in usable))


def plan(fills: Iterable[Fill], tolerance: float, parts: int, movable: Movable) -> Iterator[Move]:
    """The moves that even out ``fills`` (files of ``parts`` parts), one at a time.

    The caller must make each yielded move visible to ``movable`` (record it) before
    asking for the next one, so that a fragment is not chosen twice and two parts of a
    file never meet on one bucket.
    """
    state = {f.bucket_id: f for f in _usable(fills)}
    goal = targets(state.values(), parts)
    while not balanced(state.values(), tolerance, parts):
        move = _next_move(state, goal, movable)
        if move is None:
            return
        yield move
        src, dst = state[move.src], state[move.dst]
        state[move.src] = Fill(src.bucket_id, src.used - move.size, src.capacity)
        state[move.dst] = Fill(dst.bucket_id, dst.used + move.size, dst.capacity)


def _next_move(state: dict[str, Fill], goal: dict[str, float], movable: Movable) -> Move | None:
    over = sorted((f for f in state.values() if f.used > goal[f.bucket_id]), key=lambda f: -f.fill)
    under = sorted((f for f in state.values() if f.used < goal[f.bucket_id]), key=lambda f: f.fill)
    for src in over:
        surplus = src.used - goal[src.bucket_id]
        for dst in under:
            lack = goal[dst.bucket_id] - dst.used
            limit = math.floor(min(surplus, lack, dst.capacity - dst.used))
            if limit <= 0:
                continue
            found = movable.largest(src.bucket_id, dst.bucket_id, limit)
            if found is not None:
                upload_id, part, size = found
                return Move(upload_id, part, size, src.bucket_id, dst.bucket_id)
    return _overshooting_move(state, goal, over, under, movable)


def _overshooting_move(
    state: dict[str, Fill], goal: dict[str, float], over: list[Fill], under: list[Fill], movable: Movable
) -> Move | None:
    ratios = [f.used / goal[f.bucket_id] for f in state.values() if goal[f.bucket_id] > 0]
    if not ratios:
        return None
    high, low = max(ratios), min(ratios)
    for src in over:
        surplus = src.used - goal[src.bucket_id]
        for dst in under:
            lack = goal[dst.bucket_id] - dst.used
            found = movable.smallest(src.bucket_id, dst.bucket_id, max(0, math.floor(min(surplus, lack))))
            if found is None:
                continue
            upload_id, part, size = found
            if (
                size < surplus + lack  # the distances to the targets shrink
                and size <= dst.capacity - dst.used
                and (dst.used + size) / goal[dst.bucket_id] <= high
                and (src.used - size) / goal[src.bucket_id] >= low
            ):
                return Move(upload_id, part, size, src.bucket_id, dst.bucket_id)
    return _narrowing_move(state, goal, movable)


def _narrowing_move(state: dict[str, Fill], goal: dict[str, float], movable: Movable) -> Move | None:
    """Last resort: a fragment off the fullest bucket (relative to its target), or onto the
    emptiest, that narrows the spread, wherever it goes or comes from (the moves above
    only go from buckets over their target to buckets under it). The spread shrinks with
    every such move, so a plan of them ends."""
    usable = [f for f in state.values() if goal[f.bucket_id] > 0]
    if len(usable) < 2:
        return None
    ratio = {f.bucket_id: f.used / goal[f.bucket_id] for f in usable}
    now = max(ratio.values()) / min(ratio.values()) if min(ratio.values()) > 0 else math.inf
    fullest = max(usable, key=lambda f: ratio[f.bucket_id])
    emptiest = min(usable, key=lambda f: ratio[f.bucket_id])
    pairs = [(fullest, f) for f in sorted(usable, key=lambda f: ratio[f.bucket_id]) if f is not fullest]
    pairs += [(f, emptiest) for f in sorted(usable, key=lambda f: -ratio[f.bucket_id]) if f is not emptiest]
    for src, dst in pairs:
        found = movable.smallest(src.bucket_id, dst.bucket_id, 0)
        if found is None or found[2] > dst.capacity - dst.used:
            continue
        upload_id, part, size = found
        after = dict(ratio)
        after[src.bucket_id] = (src.used - size) / goal[src.bucket_id]
        after[dst.bucket_id] = (dst.used + size) / goal[dst.bucket_id]
        if min(after.values()) > 0 and max(after.values()) / min(after.values()) < now - 1e-12:
            return Move(upload_id, part, size, src.bucket_id, dst.bucket_id)
    return None
