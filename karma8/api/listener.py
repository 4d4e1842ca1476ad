"""The API's WebSocket listener: one error boundary around every connection.

trio-websocket's own server runs each connection's reader task and handler in a nursery
with nothing around it, so an exception from either (a bug of ours, or the library
refusing something a hostile client provoked) escapes into the listener and stops the
whole server. Here every connection runs inside :func:`_serve_connection`: whatever
escapes it is logged once with the session's context, counted, and ends that connection
alone, with a 1011 Close when one can still be sent. Cancellation (the server stopping)
passes through.

Only trio-websocket's public ``wrap_server_stream`` is used to speak WebSocket; the
listeners are trio's, opened as ``serve_websocket`` opens them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection
from wsproto.utilities import LocalProtocolError

from karma8.api.session import SessionLog
from karma8.core.protocol import CloseCode

log = logging.getLogger(__name__)

#: How long the boundary tries to send its 1011 Close to a connection that failed.
CLOSE_DEADLINE = 1.0


@dataclass
class Connection:
    """What the boundary knows of one connection; the handler fills in the rest."""

    session_id: int
    remote: str
    log: SessionLog
    path: str = ""
    #: The accepted WebSocket, once the handler has accepted the handshake.
    ws: WebSocketConnection | None = field(default=None, repr=False)


#: Serves one connection: the handshake request and its :class:`Connection`.
Handler = Callable[[WebSocketRequest, Connection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """How the listener treats each connection (values from the API config)."""

    max_message_size: int
    receive_buffer_size: int
    #: Limit for the opening handshake; the connection is dropped after it.
    handshake_timeout: float
    #: Bind with SO_REUSEPORT: the worker processes of one host share the port.
    reuse_port: bool = False


async def _shared_listener(host: str, port: int) -> trio.SocketListener:
    """A listener on ``host:port`` that other processes may also bind (SO_REUSEPORT): the
    kernel spreads the connections over them."""
    family, type_, proto, _, address = (
        await trio.socket.getaddrinfo(
            host or None, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
        )
    )[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind(address)
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def serve_websockets(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    settings: ListenerSettings,
    on_escape: Callable[[], None],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket connections on ``host:port`` until cancelled; ``started()`` gets the port.

    ``on_escape`` is called once for each connection that an unexpected error ended.
    """
    listeners: list[trio.abc.Listener[trio.abc.Stream]]
    if settings.reuse_port:
        tcp = [await _shared_listener(host, port)]
        listeners = (
            list(tcp)
            if ssl_context is None
            else [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
        )
    elif ssl_context is None:
        listeners = list(await trio.open_tcp_listeners(port, host=host))
    else:
        listeners = list(
            await trio.open_ssl_over_tcp_listeners(port, ssl_context, host=host, https_compatible=True)
        )
    ids = itertools.count(1)
    serve_one = functools.partial(_serve_connection, handler, settings, on_escape, ids)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_one, listeners)
        first = listeners[0]
        inner = first.transport_listener if isinstance(first, trio.SSLListener) else first
        assert isinstance(inner, trio.SocketListener)
        task_status.started(int(inner.socket.getsockname()[1]))


async def _serve_connection(
    handler: Handler,
    settings: ListenerSettings,
    on_escape: Callable[[], None],
    ids: itertools.count[int],
    stream: trio.abc.Stream,
) -> None:
    session_id = next(ids)
    conn = Connection(session_id, _remote(stream), SessionLog(log, session_id))
    try:
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(settings.handshake_timeout):
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=settings.max_message_size,
                    receive_buffer_size=settings.receive_buffer_size,
                )
            if request is not None:
                conn.path = request.path
                await handler(request, conn)
            # The handler is done with its WebSocket (or never got one): stop the reader
            # task, still waiting for the peer. Cancel it rather than close the stream: if
            # it failed (its error is on its way out of the nursery) the boundary can still
            # send a 1011 Close on the stream.
            nursery.cancel_scope.cancel()
    except* Exception as group:
        on_escape()
        conn.log.error(
            "connection from %s%s ended by an unexpected error; the server goes on",
            conn.remote,
            f" ({conn.path[:200]})" if conn.path else "",
            exc_info=group,
        )
        await _close_after_error(conn)
    finally:
        await trio.aclose_forcefully(stream)


async def _close_after_error(conn: Connection) -> None:
    """Send a 1011 Close where the WebSocket can still send one (best effort, shielded)."""
    ws = conn.ws
    if ws is None or ws._wsproto.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
        return
    with (
        trio.move_on_after(CLOSE_DEADLINE, shield=True),
        contextlib.suppress(ConnectionClosed, LocalProtocolError, trio.BrokenResourceError),
    ):
        # The reader task is gone with the connection's nursery: send the frame directly.
        await ws._send(CloseConnection(code=CloseCode.INTERNAL_ERROR, reason="internal error"))


def _remote(stream: trio.abc.Stream) -> str:
    """``host:port`` of the peer, for log lines ("?" when the socket cannot tell)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        with contextlib.suppress(OSError):
            host, port, *_ = inner.socket.getpeername()
            return f"{host}:{port}"
    return "?"
