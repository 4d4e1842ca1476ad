"""Choosing which buckets hold the parts of a new upload.

Fill-aware and deterministic: each part goes to one of the ``count`` buckets whose fill
(bytes placed on it divided by its capacity) would be lowest after taking the part, so
buckets of any capacity fill towards the same percentage and a newly added, empty bucket
receives a part of every upload until it has caught up. Ties (an empty cluster, buckets
filled alike) are broken by a hash of (upload id, bucket id), so equal buckets share the
load instead of the same six always winning. Buckets without room for a part are skipped.

The bytes placed come from the registry, not from heartbeats: the registry counts every
upload the moment it is placed, so concurrent uploads never pile onto the same buckets
between two heartbeats. See docs/placement.md for the algorithm and its measured evenness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from karma8.errors import NotEnoughBuckets


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live bucket as placement sees it."""

    bucket_id: str
    #: Bytes the registry places on the bucket (fragments of live uploads).
    used: int
    #: Bytes the bucket may hold.
    capacity: int
    #: Bytes still free on its disk, as it last reported (bounds what fits).
    free: int

    @property
    def fill(self) -> float:
        """Fraction of the capacity placed."""
        return self.used / max(self.capacity, 1)


def unit_hash(key: str, bucket_id: str) -> float:
    """A uniform hash of (key, bucket id) in (0, 1); the deterministic tie-breaker."""
    digest = hashlib.blake2b(f"{key}\0{bucket_id}".encode(), digest_size=8).digest()
    # 52 bits, so that (x + 0.5) / 2**52 is exact and strictly inside (0, 1).
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52


def choose_buckets(
    upload_id: str, candidates: Sequence[Candidate], part_sizes: Sequence[int], required: int | None = None
) -> list[str]:
    """Distinct bucket ids for the parts of ``upload_id``, in part order.

    Every part gets one when enough candidates have room; otherwise the first parts get
    one each (data parts come first, parity parts after them), as long as that is at
    least ``required`` parts (default: all of them).

    Raises:
        NotEnoughBuckets: fewer distinct candidates with room than ``required``.
    """
    unique = {c.bucket_id: c for c in candidates}
    need = len(part_sizes) if required is None else required
    if len(unique) < need:
        raise NotEnoughBuckets(live=len(unique), needed=need)
    largest = max(part_sizes, default=0)
    roomy = [c for c in unique.values() if min(c.free, c.capacity - c.used) >= largest]
    if len(roomy) < need:
        raise NotEnoughBuckets(live=len(roomy), needed=need, with_room=True)
    count = min(len(part_sizes), len(roomy))
    part_sizes = part_sizes[:count]

    def after(c: Candidate) -> tuple[float, float]:
        return (c.used + largest) / max(c.capacity, 1), unit_hash(upload_id, c.bucket_id)

    chosen = sorted(roomy, key=after)[:count]
    # The emptiest bucket takes the largest part (parts differ by at most one stripe unit).
    by_size = sorted(range(count), key=lambda p: -part_sizes[p])
    out = [""] * count
    for part, bucket in zip(by_size, chosen, strict=True):
        out[part] = bucket.bucket_id
    return out
