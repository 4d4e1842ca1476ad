"""Speed fixes inside grpclib 0.4.9, h2 4.4.1 and hyperframe 6.1.0 (pinned in pyproject.toml).

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
   connections are grpclib, each sends 256 KiB frames to the other.

``tests/unit/test_speedups.py`` checks that both are active, that they change nothing
but speed, and fails when a library changes underneath them.
"""

from __future__ import annotations

from typing import Any

import grpclib.protocol
import hyperframe.frame
from h2.settings import SettingCodes

#: The largest HTTP/2 frame our gRPC connections accept (the protocol allows 16 MiB).
MAX_FRAME_SIZE = 256 * 1024

_original_connection_made: Any = grpclib.protocol.H2Protocol.connection_made
_original_data_repr: Any = hyperframe.frame.DataFrame._body_repr


def _data_frame_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes of data, pad {self.pad_length}>"


def _connection_made(self: grpclib.protocol.H2Protocol, transport: Any) -> None:
    _original_connection_made(self, transport)
    self.connection._connection.update_settings({SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE})
    self.connection.flush()


def apply() -> None:
    """Install both fixes (idempotent; call before the first gRPC connection)."""
    hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]
    grpclib.protocol.H2Protocol.connection_made = _connection_made  # type: ignore[method-assign]
