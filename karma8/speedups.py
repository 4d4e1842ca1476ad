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
   the client) load it, never a bucket.

``tests/unit/test_speedups.py`` checks that both are active, that they change nothing
but speed, and fails when a library changes underneath them.
"""

from __future__ import annotations

from typing import Any

import grpclib.protocol
import h2.connection
import hyperframe.frame
import wsproto.frame_protocol
from h2.settings import SettingCodes

#: The largest HTTP/2 frame our gRPC connections accept (the protocol allows 16 MiB).
MAX_FRAME_SIZE = 256 * 1024

_original_connection_made: Any = grpclib.protocol.H2Protocol.connection_made
_original_data_repr: Any = hyperframe.frame.DataFrame._body_repr
_original_mask: Any = wsproto.frame_protocol.XorMaskerSimple.process


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


def _mask(self: wsproto.frame_protocol.XorMaskerSimple, data: bytes | bytearray | memoryview) -> bytearray:
    """``XorMaskerSimple.process``: XOR with the key, which then continues where it ended."""
    import numpy as np  # imported here: see apply_websocket

    key = bytes(self._masking_key)
    size = len(data)
    out = bytearray(size)
    words = size // 4
    if words:
        np.bitwise_xor(
            np.frombuffer(data, dtype=np.uint32, count=words),
            np.frombuffer(key, dtype=np.uint32)[0],
            out=np.frombuffer(out, dtype=np.uint32, count=words),
        )
    for i in range(4 * words, size):  # at most 3 bytes
        out[i] = data[i] ^ key[i % 4]
    rotation = size % 4
    self._masking_key = key[rotation:] + key[:rotation]
    return out


def apply_websocket() -> None:
    """Install fix 3 (idempotent; loads numpy)."""
    import numpy  # noqa: F401  (loaded here, not in every process)

    wsproto.frame_protocol.XorMaskerSimple.process = _mask  # type: ignore[method-assign]


def apply() -> None:
    """Install fixes 1 and 2 (idempotent; call before the first gRPC connection)."""
    hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]
    grpclib.protocol.H2Protocol.connection_made = _connection_made  # type: ignore[method-assign]
