"""Speed fixes inside grpclib 0.4.9, h2 4.4.1, hyperframe 6.1.0 and wsproto 1.3.2 (pinned).

Measured on the bucket streams (see docs/performance.md); each one is a change upstream
could make, kept here until it does:

1. **No hex dump of every received DATA frame.** h2 evaluates ``repr(frame)`` for a
   trace log call on every frame it receives, even when nothing logs; hyperframe's
   ``DataFrame`` repr serializes the whole frame body to show its first bytes. That was
   17% of the API server's CPU during a download. :func:`apply` gives DATA frames a repr
   that names their length instead.
2. **256 KiB HTTP/2 frames.** grpclib keeps h2's default SETTINGS_MAX_FRAME_SIZE
   (16 KiB), so a 1 MiB gRPC message goes out as 64 frames, each cut with a ``BytesIO``
   read, an h2 ``send_data`` and a transport write. :func:`apply` makes every grpclib
   connection announce that it accepts 256 KiB frames; since both ends of our
   connections are grpclib, each sends 256 KiB frames to the other. (It also works
   around an h2 race that would otherwise fail a connection: see
   :func:`announce_large_frames`.)

3. **WebSocket masking with numpy.** Every client-to-server frame is XORed with a
   4-byte key, by the client and again by the server; wsproto does it with four
   strided ``bytes.translate`` calls (about 1 GB/s, a fifth of the client's CPU on an
   upload). :func:`apply_websocket` does it as one numpy XOR of 32-bit words (about
   30 GB/s). numpy costs about 12 MB of RSS, so only WebSocket users (the API server,
   the client) load it, never a bucket. wsproto also copies every outgoing frame's
   payload five times (into a bytearray, for the masker, out of it, header + payload,
   and into the bytes ``Connection.send`` returns): frames are built here with one copy,
   the masked ones XORed straight into the frame.
4. **gRPC data messages sent without copies.** To send one 1 MiB chunk, betterproto
   copies it into the encoded message, grpclib copies that behind the 5-byte gRPC prefix
   and again into each DATA frame (``BytesIO.read``), and h2 copies every frame three
   more times (body, header + body, its output buffer): up to 70% of a bucket's CPU
   while it serves a Get. :func:`apply` replaces grpclib's ``send_message`` (client and
   server side): a message's large ``data`` field is kept out of the encoding, and its
   DATA frames are written with ``transport.writelines`` straight from memoryviews of
   the caller's bytes, while h2's state machine and flow-control windows are updated
   exactly as its ``send_data`` would (:func:`write_data_frame`).

5. **Large buffers kept by glibc's allocator.** glibc serves every allocation of
   128 KiB or more with a fresh ``mmap`` and returns it with ``munmap`` when freed, so
   each 1 MiB chunk (and each copy of it) costs 256 page faults and the kernel zeroing
   those pages: two thirds of the client's CPU on an upload were system time.
   :func:`tune_malloc` raises the mmap threshold above our largest chunk, keeps a
   bounded amount of freed memory for reuse and uses one heap for all threads
   (``mallopt``; the same as the ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
   and ``MALLOC_ARENA_MAX`` variables, set from code so that every karma8 process gets
   it). The CLI calls it first thing.

``tests/unit/test_speedups.py`` checks that they are active, that they change nothing
but speed, and fails when a library changes underneath them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Sequence
from functools import cache
from typing import Any, cast

import grpclib.client
import grpclib.encoding.proto
import grpclib.protocol
import grpclib.server
import grpclib.stream
import h2.connection
import hyperframe.frame
import wsproto.connection
import wsproto.events
import wsproto.frame_protocol
from h2.connection import ConnectionInputs
from h2.settings import SettingCodes
from h2.stream import StreamInputs
from wsproto.frame_protocol import (
    MAX_PAYLOAD_NORMAL,
    MAX_PAYLOAD_TWO_BYTE,
    PAYLOAD_LENGTH_EIGHT_BYTE,
    PAYLOAD_LENGTH_TWO_BYTE,
)

log = logging.getLogger(__name__)

#: The largest HTTP/2 frame our gRPC connections accept (the protocol allows 16 MiB).
MAX_FRAME_SIZE = 256 * 1024

_original_connection_made: Any = grpclib.protocol.H2Protocol.connection_made
_original_data_repr: Any = hyperframe.frame.DataFrame._body_repr
_original_mask: Any = wsproto.frame_protocol.XorMaskerSimple.process
_original_serialize_frame: Any = wsproto.frame_protocol.FrameProtocol._serialize_frame
_original_connection_send: Any = wsproto.connection.Connection.send
_original_send_message: Any = grpclib.stream.send_message

#: A ``data`` field at least this large is sent from the caller's buffer (fix 4).
ZERO_COPY_MIN = 16 * 1024

_DATA_FRAME_HEADER = struct.Struct(">HBBBL")  # hyperframe's frame header layout
_DATA_TYPE = hyperframe.frame.DataFrame.type
_END_STREAM = 0x01
_GRPC_PREFIX = struct.Struct(">?I")  # compressed flag, message length


def _data_frame_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes of data, pad {self.pad_length}>"


def announce_large_frames(h2_conn: h2.connection.H2Connection) -> None:
    """Tell the peer we accept ``MAX_FRAME_SIZE`` frames, and accept them from now on.

    h2 applies a new local setting only when the peer acknowledges it, and checks frame
    lengths against the limit it had when a ``receive_data`` call began: a peer's ACK and
    its first large frame in one read would fail the connection (FrameTooLargeError).
    Accepting large frames at once, before the ACK, closes that window.
    """
    h2_conn.update_settings({SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE})
    h2_conn.max_inbound_frame_size = MAX_FRAME_SIZE


def _connection_made(self: grpclib.protocol.H2Protocol, transport: Any) -> None:
    _original_connection_made(self, transport)
    announce_large_frames(self.connection._connection)
    self.connection.flush()


def _xor_into(out: memoryview | bytearray, data: bytes | bytearray | memoryview, key: bytes) -> None:
    """``out[i] = data[i] ^ key[i % 4]`` for every byte of ``data``."""
    import numpy as np  # imported here: see apply_websocket

    size = len(data)
    words = size // 4
    if words:
        np.bitwise_xor(
            np.frombuffer(data, dtype=np.uint32, count=words),
            np.frombuffer(key, dtype=np.uint32)[0],
            out=np.frombuffer(out, dtype=np.uint32, count=words),
        )
    for i in range(4 * words, size):  # at most 3 bytes
        out[i] = data[i] ^ key[i % 4]


def _mask(self: wsproto.frame_protocol.XorMaskerSimple, data: bytes | bytearray | memoryview) -> bytearray:
    """``XorMaskerSimple.process``: XOR with the key, which then continues where it ended."""
    key = bytes(self._masking_key)
    out = bytearray(len(data))
    _xor_into(out, data, key)
    rotation = len(data) % 4
    self._masking_key = key[rotation:] + key[:rotation]
    return out


def _serialize_frame(
    self: wsproto.frame_protocol.FrameProtocol,
    opcode: wsproto.frame_protocol.Opcode,
    payload: bytes | bytearray | memoryview = b"",
    fin: bool = True,
) -> bytearray:
    """``FrameProtocol._serialize_frame`` with one copy of the payload instead of five."""
    if self.extensions:  # they may rewrite the payload: wsproto's own way
        return _original_serialize_frame(self, opcode, payload, fin)  # type: ignore[no-any-return]
    length = len(payload)
    if length > MAX_PAYLOAD_NORMAL and opcode.iscontrol():
        raise ValueError("payload too long for control frame")
    first = self._make_fin_rsv_opcode(fin, wsproto.frame_protocol.RsvBits(False, False, False), opcode)
    mask_bit = 0x80 if self.client else 0
    if length <= MAX_PAYLOAD_NORMAL:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length <= MAX_PAYLOAD_TWO_BYTE:
        header = struct.pack("!BBH", first, mask_bit | PAYLOAD_LENGTH_TWO_BYTE, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | PAYLOAD_LENGTH_EIGHT_BYTE, length)
    if not self.client:
        return bytearray(header) + payload
    key = os.urandom(4)  # a fresh, unpredictable key for every frame (RFC 6455, 5.3)
    start = len(header) + 4
    out = bytearray(start + length)
    out[:start] = header + key
    _xor_into(memoryview(out)[start:], payload, key)
    return out


def _connection_send(self: wsproto.connection.Connection, event: wsproto.events.Event) -> bytes:
    """``Connection.send`` without copying a data frame once more into ``b"" + frame``."""
    if isinstance(event, wsproto.events.Message) and self.state is wsproto.connection.ConnectionState.OPEN:
        # A bytearray, not bytes: the socket's send_all takes any buffer.
        return cast(bytes, self._proto.send_data(event.data, event.message_finished))
    return _original_connection_send(self, event)  # type: ignore[no-any-return]


@cache
def _data_field_key(message_type: Any) -> bytes | None:
    """The protobuf key of ``message_type``'s ``bytes data`` field, if it has one."""
    meta = getattr(message_type, "_betterproto", None)
    field = meta.meta_by_field_name.get("data") if meta is not None else None
    if field is None or field.proto_type != "bytes" or field.repeated:
        return None
    return _varint(field.number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_message(codec: Any, message: Any, message_type: Any) -> list[bytes]:
    """The gRPC message (5-byte prefix included) as buffers to send one after another.

    A large ``data`` field is left out of the protobuf encoding and appended as a buffer
    of its own behind its key and length: the same message on the wire, without a copy.
    """
    key = _data_field_key(message_type)
    data = getattr(message, "data", None)
    if (
        key is None
        or type(message) is not message_type
        or type(data) is not bytes
        or len(data) < ZERO_COPY_MIN
        or not isinstance(codec, grpclib.encoding.proto.ProtoCodec)
    ):
        encoded = codec.encode(message, message_type)
        return [_GRPC_PREFIX.pack(False, len(encoded)) + encoded]
    message.data = b""  # the default: left out of the encoding
    try:
        head = codec.encode(message, message_type)
    finally:
        message.data = data
    head += key + _varint(len(data))
    return [_GRPC_PREFIX.pack(False, len(head) + len(data)) + head, data]


def write_data_frame(
    h2_conn: h2.connection.H2Connection,
    transport: Any,
    stream_id: int,
    views: Sequence[memoryview | bytes],
    end_stream: bool,
) -> None:
    """Write one DATA frame made of ``views``: h2's ``send_data`` without its copies.

    The connection's and the stream's state machines and flow-control windows change
    as ``H2Connection.send_data`` changes them; the frame header is packed here and the
    payload goes to the transport as it is. The caller has checked the window and the
    frame size, as grpclib does before calling ``send_data``.
    """
    length = sum(len(v) for v in views)
    h2_conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream = h2_conn._get_stream_by_id(stream_id)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    stream.outbound_flow_control_window -= length
    h2_conn.outbound_flow_control_window -= length
    header = _DATA_FRAME_HEADER.pack(
        (length >> 8) & 0xFFFF, length & 0xFF, _DATA_TYPE, _END_STREAM if end_stream else 0, stream_id
    )
    pending = h2_conn.data_to_send()  # frames h2 queued before this one go first
    transport.writelines([pending, header, *views] if pending else [header, *views])


async def send_buffers(stream: grpclib.protocol.Stream, buffers: Sequence[bytes], end_stream: bool) -> None:
    """grpclib's ``Stream.send_data`` for data held in several buffers, without copies."""
    assert stream.id is not None
    h2_conn = stream._h2_connection
    total = sum(len(b) for b in buffers)
    views = [memoryview(b) for b in buffers if b]
    index = offset = sent = 0
    while True:
        await stream.connection.write_ready.wait()
        window = h2_conn.local_flow_control_window(stream.id)
        if not window > 0:  # it can become negative
            stream.window_updated.clear()
            await stream.window_updated.wait()
            continue  # other streams may have used the window meanwhile
        size = min(window, h2_conn.max_outbound_frame_size, total - sent)
        frame: list[memoryview] = []
        left = size
        while left:
            view = views[index]
            taken = view[offset : offset + left]
            frame.append(taken)
            left -= len(taken)
            offset += len(taken)
            if offset == len(view):
                index, offset = index + 1, 0
        sent += size
        write_data_frame(h2_conn, stream._transport, stream.id, frame, end_stream and sent == total)
        stream.data_sent += size
        stream.connection.data_sent += size
        stream.connection.data_send_process()
        if sent == total:
            return


async def _send_message(
    stream: grpclib.protocol.Stream, codec: Any, message: Any, message_type: type, *, end: bool = False
) -> None:
    """grpclib.stream.send_message, sending large data fields without copying them."""
    await send_buffers(stream, encode_message(codec, message, message_type), end)


#: Allocations at least this large get their own mmap (fix 5): above a 4 MiB chunk.
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at the top of a heap beyond this goes back to the system (fix 5).
TRIM_THRESHOLD = 16 * 1024 * 1024
#: One heap for all threads (fix 5): a chunk allocated by the asyncio thread and freed
#: by trio's would otherwise keep memory in two heaps (API: 10 MB more at peak).
ARENA_MAX = 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@cache
def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Install fix 5 in this process; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.info("mallopt refused the allocator settings; large buffers stay on mmap")
    return bool(ok)


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``, fix 5).

    The heap keeps up to :data:`TRIM_THRESHOLD` free at its top and every free page
    below it; after a large transfer that is 10-20 MB the process holds for nothing.
    ``malloc_trim`` releases them (``MADV_DONTNEED``) in well under a millisecond, so
    the API calls it when a large transfer ends.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def apply_websocket() -> None:
    """Install fix 3 and its frame serializer (idempotent; loads numpy)."""
    import numpy  # noqa: F401  (loaded here, not in every process)

    wsproto.frame_protocol.XorMaskerSimple.process = _mask  # type: ignore[method-assign]
    wsproto.frame_protocol.FrameProtocol._serialize_frame = _serialize_frame  # type: ignore[method-assign]
    wsproto.connection.Connection.send = _connection_send  # type: ignore[method-assign]


def apply() -> None:
    """Install fixes 1, 2 and 4 (idempotent; call before the first gRPC connection)."""
    hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]
    grpclib.protocol.H2Protocol.connection_made = _connection_made  # type: ignore[method-assign]
    # grpclib's client and server streams call the send_message they imported.
    grpclib.client.send_message = _send_message  # type: ignore[attr-defined]
    grpclib.server.send_message = _send_message  # type: ignore[attr-defined]
