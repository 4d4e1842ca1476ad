"""Listing arithmetic: pages of names in byte order, cursors, common prefixes.

A listing walks the registry's name index. Names compare by code point, which is the byte
order of their UTF-8 (SQLite's BINARY collation, PostgreSQL's ``"C"``), so a prefix is a
range ``prefix <= name < successor(prefix)`` and a common prefix (a "directory" under a
delimiter) is skipped by continuing at its successor. A page ends after ``limit``
entries (files and common prefixes together, as S3's ListObjectsV2 counts them) with a
:class:`Cursor` to continue from, carried by clients as an opaque token.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from dataclasses import dataclass

from karma8.core.names import MAX_NAME_BYTES
from karma8.errors import BadRequest

#: The largest page, and the page of a request that gives no ``limit``.
MAX_PAGE = 1000

#: The first code point after the UTF-16 surrogates (which no name holds).
_SURROGATES = (0xD800, 0xE000)
_MAX_CODE_POINT = 0x10FFFF


def successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``, or
    None when there is none (``prefix`` is empty or all U+10FFFF)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code == _SURROGATES[0]:
            code = _SURROGATES[1]
        if code <= _MAX_CODE_POINT:
            return "".join(chars) + chr(code)
    return None


def common_prefix(name: str, prefix: str, delimiter: str) -> str | None:
    """The common prefix ``name`` rolls up into under ``delimiter`` (``prefix`` up to and
    including the first delimiter after it), or None when ``name`` is listed itself."""
    if not delimiter:
        return None
    at = name.find(delimiter, len(prefix))
    return None if at < 0 else name[: at + len(delimiter)]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a listing goes on: names after ``key`` (or from it, when ``inclusive``)."""

    key: str
    inclusive: bool = False

    def token(self) -> str:
        """The opaque continuation token a client sends back."""
        raw = ("f" if self.inclusive else "a") + self.key
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> Cursor:
        """Raises:
        BadRequest: not a token this server gave out."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequest("continuation is not a token a listing gave") from None
        if not raw or raw[0] not in "af" or "\x00" in raw:
            raise BadRequest("continuation is not a token a listing gave")
        return cls(raw[1:], inclusive=raw[0] == "f")

    def after(self, other: Cursor) -> bool:
        """Whether this cursor starts later than ``other``."""
        if self.key != other.key:
            return self.key > other.key
        return other.inclusive and not self.inclusive


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One ``/files`` request."""

    prefix: str = ""
    delimiter: str = ""
    #: From ``continuation`` or ``start_after``; None: from the prefix.
    start: Cursor | None = None
    limit: int = MAX_PAGE
    #: False: the old form (no paging parameter), answered whole or refused.
    paged: bool = False

    def first(self) -> Cursor:
        """The cursor of the first name the page may hold."""
        floor = Cursor(self.prefix, inclusive=True)
        return self.start if self.start is not None and self.start.after(floor) else floor

    def end(self) -> str | None:
        """Names must be below this (None: no bound)."""
        return successor(self.prefix) if self.prefix else None


def parse_list_query(query: dict[str, list[str]]) -> ListQuery:
    """The listing asked by a parsed ``/files`` query string.

    Raises:
        BadRequest: a bad ``limit``, a foreign ``continuation``, a
            value longer than a name may be or holding a control character.
    """

    def last(key: str) -> str | None:
        values = query.get(key)
        if not values:
            return None
        value = values[-1]
        if len(value.encode()) > MAX_NAME_BYTES:
            raise BadRequest(f"{key} is longer than {MAX_NAME_BYTES} bytes")
        if any(unicodedata.category(ch) == "Cc" for ch in value):
            raise BadRequest(f"{key} contains a control character (no name does)")
        return value

    limit_text = last("limit")
    limit = MAX_PAGE
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
            raise BadRequest(f"limit must be 1 to {MAX_PAGE}, got {limit_text[:40]!r}")
        limit = int(limit_text)
    delimiter = last("delimiter")  # an empty one is none (the query parser drops it)
    continuation, start_after = last("continuation"), last("start_after")
    start: Cursor | None = None
    if continuation is not None:
        start = Cursor.from_token(continuation)
    elif start_after:
        start = Cursor(start_after)
    paged = any(key in query for key in ("limit", "delimiter", "continuation", "start_after"))
    return ListQuery(last("prefix") or "", delimiter or "", start, limit, paged)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: files (name, size, sha256, created) and common prefixes, in
    name order, and where the next page starts (None: this was the last)."""

    files: list[tuple[str, int, str, float]]
    prefixes: list[str]
    next: Cursor | None
