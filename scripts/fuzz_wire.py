"""The fuzzer's wire: WebSocket frames built by hand and a connection over a raw trio socket.

Frames are serialised here, not by wsproto, so that a plan can send what no library
would: reserved bits and opcodes, unmasked or fragmented control frames, lengths that lie.
What the server sends back is parsed with wsproto's frame parser
(:class:`wsproto.frame_protocol.FrameProtocol`), after the HTTP reply to the handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Largest HTTP reply head the reader keeps (the rest still counts as received bytes).
HEAD_LIMIT = 64 * 1024
READ_SIZE = 256 * 1024
#: How long echoing the server's close frame may take.
ECHO_TIMEOUT = 5.0


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key``, repeated (RFC 6455 section 5.3)."""
    if not payload or key == b"\0\0\0\0":
        return payload
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\0\0\0\0",
    length: int | None = None,
    wide: bool = False,
) -> bytes:
    """One frame: ``mask`` None sends it unmasked, ``length`` lies about the payload size,
    ``wide`` uses the 64-bit length form even for a short payload."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    bit = 0 if mask is None else 0x80
    if wide or n > 0xFFFF:
        head = struct.pack("!BBQ", first, bit | 127, n & 0xFFFF_FFFF_FFFF_FFFF)
    elif n >= 126:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BB", first, bit | n)
    if mask is None:
        return head + payload
    return head + mask + mask_payload(payload, mask)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    """The payload of a close frame (None: no code at all)."""
    return b"" if code is None else struct.pack("!H", code & 0xFFFF) + reason


@dataclass
class Received:
    """What the server sent on one connection, as far as it was read."""

    head: bytes = b""
    status: int | None = None
    #: Text messages, in order (replies and error frames).
    texts: list[str] = field(default_factory=list)
    data_messages: int = 0
    data_bytes: int = 0
    #: An empty binary message arrived (the end of a download).
    data_end: bool = False
    close: tuple[int, str] | None = None
    #: Frames that came after the server's close frame.
    after_close: int = 0
    pongs: int = 0
    pings: int = 0
    #: "eof", "reset" or "closed" (we closed it); None while open.
    ended: str | None = None
    #: The server's frames could not be parsed (a server bug, or a reply that is not WebSocket).
    protocol_error: str | None = None
    total: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)


class Conn:
    """One TCP connection with a background reader.

    ``websocket`` selects how received bytes are read: an HTTP reply head and then
    WebSocket frames, or just counted (raw mode keeps the first bytes in ``head``).
    """

    def __init__(self, stream: trio.SocketStream, websocket: bool, answer_close: bool = False) -> None:
        self.stream = stream
        self.websocket = websocket
        self.local_port: int = stream.socket.getsockname()[1]
        #: Echo the server's close frame, as a well-behaved client does (the server then
        #: closes at once instead of waiting for its disconnect timeout).
        self.answer_close = answer_close
        self._close_due: bytes | None = None
        self._send_lock = trio.Lock()
        self.got = Received()
        self.send_failed = False
        self.closed = False
        self._changed = trio.Event()
        self._frames: FrameProtocol | None = None
        self._kind: int | None = None
        self._parts: list[str] = []
        self._size = 0

    # -- reading ---------------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` or the reader has stopped (the caller bounds the wait)."""
        while not done() and self.got.ended is None:
            await self._changed.wait()

    async def wait_closed(self) -> None:
        await self.wait_until(lambda: False)

    def text_count(self) -> int:
        return len(self.got.texts)

    async def read_all(self) -> None:
        """Read until the server closes (the reader task: run it in a nursery)."""
        got = self.got
        try:
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    got.ended = got.ended or "eof"
                    return
                got.total += len(data)
                self._feed(data)
                self._wake()
                if self._close_due is not None and self.answer_close:
                    echo, self._close_due = self._close_due, None
                    with trio.move_on_after(ECHO_TIMEOUT):
                        await self.send(encode_frame(CLOSE, echo, mask=b"\x01\x02\x03\x04"))
        except trio.BrokenResourceError:
            got.ended = got.ended or "reset"
        except trio.ClosedResourceError:
            got.ended = got.ended or "closed"
        finally:
            self._wake()

    def _feed(self, data: bytes) -> None:
        got = self.got
        if self._frames is None:
            if len(got.head) < HEAD_LIMIT:
                got.head += data[: HEAD_LIMIT - len(got.head)]
            if not self.websocket:
                return
            end = got.head.find(b"\r\n\r\n")
            if got.status is None and (end >= 0 or len(got.head) >= HEAD_LIMIT):
                got.status = _status(got.head)
            if end < 0 or got.status != 101:
                return
            rest = got.head[end + 4 :]
            got.head = got.head[: end + 4]
            self._frames = FrameProtocol(client=True, extensions=[])
            data = rest
        if got.protocol_error is not None or not data:
            return
        self._frames.receive_bytes(data)
        try:
            for frame in self._frames.received_frames():
                self._frame(frame.opcode, frame.payload, frame.message_finished)
        except ParseFailed as exc:
            got.protocol_error = f"{exc} (close code {int(exc.code)})"

    def _frame(self, opcode: Opcode, payload: object, finished: bool) -> None:
        got = self.got
        if got.close is not None:
            got.after_close += 1
            return
        if opcode is Opcode.CLOSE:
            code, reason = payload if isinstance(payload, tuple) else (1005, "")
            got.close = (int(code), str(reason))
            self._close_due = close_payload(None if code == 1005 else int(code))
        elif opcode is Opcode.PING:
            got.pings += 1
        elif opcode is Opcode.PONG:
            got.pongs += 1
        else:
            # A large frame arrives in pieces, each with the frame's opcode: a message
            # starts only once the previous one has finished.
            if self._kind is None:
                self._kind, self._parts, self._size = int(opcode), [], 0
            if isinstance(payload, str):
                self._parts.append(payload)
            elif isinstance(payload, bytes | bytearray):
                got.sha.update(payload)
                self._size += len(payload)
            if finished:
                if self._kind == TEXT:
                    got.texts.append("".join(self._parts))
                elif self._size == 0:
                    got.data_end = True
                else:
                    got.data_messages += 1
                    got.data_bytes += self._size
                self._kind = None

    # -- writing and closing ---------------------------------------------------------------

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False if the connection broke. A send cancelled half-way (the caller
        gave up on a server that does not read) also ends the sending: a frame was cut."""
        if self.send_failed or self.closed:
            return False
        sent = False
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
            sent = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.send_failed = not sent
        return sent

    async def shutdown_write(self) -> None:
        if self.send_failed or self.closed:
            return
        try:
            async with self._send_lock:
                await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send_failed = True

    async def aclose(self, reset: bool = False) -> None:
        """Close our end: a FIN, or with ``reset`` an RST (SO_LINGER 0)."""
        if self.closed:
            return
        self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _status(head: bytes) -> int:
    """The status code of an HTTP reply head; 0 if it is not one."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
        return int(line[1])
    return 0


async def connect(port: int, websocket: bool, answer_close: bool = False) -> Conn | None:
    """Open a connection to 127.0.0.1:``port``; None if refused."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return None
    return Conn(stream, websocket, answer_close)
