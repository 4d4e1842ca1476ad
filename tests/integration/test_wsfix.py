"""The four trio-websocket 0.12.2 workarounds in karma8.wsfix: still needed, and working.

Each test first shows the upstream bug is still there, so an upgrade that fixes it turns
the test red and says the workaround can go.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import struct

import pytest
import trio
import trio.testing
import trustme
import wsproto
import wsproto.utilities
from trio_websocket import (
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from karma8 import wsfix
from karma8.wsfix import close_transport

DEADLINE = 10.0


async def test_peer_close_leaves_the_transport_open_until_close_transport() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("bye")
        await ws.aclose()  # the server starts the closing handshake

    client: WebSocketConnection | None = None
    async with trio.open_nursery() as nursery:
        try:
            server: WebSocketServer = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                client = ws
                assert await ws.get_message() == "bye"
                with trio.fail_after(DEADLINE):
                    while ws.closed is None:  # noqa: ASYNC110 - no event to wait on
                        await trio.sleep(0.01)
            # The context has exited: the reader task is done and aclose() has returned.
            stream = client._stream
            assert isinstance(stream, trio.SocketStream)
            assert stream.socket.fileno() != -1, (
                "trio-websocket now closes the TCP stream when the peer closes first: "
                "wsfix.close_transport is no longer needed"
            )
            await close_transport(client)
            assert stream.socket.fileno() == -1
            await close_transport(client)  # idempotent
        finally:
            if client is not None:
                await close_transport(client)
            nursery.cancel_scope.cancel()


def _server_connection(
    state: ConnectionState,
) -> tuple[WebSocketConnection, trio.testing.MemorySendStream, wsproto.WSConnection]:
    """A server-side WebSocketConnection whose wsproto is OPEN or LOCAL_CLOSING.

    The handshake is played by hand with a wsproto client (also returned, to read what
    the connection sends); the connection's stream records what it sends.
    """
    peer = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(peer.send(Request(host="localhost", target="/")))
    assert [type(e) for e in server.events()] == [Request]
    peer.receive_data(server.send(AcceptConnection()))
    assert server.state is ConnectionState.OPEN
    if state is ConnectionState.LOCAL_CLOSING:
        server.send(CloseConnection(code=1000))
    assert server.state is state

    outgoing = trio.testing.MemorySendStream()
    stream = trio.StapledStream(outgoing, trio.testing.MemoryReceiveStream())
    return WebSocketConnection(stream, server, path="/"), outgoing, peer


def _sent(outgoing: trio.testing.MemorySendStream) -> bytes:
    """Everything written to ``outgoing`` since the last call."""
    try:
        return bytes(outgoing.get_data_nowait())
    except trio.WouldBlock:
        return b""


async def test_ping_while_closing_crashes_upstream_and_is_ignored_once_applied() -> None:
    conn, outgoing, _ = _server_connection(ConnectionState.LOCAL_CLOSING)

    # Upstream: the Pong is refused in LOCAL_CLOSING, in the reader task (issue #184).
    with pytest.raises(wsproto.utilities.LocalProtocolError):
        await wsfix._original_ping_handler(conn, Ping(b"late"))
    assert _sent(outgoing) == b""

    wsfix.apply()
    assert wsfix.applied()
    wsfix.apply()  # idempotent
    assert wsfix.applied()
    await conn._handle_ping_event(Ping(b"late"))
    assert _sent(outgoing) == b"", "a Pong was sent while closing"
    assert conn._wsproto.state is ConnectionState.LOCAL_CLOSING


async def test_ping_on_an_open_connection_is_still_answered_once_applied() -> None:
    wsfix.apply()
    conn, outgoing, peer = _server_connection(ConnectionState.OPEN)
    assert [type(e) for e in peer.events()] == [AcceptConnection]
    await conn._handle_ping_event(Ping(b"hello"))
    peer.receive_data(_sent(outgoing))
    assert list(peer.events()) == [Pong(b"hello")]


async def _tls_handshake_outcome(
    ssl_context: ssl.SSLContext | None, server_context: ssl.SSLContext
) -> tuple[BaseException, float]:
    """What connecting to a TLS WebSocket server raises, and after how long."""

    async def handler(request: WebSocketRequest) -> None:
        await request.accept()

    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            serve_websocket, handler, "127.0.0.1", 0, server_context
        )
        scheme = "ws" if ssl_context is None else "wss"
        start = trio.current_time()
        with pytest.raises(HandshakeError) as info:
            async with open_websocket_url(
                f"{scheme}://127.0.0.1:{server.port}/", ssl_context, connect_timeout=1.0
            ):
                pass
        nursery.cancel_scope.cancel()
    return info.value, trio.current_time() - start


async def test_a_refused_tls_handshake_fails_at_once_once_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    distrustful = ssl.create_default_context()
    stranger.configure_trust(distrustful)

    # Upstream: the client waits for its whole connect_timeout and says nothing useful.
    upstream: list[WebSocketConnection] = []

    async def upstream_reader(self: WebSocketConnection) -> None:
        upstream.append(self)
        await wsfix._original_reader_task(self)

    monkeypatch.setattr(WebSocketConnection, "_reader_task", upstream_reader)
    error, took = await _tls_handshake_outcome(distrustful, server_context)
    assert isinstance(error, ConnectionTimeout), "trio-websocket now fails a TLS handshake at once"
    assert took >= 1.0
    monkeypatch.undo()
    for conn in upstream:  # the sockets upstream leaves open, client and server side
        await trio.aclose_forcefully(conn._stream)

    wsfix.apply()
    error, took = await _tls_handshake_outcome(distrustful, server_context)
    assert "TLS handshake failed" in str(error)
    assert "certificate verify failed" in str(error)
    assert took < 1.0
    # A plaintext client on the TLS port: the server hangs up at once, the client says so.
    error, took = await _tls_handshake_outcome(None, server_context)
    assert "closed the connection during the opening handshake" in str(error)
    assert took < 1.0


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame with an all-zero mask key, built by hand: wsproto would refuse
    to send data once the server's Close has arrived, and that is what a hostile client does."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload


async def _receive_events(stream: trio.SocketStream, peer: wsproto.WSConnection, until: type) -> list[object]:
    """Feed ``peer`` what the server sends until an event of type ``until`` (or EOF)."""
    seen: list[object] = []
    with trio.fail_after(DEADLINE):
        while True:
            data = await stream.receive_some(65536)
            peer.receive_data(data or None)
            seen.extend(peer.events())
            if not data or any(isinstance(e, until) for e in seen):
                return seen


async def _too_big_after_the_servers_close(port: int) -> bytes:
    """The issue 11 session: a header frame the server refuses (it answers and starts
    closing), then a message above max_message_size. Returns what the server sent after
    its Close, until it hung up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        peer = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(peer.send(Request(host="127.0.0.1", target="/upload/x")))
        await _receive_events(stream, peer, AcceptConnection)
        await stream.send_all(peer.send(TextMessage("{")))
        await _receive_events(stream, peer, CloseConnection)  # the server is LOCAL_CLOSING now
        await stream.send_all(_masked_frame(0x2, b"x" * (2 * MAX_MESSAGE)))
        await stream.send_all(_masked_frame(0x8, struct.pack("!H", 1000)))  # our Close reply
        after = b""
        with trio.fail_after(DEADLINE):
            while data := await stream.receive_some(65536):
                after += data
        return after


