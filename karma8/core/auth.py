"""Bearer credentials, without I/O: the shared bucket secret and the client token.

Both travel the same way, as ``authorization: Bearer <value>``: in gRPC metadata between
the API server and its buckets, and in the WebSocket handshake from clients. Values are
compared in constant time.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

#: The header (HTTP) and metadata key (gRPC) that carries a credential.
AUTHORIZATION = "authorization"

#: What a secret or token may look like: it must fit in a header value unchanged.
CREDENTIAL = re.compile(r"[\x21-\x7e]{16,}")
CREDENTIAL_RULE = "at least 16 visible ASCII characters (no spaces)"


def bearer(credential: str) -> str:
    """The ``authorization`` value that presents ``credential``."""
    return f"Bearer {credential}"


def bearer_credential(value: str | None) -> str | None:
    """The credential in an ``authorization`` value, or None if it is not ``Bearer <x>``."""
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def header_value(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    """The first value of HTTP header ``name`` (case-insensitive), decoded as latin-1."""
    wanted = name.lower().encode("ascii")
    for key, value in headers:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


def refusal(authorization: str | None, expected: str) -> str | None:
    """Why an ``authorization`` value does not present ``expected``; None if it does.

    The reason is for logs; it never contains the presented or the expected value.
    """
    credential = bearer_credential(authorization)
    if credential is None:
        return "no credential" if authorization is None else "not a Bearer credential"
    if not hmac.compare_digest(credential.encode("utf-8"), expected.encode("utf-8")):
        return "wrong credential"
    return None
