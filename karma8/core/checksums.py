"""Per-unit checksums: a crc32c of every stripe unit, end to end.

The API server computes the crc32c of each unit it sends (data and parity), the bucket
checks it on arrival and stores it beside the data, and every read carries it back, so a
flipped bit is caught at the unit it hit, on the disk or on the wire, and a degraded read
can go on from that stripe with other fragments. crc32c runs in hardware (SSE 4.2, ARMv8)
at well over 10 GB/s, so checking costs nothing next to the transfer. The whole file's
sha256 stays the end-to-end check of what a client gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import crc32c

#: Bytes of one stored checksum.
CRC_SIZE = 4
#: The fragment format of new uploads: 2, a crc32c per unit (karma8/bucket/store.py).
FORMAT = 2


def crc(data: bytes | memoryview) -> int:
    """The crc32c of ``data``."""
    return int(crc32c.crc32c(data))


def unit_crcs(data: bytes, unit: int) -> list[int]:
    """The crc32c of each ``unit``-sized piece of ``data`` (the last may be shorter)."""
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    if len(data) <= unit:
        return [crc(data)] if data else []
    view = memoryview(data)
    return [crc(view[i : i + unit]) for i in range(0, len(data), unit)]


def first_bad_unit(data: bytes, unit: int, crcs: Sequence[int]) -> int | None:
    """Index (within ``data``) of the first unit whose crc32c is not in ``crcs``; None if all match.

    A count of checksums that does not match the count of units is a bad unit too (the
    first one without its checksum).
    """
    actual = unit_crcs(data, unit)
    for i, (a, b) in enumerate(zip(actual, crcs, strict=False)):
        if a != b:
            return i
    if len(actual) != len(crcs):
        return min(len(actual), len(crcs))
    return None
