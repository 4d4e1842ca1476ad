"""Plain values passed between the layers (no I/O, no generated protobuf types)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

#: A bucket id as buckets make them (16 hex digits), or as an operator may set one.
_BUCKET_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Usage:
    """A bucket's space: bytes used by fragments, bytes still free, capacity, fragments."""

    used: int
    free: int
    capacity: int
    fragments: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a bucket reports when it registers and then periodically."""

    bucket_id: str
    address: str
    usage: Usage
    hello: bool

    def problem(self) -> str | None:
        """Why the API server must refuse this heartbeat (None when it is well formed)."""
        if not _BUCKET_ID.fullmatch(self.bucket_id):
            return f"bad bucket id {self.bucket_id[:80]!r} (1-64 of A-Z a-z 0-9 . _ -)"
        host, _, port = self.address.rpartition(":")
        if not host or len(self.address) > 300 or not port.isdigit() or not 0 < int(port) < 65536:
            return f"bad address {self.address[:80]!r} (host:port)"
        u = self.usage
        if min(u.used, u.free, u.capacity, u.fragments) < 0:
            return "negative usage"
        return None


@dataclass(frozen=True, slots=True)
class StoredFragment:
    """A fragment as a bucket stores it (its Put reply, or a listing entry)."""

    fragment_id: str
    size: int
    sha256: str
    #: Seconds since it was committed, by the bucket's clock (listings only).
    age: float = 0.0


class Piece(NamedTuple):
    """Data read from a fragment, with the crc32c of each of its units (format 2; else empty)."""

    data: bytes
    crcs: list[int]
