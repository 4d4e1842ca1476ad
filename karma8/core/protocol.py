"""The WebSocket protocol between clients and the API server, without I/O.

See docs/protocol.md for the contract. This module turns request paths and JSON text
frames into typed values and back; the trio shells only move frames.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from karma8.core.listing import ListQuery, parse_list_query
from karma8.core.names import decode_name
from karma8.errors import BadRequest, Karma8Error, RemoteError, TooLarge

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Op(enum.Enum):
    """What a WebSocket connection asks for, from the first path segment."""

    UPLOAD = "upload"
    DOWNLOAD = "download"
    FILES = "files"
    STAT = "stat"
    DELETE = "delete"
    STATUS = "status"
    VERIFY = "verify"
    REBALANCE = "rebalance"
    REPAIR = "repair"
    SESSION = "session"


_NAMED = {Op.UPLOAD, Op.DOWNLOAD, Op.STAT, Op.DELETE}


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # 4000-4999 are ours: 4000 + HTTP-like status for request errors.
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401
    NOT_FOUND = 4404
    CONFLICT = 4409


_CLOSE_FOR_CODE = {
    "bad_request": CloseCode.BAD_REQUEST,
    "bad_name": CloseCode.BAD_REQUEST,
    "unauthorized": CloseCode.UNAUTHORIZED,
    "not_found": CloseCode.NOT_FOUND,
    "too_large": CloseCode.TOO_BIG,
    "size_mismatch": CloseCode.BAD_REQUEST,
    "checksum_mismatch": CloseCode.BAD_REQUEST,
    "conflict": CloseCode.CONFLICT,
    "not_enough_buckets": CloseCode.TRY_AGAIN_LATER,
    "bucket_unavailable": CloseCode.TRY_AGAIN_LATER,
    "unreadable": CloseCode.TRY_AGAIN_LATER,
    "unavailable": CloseCode.TRY_AGAIN_LATER,
    "timeout": CloseCode.POLICY_VIOLATION,
}


def close_code_for(error_code: str) -> CloseCode:
    """The close code that follows an error frame with ``error_code``."""
    return _CLOSE_FOR_CODE.get(error_code, CloseCode.INTERNAL_ERROR)


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request path: the operation, and its name or listing."""

    op: Op
    name: str = ""
    #: ``/files``: what to list.
    listing: ListQuery = field(default_factory=ListQuery)
    #: ``/rebalance?dry_run=1``: show the plan, move nothing.
    dry_run: bool = False


def parse_path(path: str) -> Request:
    """Parse the request target of a WebSocket handshake.

    Raises:
        BadRequest: unknown operation or a missing/extra name.
        BadName: the name breaks the naming rules.
    """
    # The target is origin-form (path and query). Not urlsplit: it reads a leading "//"
    # as an authority, and raises ValueError for "//[" (an error that is not ours).
    target = path.partition("#")[0]
    path_part, _, query_text = target.partition("?")
    head, _, rest = path_part.lstrip("/").partition("/")
    try:
        op = Op(head)
    except ValueError:
        raise BadRequest(f"unknown path {path_part[:200]!r}") from None
    if op in _NAMED or (op is Op.VERIFY and rest):
        return Request(op, name=decode_name(rest))
    if rest:
        raise BadRequest(f"/{op.value} takes no name")
    query = _query(query_text) if op in (Op.FILES, Op.REBALANCE) else {}
    if op is Op.REBALANCE:
        flag = query.get("dry_run", ["0"])[-1]
        if flag not in ("0", "1"):
            raise BadRequest(f"dry_run must be 0 or 1, got {flag!r}")
        return Request(op, dry_run=flag == "1")
    if op is Op.FILES:
        return Request(op, listing=parse_list_query(query))
    return Request(op)


def parse_session_request(text: str) -> Request:
    """Parse the text frame that starts an operation in a session: ``{"path": P}``, with
    P what the path of the operation's own connection would be.

    Raises:
        BadRequest: not such an object, or a path that is not an operation.
        BadName: the name breaks the naming rules.
    """
    obj = _json_object(text)
    path = obj.get("path")
    if set(obj) != {"path"} or not isinstance(path, str):
        raise BadRequest('a session request is {"path": "/<operation>..."}')
    req = parse_path(path)
    if req.op is Op.SESSION:
        raise BadRequest("a session cannot start another session")
    return req


def encode_session_request(path: str) -> str:
    """The text frame a client sends to start an operation in a session."""
    return json.dumps({"path": path})


def _query(text: str) -> dict[str, list[str]]:
    if not text:
        return {}
    try:
        return parse_qs(text, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed query string") from None


@dataclass(frozen=True, slots=True)
class UploadHeader:
    """The first text frame of an upload."""

    size: int
    sha256: str | None = None


def parse_upload_header(text: str, max_size: int) -> UploadHeader:
    """Parse and check ``{"size": N, "sha256": "<hex>"?}``.

    Raises:
        BadRequest: not JSON, not an object, unknown keys, bad types.
        TooLarge: ``size`` is above ``max_size``.
    """
    obj = _json_object(text)
    unknown = set(obj) - {"size", "sha256"}
    if unknown:
        raise BadRequest(f"unknown key(s) in upload header: {sorted(unknown)}")
    size = obj.get("size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadRequest("upload header needs an integer 'size'")
    if size < 0:
        raise BadRequest(f"size must be >= 0, got {size}")
    if size > max_size:
        raise TooLarge(f"size {size} exceeds the maximum of {max_size} bytes")
    digest = obj.get("sha256")
    if digest is not None and (not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest)):
        raise BadRequest("'sha256' must be 64 lowercase hex digits")
    return UploadHeader(size=size, sha256=digest)


def encode_upload_header(header: UploadHeader) -> str:
    """The text frame a client sends to start an upload."""
    obj: dict[str, Any] = {"size": header.size}
    if header.sha256 is not None:
        obj["sha256"] = header.sha256
    return json.dumps(obj)


def encode_ok(**fields: Any) -> str:
    """A success reply frame."""
    return json.dumps({"ok": True, **fields}, separators=(",", ":"))


def encode_error(error: Karma8Error) -> str:
    """An error reply frame."""
    return json.dumps({"ok": False, "error": error.code, "message": error.message}, separators=(",", ":"))


def decode_reply(text: str) -> dict[str, Any]:
    """Parse a reply frame; return its fields if ``ok``.

    Raises:
        RemoteError: the frame is an error frame (code and message from the server).
        BadRequest: the frame is not a reply at all.
    """
    obj = _json_object(text)
    ok = obj.get("ok")
    if ok is True:
        return obj
    if ok is False:
        raise RemoteError(str(obj.get("error", "internal")), str(obj.get("message", "")))
    raise BadRequest("reply frame has no 'ok' field")


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame is not a JSON object")
    return obj
