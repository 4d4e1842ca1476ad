"""Workarounds for trio-websocket 0.12.2 (the version pinned in pyproject.toml).

1. The TCP stream stays open when the *peer* starts the closing handshake: the reader
   task stops at EOF without closing it, and ``aclose()`` returns early because a close
   reason is already recorded. The socket lingers until garbage collection, holding a
   file descriptor. :func:`close_transport` closes it; our server handler and client call
   it when done with a connection (closing a trio stream twice is harmless).
2. A ping that arrives while we are closing is answered with a Pong that wsproto refuses
   in state LOCAL_CLOSING; the error escapes the reader task and takes the whole server
   down (upstream issue #184, fix proposed in PR #198). :func:`apply` makes the reader
   ignore pings unless the connection is open, as that PR does.
3. A connection that dies before the opening handshake (a TLS handshake refused for a
   certificate, a plaintext client on a TLS port, a server that hangs up) is noticed only
   by the reader task, which stops without a word: the connecting client waits for its
   whole ``connect_timeout`` and then reports a bare ``ConnectionTimeout``, and the socket
   stays open on both sides (until the server's connect timeout). :func:`apply` makes
   the reader do the TLS handshake first and close the stream at once when it fails; a
   client then fails at once with a :class:`HandshakeError` that says why.
4. A message that grows past ``max_message_size`` after we sent our Close (a client that
   keeps sending while the server closes, e.g. after an error frame) makes the reader send
   a 1009 Close in state LOCAL_CLOSING; wsproto refuses it with ``LocalProtocolError``,
   which escapes the reader task and, like 2, takes the whole server down (same class as
   upstream issue #175). Messages that arrive after our Close are discarded anyway (the
   receive channel is closed): :func:`apply` makes the reader drop them as they arrive,
   without buffering or size checks, and keep reading until the peer's Close or EOF ends
   the closing handshake. docs/decisions.md has the upstream description.

tests/integration/test_wsfix.py checks that all four are still needed and still work, so
an upgrade that fixes them upstream shows up as a failing test.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio
from trio_websocket import HandshakeError, WebSocketConnection
from wsproto.connection import ConnectionState

log = logging.getLogger(__name__)

_original_ping_handler: Any = WebSocketConnection._handle_ping_event
_original_reader_task: Any = WebSocketConnection._reader_task
_original_message_handler: Any = WebSocketConnection._handle_message_event


async def _handle_ping_event(self: WebSocketConnection, event: Any) -> None:
    if self._wsproto.state is not ConnectionState.OPEN:
        return  # closing: a Pong now would raise LocalProtocolError in the reader task
    await _original_ping_handler(self, event)


async def _handle_message_event(self: WebSocketConnection, event: Any) -> None:
    if self._wsproto.state is not ConnectionState.OPEN:
        # Our Close is out: nobody reads this message, and a 1009 Close for it could not
        # be sent. Drop it (and anything buffered of it) instead of growing a buffer.
        self._message_size = 0
        self._message_parts = []
        return
    await _original_message_handler(self, event)


async def _reader_task(self: WebSocketConnection) -> None:
    stream = self._stream
    if isinstance(stream, trio.SSLStream):
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = str(exc.__cause__ or exc) or type(exc).__name__
            if not self.is_client:
                with contextlib.suppress(OSError):  # the peer may be gone already
                    log.info("TLS handshake with %s failed: %s", self.remote, reason)
            await trio.aclose_forcefully(stream)
            if self.is_client:
                raise HandshakeError(f"TLS handshake failed: {reason}") from exc
            return
    await _original_reader_task(self)
    if self.is_client and not self._open_handshake.is_set():
        await trio.aclose_forcefully(self._stream)
        raise HandshakeError("the server closed the connection during the opening handshake")


def apply() -> None:
    """Install the ping, handshake and closing-message workarounds (idempotent)."""
    WebSocketConnection._handle_ping_event = _handle_ping_event  # type: ignore[method-assign]
    WebSocketConnection._reader_task = _reader_task  # type: ignore[method-assign]
    WebSocketConnection._handle_message_event = _handle_message_event  # type: ignore[method-assign]


def applied() -> bool:
    """True once :func:`apply` has run."""
    return (
        WebSocketConnection._handle_ping_event is _handle_ping_event
        and WebSocketConnection._reader_task is _reader_task
        and WebSocketConnection._handle_message_event is _handle_message_event
    )


async def close_transport(ws: WebSocketConnection) -> None:
    """Close the connection's TCP stream (shielded; idempotent)."""
    stream: trio.abc.AsyncResource = ws._stream  # trio-websocket keeps no public handle
    with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
        await stream.aclose()
