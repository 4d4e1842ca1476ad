"""Plain values passed between the layers (no I/O, no generated protobuf types)."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class StoredFragment:
    """A fragment as a bucket stores it (its Put reply, or a listing entry)."""

    fragment_id: str
    size: int
    sha256: str
    #: Seconds since it was committed, by the bucket's clock (listings only).
    age: float = 0.0
