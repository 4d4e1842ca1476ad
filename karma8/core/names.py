"""File name rules, shared by the server (which enforces them) and the client.

A name is UTF-8 text of 1 to 1024 bytes, carried percent-encoded in the WebSocket path.
``/`` may separate segments, but no segment may be empty, ``.`` or ``..``: names are
keys, not paths, yet they often become paths on the client's side (``karma8 download``),
so the rules keep them safe there. Control characters (C0, DEL, C1) are refused.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote, unquote_to_bytes

from karma8.errors import BadName

MAX_NAME_BYTES = 1024


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid file name.

    Raises:
        BadName: with a message that says which rule was broken.
    """
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName("name is not valid UTF-8") from None
    if not encoded:
        raise BadName("name is empty")
    if len(encoded) > MAX_NAME_BYTES:
        raise BadName(f"name is {len(encoded)} bytes, at most {MAX_NAME_BYTES} allowed")
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise BadName(f"name contains control character U+{ord(ch):04X}")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise BadName(f"name has an empty, '.' or '..' segment: {name!r}")
    return name


def decode_name(raw: str) -> str:
    """Decode a percent-encoded name from a request path and validate it."""
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadName("name is not valid UTF-8 once percent-decoded") from None
    if "%" in raw and not _well_formed_escapes(raw):
        raise BadName("name has a malformed percent escape")
    return validate_name(name)


def encode_name(name: str) -> str:
    """Percent-encode a valid name for a request path (``/`` kept readable)."""
    return quote(validate_name(name), safe="/")


def _well_formed_escapes(raw: str) -> bool:
    hexdigits = set("0123456789abcdefABCDEF")
    i = raw.find("%")
    while i != -1:
        if len(raw) < i + 3 or raw[i + 1] not in hexdigits or raw[i + 2] not in hexdigits:
            return False
        i = raw.find("%", i + 3)
    return True
