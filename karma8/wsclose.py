"""Closing a trio-websocket connection's TCP stream for sure.

trio-websocket 0.12.2 leaves the TCP stream open when the *peer* starts the closing
handshake: its reader task stops at EOF without closing the stream, and ``aclose()``
returns early because a close reason is already recorded. The socket then lingers until
garbage collection (a ResourceWarning, and file descriptors held by a busy server). Both
our server's handler and our client call :func:`close_transport` when done with a
connection; closing a trio stream twice is harmless. tests/integration/test_wsclose.py
shows the upstream behaviour and fails when it changes, so this can then go.
"""

from __future__ import annotations

import contextlib

import trio
from trio_websocket import WebSocketConnection


async def close_transport(ws: WebSocketConnection) -> None:
    """Close the connection's TCP stream (shielded; idempotent)."""
    stream: trio.abc.AsyncResource = ws._stream  # trio-websocket keeps no public handle
    with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
        await stream.aclose()
