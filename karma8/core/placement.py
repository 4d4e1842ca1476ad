"""Choosing which buckets hold the parts of a new upload.

Weighted rendezvous hashing (highest random weight): every candidate bucket gets the score
``-weight / ln(h)`` where ``h`` is a uniform hash of (upload id, bucket id) in (0, 1), and
the ``count`` best scores win. The weight is the bucket's free space, so emptier buckets
are chosen proportionally more often; the choice is deterministic for a given upload id
and set of candidates, and the winners are distinct by construction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from karma8.errors import NotEnoughBuckets


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live bucket as placement sees it."""

    bucket_id: str
    free: int


def _unit_hash(upload_id: str, bucket_id: str) -> float:
    digest = hashlib.blake2b(f"{upload_id}\0{bucket_id}".encode(), digest_size=8).digest()
    # 52 bits, so that (x + 0.5) / 2**52 is exact and strictly inside (0, 1).
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52


def choose_buckets(upload_id: str, candidates: Sequence[Candidate], count: int) -> list[str]:
    """The ids of ``count`` distinct buckets for ``upload_id``, in part order.

    Raises:
        NotEnoughBuckets: fewer than ``count`` distinct candidates.
    """
    unique = {c.bucket_id: c for c in candidates}
    if len(unique) < count:
        raise NotEnoughBuckets(live=len(unique), needed=count)

    def score(c: Candidate) -> float:
        weight = max(c.free, 1)
        return -weight / math.log(_unit_hash(upload_id, c.bucket_id))

    ranked = sorted(unique.values(), key=lambda c: (score(c), c.bucket_id), reverse=True)
    return [c.bucket_id for c in ranked[:count]]
