"""The needle: one fragment (or one deletion) in a bucket's volume file, self-describing.

Layout (little-endian, each needle padded to 8 bytes)::

    magic "K8N1" | kind (1 put, 2 delete) | part | 2 zero bytes | upload id (16 bytes)
    | append time (float64) | data size (uint64) | unit (uint32) | sha256 of the data (32)
    | crc32c of the header so far (uint32)
    then, for a put: the data, the crc32c of each unit (4 bytes each; none when unit is 0)

The header alone tells a needle's length, so a volume is read needle by needle without an
index; its crc32c tells a sound header from a torn or overwritten one. Pure: the bucket's
volume store (karma8/bucket/volumes.py) does the I/O.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from karma8.core.checksums import CRC_SIZE, crc
from karma8.core.fragments import parse_fragment_id

MAGIC = b"K8N1"
PUT, DELETE = 1, 2
_HEADER = struct.Struct("<4sBB2x16sdQI32s")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
ALIGN = 8
_NAME = re.compile(r"v(\d{8})\.dat")


def volume_name(number: int) -> str:
    """The file name of volume ``number``."""
    return f"v{number:08d}.dat"


def needle_size(size: int, unit: int) -> int:
    """Bytes a needle of ``size`` data bytes takes in its volume."""
    body = size + (CRC_SIZE * -(-size // unit) if unit else 0)
    return -(-(HEADER_SIZE + body) // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class Header:
    """What a needle's header says."""

    kind: int
    fragment_id: str
    appended: float
    size: int
    unit: int
    sha256: bytes

    @property
    def length(self) -> int:
        """Bytes of the whole needle, header to padding."""
        return needle_size(self.size, self.unit) if self.kind == PUT else needle_size(0, 0)


def encode_header(kind: int, fragment_id: str, appended: float, size: int, unit: int, sha256: bytes) -> bytes:
    """A needle's header, its crc32c included."""
    upload_id, part = parse_fragment_id(fragment_id)
    head = _HEADER.pack(MAGIC, kind, part, bytes.fromhex(upload_id), appended, size, unit, sha256)
    return head + _HEADER_CRC.pack(crc(head))


def decode_header(raw: bytes) -> Header | None:
    """The header in ``raw`` (``HEADER_SIZE`` bytes), or None if it is not a sound one."""
    if len(raw) < HEADER_SIZE:
        return None
    head = raw[: _HEADER.size]
    (check,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if crc(head) != check:
        return None
    magic, kind, part, upload, appended, size, unit, sha = _HEADER.unpack(head)
    if magic != MAGIC or kind not in (PUT, DELETE) or (kind == DELETE and size):
        return None
    return Header(kind, f"{upload.hex()}.{part}", appended, size, unit, sha)


def encode_put(
    fragment_id: str, data: bytes, unit: int, crcs: Sequence[int], sha256: bytes, appended: float
) -> list[bytes]:
    """The buffers of a put needle (header, data, unit checksums, padding)."""
    parts = [encode_header(PUT, fragment_id, appended, len(data), unit, sha256), data]
    if unit:
        parts.append(struct.pack(f"<{len(crcs)}I", *crcs))
    used = sum(len(p) for p in parts)
    pad = needle_size(len(data), unit) - used
    if pad:
        parts.append(bytes(pad))
    return parts


def split_body(header: Header, body: bytes) -> tuple[bytes, list[int]] | None:
    """The data and unit checksums in a put needle's ``body`` (what follows its header);
    None if ``body`` is too short to hold them."""
    count = -(-header.size // header.unit) if header.unit else 0
    if len(body) < header.size + CRC_SIZE * count:
        return None
    return body[: header.size], list(struct.unpack_from(f"<{count}I", body, header.size))


def encode_delete(fragment_id: str, appended: float) -> list[bytes]:
    """The buffers of a delete needle (a tombstone: header and padding)."""
    head = encode_header(DELETE, fragment_id, appended, 0, 0, bytes(32))
    return [head, bytes(needle_size(0, 0) - len(head))]


def volume_number(name: str) -> int | None:
    """The number of the volume file called ``name``; None if it is not a volume's name."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None
