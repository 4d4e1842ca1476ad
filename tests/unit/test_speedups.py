"""karma8.speedups: the fixes are needed (the libraries still do what they fix) and harmless."""

from __future__ import annotations

import inspect

import grpclib.protocol
import h2.connection
import hyperframe.frame

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
