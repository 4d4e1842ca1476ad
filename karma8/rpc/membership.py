"""The membership endpoint the API server hosts: buckets register and heartbeat here.

The grpclib server runs on the portal's asyncio loop; each heartbeat is handed to a trio
callback through :meth:`Portal.run_trio`, so the API's membership logic is plain trio.
Each call is its own error boundary: a malformed heartbeat is refused (INVALID_ARGUMENT),
an expected karma8 error answered as UNAVAILABLE, and anything else logged once, counted
and answered as INTERNAL; the server goes on serving (grpclib ends only that stream).
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from grpclib import GRPCError, Status

from karma8.core.records import Heartbeat, Usage
from karma8.errors import Karma8Error
from karma8.rpc.bridge import Portal, PortalClosed
from karma8.rpc.gen.karma8 import v1 as pb
from karma8.rpc.servers import start_grpc_server

log = logging.getLogger(__name__)

#: Called in trio with each heartbeat; returns the interval the bucket should use next.
OnHeartbeat = Callable[[Heartbeat], Awaitable[float]]


class _MembershipService(pb.MembershipBase):
    def __init__(self, portal: Portal, on_heartbeat: OnHeartbeat, on_error: Callable[[], None]) -> None:
        self._portal = portal
        self._on_heartbeat = on_heartbeat
        self._on_error = on_error

    async def beat(self, message: pb.Heartbeat) -> pb.HeartbeatReply:
        u = message.usage or pb.Usage()
        beat = Heartbeat(
            bucket_id=message.bucket_id,
            address=message.address,
            usage=Usage(used=u.used, free=u.free, capacity=u.capacity, fragments=u.fragments),
            hello=message.hello,
        )
        problem = beat.problem()
        if problem is not None:
            log.warning("heartbeat refused: %s", problem)
            raise GRPCError(Status.INVALID_ARGUMENT, problem)
        try:
            interval = await self._portal.run_trio(self._on_heartbeat, beat)
        except (Karma8Error, PortalClosed) as exc:
            log.warning("bucket=%s heartbeat from %s not recorded: %s", beat.bucket_id, beat.address, exc)
            raise GRPCError(Status.UNAVAILABLE, str(exc)) from None
        except Exception:
            self._on_error()
            log.exception(
                "bucket=%s heartbeat from %s ended by an unexpected error", beat.bucket_id, beat.address
            )
            raise GRPCError(Status.INTERNAL, "internal error (see the API server's log)") from None
        return pb.HeartbeatReply(interval=interval)


async def _stop(server: Any) -> None:
    server.close()
    await server.wait_closed()


async def serve_membership(
    portal: Portal,
    host: str,
    port: int,
    on_heartbeat: OnHeartbeat,
    *,
    on_error: Callable[[], None],
    secret: str,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the membership endpoint until cancelled; ``started()`` gets the bound port.

    Heartbeats must carry ``secret`` ("" accepts any); TLS is on with ``ssl_context``.
    ``on_error`` counts the calls that an unexpected error ended.
    """
    server, bound = await portal.run(
        functools.partial(
            start_grpc_server,
            [_MembershipService(portal, on_heartbeat, on_error)],
            host,
            port,
            secret=secret,
            who="membership endpoint",
            ssl_context=ssl_context,
            reuse_port=reuse_port,
        )
    )
    log.info(
        "membership endpoint listening on %s:%d (%s, %s)",
        host,
        bound,
        "TLS" if ssl_context else "no TLS",
        "secret required" if secret else "NO secret required",
    )
    try:
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await portal.run(_stop, server)
