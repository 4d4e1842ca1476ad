"""karma8.speedups: the fixes are needed (the libraries still do what they fix) and harmless."""

from __future__ import annotations

import inspect
import os
import struct
import subprocess
import sys
from collections.abc import Callable

import grpclib.client
import grpclib.protocol
import grpclib.server
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest
from grpclib.encoding.proto import ProtoCodec
from h2.settings import SettingCodes
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode, XorMaskerSimple

from karma8 import speedups
from karma8.rpc.gen.karma8 import v1 as pb

MiB = 1 << 20


def test_h2_still_builds_the_repr_of_every_received_frame() -> None:
    # If this fails, h2 stopped formatting every frame: drop fix 1.
    assert "repr(frame)" in inspect.getsource(h2.connection.H2Connection._receive_frame)
    # ... and hyperframe's DATA frames still use the generic repr, which serializes the body.
    assert speedups._original_data_repr is hyperframe.frame.Frame._body_repr
    assert "serialize_body" in inspect.getsource(hyperframe.frame.Frame._body_repr)


def test_data_frames_repr_without_copying_their_data() -> None:
    speedups.apply()
    frame = hyperframe.frame.DataFrame(1, b"\x00" * MiB)
    text = repr(frame)
    assert "1048576 bytes" in text
    assert len(text) < 200
    # Other frames keep their own repr.
    assert "settings=" in repr(hyperframe.frame.SettingsFrame(0, settings={4: 1}))


def test_grpclib_still_keeps_the_default_frame_size() -> None:
    # If grpclib learns to announce a frame size itself, use its setting instead of fix 2.
    source = inspect.getsource(speedups._original_connection_made)
    assert "MAX_FRAME_SIZE" not in source
    assert "initiate_connection()" in source
    speedups.apply()
    assert grpclib.protocol.H2Protocol.connection_made is speedups._connection_made


def test_wsproto_still_masks_with_translate() -> None:
    # If wsproto learns a fast masker, drop fix 3.
    assert ".translate(" in inspect.getsource(speedups._original_mask)


@pytest.mark.parametrize("sizes", [[0], [1], [3], [4], [5, 7, 1, 1024, 3], [MiB + 3, 2, MiB]])
def test_masking_gives_what_wsproto_gives(sizes: list[int]) -> None:
    # Chunks of any length in a row: the key must continue where the last chunk ended.
    key = bytes([0x12, 0x9A, 0xFF, 0x01])
    ours = XorMaskerSimple(key)
    theirs = XorMaskerSimple(key)
    for i, size in enumerate(sizes):
        data = bytes((i * 31 + j) % 251 for j in range(size))
        expected = speedups._original_mask(theirs, data)
        got = speedups._mask(ours, memoryview(data) if i % 2 else data)
        assert got == expected
        assert isinstance(got, bytearray)
    speedups.apply_websocket()
    assert XorMaskerSimple.process is speedups._mask


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    for conn in (client, server):
        conn.initiate_connection()
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB})
        conn.increment_flow_control_window(4 * MiB)
    return client, server


def _large_frame_after_ack(announce: Callable[[h2.connection.H2Connection], None]) -> None:
    """The server announces large frames; the client's ACK and a large frame arrive in one read."""
    client, server = _pair()
    announce(server)
    client.receive_data(server.data_to_send())  # the client learns 256 KiB, queues its ACK
    assert client.max_outbound_frame_size == speedups.MAX_FRAME_SIZE
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    client.send_data(stream_id, b"\x01" * speedups.MAX_FRAME_SIZE)
    server.receive_data(client.data_to_send())  # ACK, HEADERS and one 256 KiB DATA frame


def test_h2_rejects_a_large_frame_that_arrives_with_the_ack() -> None:
    # The h2 race announce_large_frames works around: if this stops failing, h2 fixed it.
    def plain(conn: h2.connection.H2Connection) -> None:
        conn.update_settings({SettingCodes.MAX_FRAME_SIZE: speedups.MAX_FRAME_SIZE})

    with pytest.raises(h2.exceptions.FrameTooLargeError):
        _large_frame_after_ack(plain)


def test_announced_large_frames_are_accepted_at_once() -> None:
    _large_frame_after_ack(speedups.announce_large_frames)


def test_grpclib_still_copies_messages_to_send_them() -> None:
    # If grpclib stops copying a message behind its prefix and into every frame, drop fix 4.
    assert "+ reply_bin" in inspect.getsource(speedups._original_send_message)
    assert "BytesIO(data)" in inspect.getsource(grpclib.protocol.Stream.send_data)
    speedups.apply()
    assert grpclib.client.send_message is speedups._send_message  # type: ignore[attr-defined]
    assert grpclib.server.send_message is speedups._send_message  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [0, 1, speedups.ZERO_COPY_MIN - 1, speedups.ZERO_COPY_MIN, MiB + 7])
@pytest.mark.parametrize("first", [True, False])
def test_encoded_messages_are_the_bytes_grpclib_sends(size: int, first: bool) -> None:
    codec = ProtoCodec()
    data = bytes(i % 251 for i in range(size))
    put = pb.PutRequest(fragment_id="ab.1", size=size, data=data) if first else pb.PutRequest(data=data)
    for message, message_type in ((put, pb.PutRequest), (pb.GetReply(data=data), pb.GetReply)):
        encoded = bytes(message)
        buffers = speedups.encode_message(codec, message, message_type)
        assert b"".join(buffers) == struct.pack("?", False) + struct.pack(">I", len(encoded)) + encoded
        assert len(buffers) == (2 if size >= speedups.ZERO_COPY_MIN else 1)
        if len(buffers) == 2:
            assert buffers[1] is data  # sent from the caller's buffer
        assert message.data is data  # the message is left as it was


