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

tests/integration/test_wsfix.py checks that both are still needed and still work, so an
upgrade that fixes them upstream shows up as a failing test.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio
from trio_websocket import WebSocketConnection
from wsproto.connection import ConnectionState

_original_ping_handler: Any = WebSocketConnection._handle_ping_event


async def _handle_ping_event(self: WebSocketConnection, event: Any) -> None:
    if self._wsproto.state is not ConnectionState.OPEN:
        return  # closing: a Pong now would raise LocalProtocolError in the reader task
    await _original_ping_handler(self, event)


def apply() -> None:
    """Install the ping workaround (idempotent)."""
    WebSocketConnection._handle_ping_event = _handle_ping_event  # type: ignore[method-assign]


def applied() -> bool:
    """True once :func:`apply` has run."""
    return WebSocketConnection._handle_ping_event is _handle_ping_event


async def close_transport(ws: WebSocketConnection) -> None:
    """Close the connection's TCP stream (shielded; idempotent)."""
    stream: trio.abc.AsyncResource = ws._stream  # trio-websocket keeps no public handle
    with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
        await stream.aclose()
