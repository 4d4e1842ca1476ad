"""Fixes for grpclib 0.4.9 and betterproto2 0.10 (pinned): what hostile peers do to servers, and
one client-side misreading of a status.

Found by ``scripts/fuzz.py --raw`` (docs/fuzzing.md). None of them stopped a server, but
each made one log a traceback for something a peer sent, with no secret needed (the
buckets' health service and every connection's frames come before any check):

1. An HTTP/2 frame of an unknown type, which RFC 9113 (section 4.1) says to ignore, makes
   h2 emit ``UnknownFrameReceived``; grpclib has no processor for it and raises
   ``NotImplementedError`` out of ``data_received``: the transport dies with "Fatal error
   on transport". :func:`apply` ignores events grpclib has no use for.
2. A deadline that has expired on arrival (``grpc-timeout: 1n``) makes grpclib log
   "Timeout occurred" with a traceback instead of answering DEADLINE_EXCEEDED quietly, as
   it does for a deadline that expires later. :func:`apply` treats both alike.
3. A request message that is compressed (unsupported), shorter than its length prefix,
   missing (a unary call ended with no message), or does not decode, escapes as
   ``NotImplementedError``/``AssertionError``/``UnicodeDecodeError``/... through our
   handler: grpclib logs "Application error" and answers UNKNOWN. betterproto2 also
   decodes a field of the wrong wire type into the wrong Python type (a varint in a
   ``string`` field becomes an ``int``) that our code then trips over. :func:`apply`
   answers all of these INVALID_ARGUMENT before our handler sees the message.
4. A request HEADERS frame without ``:method`` or ``:path`` (h2 does not insist, grpclib
   looks them up with ``[]``) is logged by grpclib as "Server error" with a ``KeyError``
   traceback. :func:`apply` answers it with HTTP 400, as grpclib does a wrong method.
5. A grpclib server answers a method it does not have (a bucket of an earlier release
   asked for PutMany) with a trailers-only response: ``grpc-status: 12`` and no
   ``content-type``. grpclib's client checks the content-type before the status and
   raises UNKNOWN "Missing content-type header", so the caller never learns the call is
   UNIMPLEMENTED. :func:`apply` skips that check on a trailers-only response, whose
   status says what happened (the gRPC spec lets it carry no content-type).

tests/unit/test_grpcfix.py checks that each is still needed, so an upgrade that fixes them
upstream shows up as a failing test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpclib.client
import grpclib.exceptions
import grpclib.protocol
import grpclib.server
import grpclib.utils
from grpclib import GRPCError, Status

log = logging.getLogger(__name__)

_original_process: Any = grpclib.protocol.EventsProcessor.process
_original_deadline_start: Any = grpclib.utils.DeadlineWrapper.start
_original_recv_message: Any = grpclib.server.Stream.recv_message
_original_request_handler: Any = grpclib.server.request_handler
_original_content_type: Any = grpclib.client.Stream._raise_for_content_type

#: What a field's ``proto_type`` must decode to (``message`` fields are checked recursively).
_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "bytes": (bytes, bytearray),
    "bool": bool,
    "double": float,
    "float": float,
    **{t: int for t in ("int32", "int64", "uint32", "uint64", "sint32", "sint64")},
    **{t: int for t in ("fixed32", "fixed64", "sfixed32", "sfixed64", "enum")},
}


def _process(self: grpclib.protocol.EventsProcessor, event: Any) -> None:
    processors = getattr(self, "processors", None)
    if processors is not None and event.__class__ not in processors:
        log.debug("ignoring HTTP/2 event %s", type(event).__name__)
        return
    _original_process(self, event)


@contextlib.contextmanager
def _deadline_start(self: grpclib.utils.DeadlineWrapper, deadline: Any) -> Iterator[None]:
    if not deadline.time_remaining():
        self.cancelled = True  # grpclib then answers DEADLINE_EXCEEDED, logged at info
        raise TimeoutError("Deadline exceeded")
    with _original_deadline_start(self, deadline):
        yield


def malformed(message: Any) -> str | None:
    """Why a decoded message cannot be what its type declares (None when it can)."""
    meta = getattr(type(message), "_betterproto", None)
    if meta is None:
        return None
    for name, field in meta.meta_by_field_name.items():
        value = getattr(message, name)
        values = list(value.values()) if isinstance(value, dict) else value if field.repeated else [value]
        if not isinstance(values, list):
            return f"field {name!r} is not repeated"
        for item in values:
            if item is None and (getattr(field, "optional", False) or getattr(field, "group", None)):
                continue  # an unset optional or oneof field
            if field.proto_type == "message":
                problem = None if item is None else malformed(item)
            else:
                expected = _PYTHON_TYPES.get(field.proto_type)
                ok = expected is None or isinstance(item, expected)
                problem = None if ok else f"field {name!r} is not a {field.proto_type}"
            if problem is not None:
                return problem
    return None


async def _recv_message(self: grpclib.server.Stream[Any, Any]) -> Any:
    try:
        message = await _original_recv_message(self)
    except (TimeoutError, GRPCError, asyncio.CancelledError, grpclib.exceptions.StreamTerminatedError):
        raise
    except (NotImplementedError, AssertionError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"malformed request message ({type(exc).__name__})"
        ) from None
    if message is None:
        if not self._cardinality.client_streaming:
            raise GRPCError(Status.INVALID_ARGUMENT, "the call carries no request message")
        return None
    problem = malformed(message)
    if problem is not None:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed request message: {problem}")
    return message


async def _request_handler(
    mapping: Any,
    stream: Any,
    headers: Any,
    codec: Any,
    status_details_codec: Any,
    dispatch: Any,
    release_stream: Any,
) -> None:
    names = {name for name, _ in headers}
    if ":method" in names and ":path" in names:
        await _original_request_handler(
            mapping, stream, headers, codec, status_details_codec, dispatch, release_stream
        )
        return
    try:
        await grpclib.server._abort(stream, 400)
    except Exception as exc:  # the peer may have reset the stream already: nothing to answer
        log.debug("could not refuse a request without :method or :path: %r", exc)
    finally:
        release_stream()


def _raise_for_content_type(self: grpclib.client.Stream[Any, Any], headers_map: dict[str, str]) -> None:
    if "grpc-status" in headers_map:  # trailers-only: its status is read next
        return
    _original_content_type(self, headers_map)


def apply() -> None:
    """Install the five fixes (idempotent; before a server or channel starts)."""
    grpclib.protocol.EventsProcessor.process = _process  # type: ignore[method-assign]
    grpclib.utils.DeadlineWrapper.start = _deadline_start  # type: ignore[method-assign]
    grpclib.server.Stream.recv_message = _recv_message  # type: ignore[method-assign]
    grpclib.server.request_handler = _request_handler  # type: ignore[assignment]
    grpclib.client.Stream._raise_for_content_type = _raise_for_content_type  # type: ignore[method-assign]


def applied() -> bool:
    """True once :func:`apply` has run."""
    return (
        grpclib.protocol.EventsProcessor.process is _process
        and grpclib.server.Stream.recv_message is _recv_message
        and grpclib.utils.DeadlineWrapper.start is _deadline_start
        and grpclib.server.request_handler is _request_handler
        and grpclib.client.Stream._raise_for_content_type is _raise_for_content_type
    )
