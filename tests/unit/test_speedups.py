"""karma8.speedups: the fixes are needed (the libraries still do what they fix) and harmless."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpclib.protocol
import h2.config
import h2.connection
import h2.exceptions
import hyperframe.frame
import pytest
from h2.settings import SettingCodes
from wsproto.frame_protocol import XorMaskerSimple

from karma8 import speedups

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