MAX_MESSAGE = 1 << 20


async def _refusing_handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    await ws.get_message()
    await ws.send_message('{"ok":false,"error":"bad_request"}')
    await ws.aclose(4400, "bad_request")


async def test_a_message_too_big_while_closing_crashes_upstream_and_is_dropped_once_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Upstream: the reader sends a 1009 Close in LOCAL_CLOSING; wsproto refuses it and the
    # error escapes the connection's nursery into serve_websocket: the server is gone.
    monkeypatch.setattr(WebSocketConnection, "_handle_message_event", wsfix._original_message_handler)
    with pytest.RaisesGroup(
        pytest.RaisesExc(wsproto.utilities.LocalProtocolError, match="1009.*LOCAL_CLOSING"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            server: WebSocketServer = await nursery.start(
                functools.partial(
                    serve_websocket, _refusing_handler, "127.0.0.1", 0, None, max_message_size=MAX_MESSAGE
                )
            )
            with contextlib.suppress(trio.BrokenResourceError):  # the server dies as we send
                await _too_big_after_the_servers_close(server.port)
            await trio.sleep_forever()  # until the server's crash cancels the test's nursery
    monkeypatch.undo()

    wsfix.apply()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve_websocket, _refusing_handler, "127.0.0.1", 0, None, max_message_size=MAX_MESSAGE
            )
        )
        for _ in range(2):  # the message is dropped, the handshake ends, the server serves on
            assert await _too_big_after_the_servers_close(server.port) == b"", "a second Close was sent"
        nursery.cancel_scope.cancel()