def test_messages_without_a_data_field_use_the_codec() -> None:
    message = pb.DeleteRequest(upload_id="u", fragment_ids=["a", "b"])
    (buffer,) = speedups.encode_message(ProtoCodec(), message, pb.DeleteRequest)
    assert buffer[5:] == bytes(message)


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def writelines(self, buffers: list[bytes | memoryview]) -> None:
        for b in buffers:
            self.written += b


def _open_stream(client: h2.connection.H2Connection, server: h2.connection.H2Connection) -> int:
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    return stream_id


@pytest.mark.parametrize("end_stream", [False, True])
def test_data_frames_are_written_as_h2_writes_them(end_stream: bool) -> None:
    payloads = [[b"\x01" * 100], [b"ab", b"", b"c" * 16000], [b"\x02" * 16384]]
    ours, theirs = _Transport(), _Transport()
    pairs = [_pair(), _pair()]
    stream_ids = [_open_stream(c, s) for c, s in pairs]
    (ours_c, ours_s), (theirs_c, _) = pairs
    for i, views in enumerate(payloads):
        end = end_stream and i == len(payloads) - 1
        speedups.write_data_frame(ours_c, ours, stream_ids[0], [memoryview(v) for v in views], end)
        theirs_c.send_data(stream_ids[1], b"".join(views), end_stream=end)
        theirs.written += theirs_c.data_to_send()
    assert ours.written == theirs.written
    assert ours_c.outbound_flow_control_window == theirs_c.outbound_flow_control_window
    assert ours_c.local_flow_control_window(stream_ids[0]) == theirs_c.local_flow_control_window(
        stream_ids[1]
    )
    assert (
        ours_c.streams[stream_ids[0]].state_machine.state
        == theirs_c.streams[stream_ids[1]].state_machine.state
    )
    # The peer reads our frames as the same data.
    events = ours_s.receive_data(bytes(ours.written))
    received = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert received == b"".join(b"".join(v) for v in payloads)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events) == end_stream


def test_malloc_keeps_large_buffers_after_tune_malloc() -> None:
    # Fresh 1 MiB buffers fault in their pages every time by default (fix 5 is needed),
    # and not after tune_malloc(). Measured in child processes, each with its own allocator.
    script = """
import resource, sys
from karma8 import speedups
if sys.argv[1] == "tuned":
    assert speedups.tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round():  # a few chunks in flight at once, as in a transfer
    chunks = [bytearray(1 << 20) for _ in range(4)]
    del chunks
round()
before = faults()
for _ in range(25):
    round()
print(faults() - before)
"""
    counts = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", script, mode], check=True, capture_output=True, text=True
            ).stdout
        )
        for mode in ("default", "tuned")
    }
    assert counts["default"] > 100 * 200  # about 256 page faults per 1 MiB buffer
    assert counts["tuned"] < 1000


def test_trim_heap_gives_back_what_tune_malloc_keeps() -> None:
    # After tune_malloc() freed buffers stay in the heap (up to TRIM_THRESHOLD at its top,
    # every free page below); trim_heap() returns them. In a child: its own allocator.
    script = """
from pathlib import Path
from karma8 import speedups
assert speedups.tune_malloc()
def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) * 1024
chunks = [bytearray(1 << 20) for _ in range(14)]
keep = bytearray(1024)  # above them: the freed chunks are not at the top of the heap
del chunks
kept = rss()
speedups.trim_heap()
print(kept - rss())
"""
    released = int(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    assert released > 10 * MiB


def test_wsproto_still_copies_frames_to_serialize_them() -> None:
    # If wsproto builds frames without these copies, drop our serializer.
    source = inspect.getsource(speedups._original_serialize_frame)
    assert "bytearray(header + payload)" in source
    assert 'data = b""' in inspect.getsource(speedups._original_connection_send)


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, MiB + 3])
def test_frames_are_the_bytes_wsproto_builds(
    monkeypatch: pytest.MonkeyPatch, client: bool, size: int
) -> None:
    keys = iter([b"\x01\x80\xfe\x33"] * 2)
    monkeypatch.setattr(os, "urandom", lambda n: next(keys))
    payload = bytes(i % 253 for i in range(size))
    ours = FrameProtocol(client=client, extensions=[])
    theirs = FrameProtocol(client=client, extensions=[])
    for fin in (False, True):
        assert speedups._serialize_frame(ours, Opcode.BINARY, payload, fin) == (
            speedups._original_serialize_frame(theirs, Opcode.BINARY, payload, fin)
        )
        keys = iter([b"\x01\x80\xfe\x33"] * 2)


def test_control_frames_stay_short() -> None:
    with pytest.raises(ValueError, match="control frame"):
        speedups._serialize_frame(FrameProtocol(client=True, extensions=[]), Opcode.PING, b"x" * 126)


def test_a_websocket_connection_sends_what_wsproto_reads() -> None:
    speedups.apply_websocket()
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="a", target="/")))
    request = next(server.events())
    assert isinstance(request, Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    data = bytes(i % 251 for i in range(MiB + 1))
    for sender, receiver in ((client, server), (server, client)):
        receiver.receive_data(bytes(sender.send(BytesMessage(data=data))))
        receiver.receive_data(bytes(sender.send(TextMessage(data="done"))))
        events = list(receiver.events())
        assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == data
        assert [e.data for e in events if isinstance(e, TextMessage)] == ["done"]
