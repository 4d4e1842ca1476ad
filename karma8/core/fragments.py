"""Upload and fragment identifiers.

An upload id is 32 lowercase hex digits (a random UUID); a fragment id is
``<upload id>.<part>``. Buckets accept nothing else, so an id can become a file name on a
bucket's disk without any chance of path traversal.
"""

from __future__ import annotations

import re
import uuid

from karma8.errors import BadRequest

MAX_PARTS = 64
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_FRAGMENT_ID = re.compile(r"([0-9a-f]{32})\.(0|[1-9][0-9]?)")


def new_upload_id() -> str:
    """A fresh random upload id."""
    return uuid.uuid4().hex


def fragment_id(upload_id: str, part: int) -> str:
    """The id of ``part`` of ``upload_id``."""
    if not 0 <= part < MAX_PARTS:
        raise BadRequest(f"part {part} out of range")
    return f"{check_upload_id(upload_id)}.{part}"


def check_upload_id(upload_id: str) -> str:
    """Return ``upload_id`` if well formed, else raise :class:`BadRequest`."""
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise BadRequest(f"malformed upload id {upload_id!r}")
    return upload_id


def parse_fragment_id(value: str) -> tuple[str, int]:
    """Split a fragment id into ``(upload_id, part)``.

    Raises:
        BadRequest: the id is not of the form ``<32 hex>.<part>``.
    """
    match = _FRAGMENT_ID.fullmatch(value)
    if match is None or int(match.group(2)) >= MAX_PARTS:
        raise BadRequest(f"malformed fragment id {value!r}")
    return match.group(1), int(match.group(2))
