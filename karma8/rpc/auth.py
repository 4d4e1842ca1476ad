"""The shared secret on gRPC calls, as grpclib event hooks.

Clients attach ``authorization: Bearer <secret>`` to every call of a channel
(:func:`attach_secret`, a ``SendRequest`` hook); servers refuse any call without it with
``UNAUTHENTICATED`` before a handler runs (:func:`require_secret`, a ``RecvRequest``
hook), except the health checks. Hooks cover every method, including ones added later,
without touching handlers.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest, SendRequest, listen
from grpclib.exceptions import GRPCError

from karma8.core.auth import AUTHORIZATION, bearer, refusal

log = logging.getLogger(__name__)

#: Served without the secret: the health service's methods (karma8/rpc/health.py), and
#: nothing else. Container probes (Docker HEALTHCHECK, Kubernetes gRPC probes,
#: grpc_health_probe, ``karma8 health``) have no way to present the cluster's secret, and
#: a health reply tells nothing but whether the server is serving. Listed by full name,
#: not by prefix, so that no other method, now or later, can slip through.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
    }
)


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """How to dial a gRPC server: the secret to present ("": none) and TLS (None: off)."""

    secret: str = ""
    ssl: ssl.SSLContext | None = None


def attach_secret(channel: Any, secret: str) -> None:
    """Send ``secret`` with every call made on ``channel`` (nothing if it is empty)."""
    if not secret:
        return
    value = bearer(secret)

    async def on_send_request(event: Any) -> None:
        event.metadata[AUTHORIZATION] = value

    listen(channel, SendRequest, on_send_request)


def require_secret(server: Any, secret: str, who: str) -> None:
    """Refuse every call to ``server`` that does not carry ``secret``.

    A refused call ends with ``UNAUTHENTICATED`` before its handler runs, and is logged
    as one line naming ``who`` (the server), the method and the peer. Health checks
    (:data:`OPEN_METHODS`) are exempt.
    """
    if not secret:
        raise ValueError("require_secret needs a secret")

    async def on_recv_request(event: Any) -> None:
        if event.method_name in OPEN_METHODS:
            return
        reason = refusal(event.metadata.get(AUTHORIZATION), secret)
        if reason is not None:
            peer = event.peer.addr() if event.peer is not None else None
            where = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
            log.warning("%s refused %s from %s: %s", who, event.method_name, where, reason)
            raise GRPCError(Status.UNAUTHENTICATED, "missing or wrong secret")

    listen(server, RecvRequest, on_recv_request)
