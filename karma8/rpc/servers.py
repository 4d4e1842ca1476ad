"""Starting a grpclib server (asyncio side), shared by buckets and the API's endpoint."""

from __future__ import annotations

import ssl
from typing import Any

import grpclib.server

from karma8 import speedups
from karma8.rpc import grpcfix
from karma8.rpc.auth import require_secret


async def start_grpc_server(
    handlers: list[Any],
    host: str,
    port: int,
    *,
    secret: str,
    who: str,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> tuple[Any, int]:
    """Start serving ``handlers``; return the server and its real port (port 0 picks one).

    Every call must carry ``secret`` (see :mod:`karma8.rpc.auth`); "" serves without one.
    ``who`` names this server in the log line of a refused call. With ``ssl_context``
    the server speaks TLS only. With ``reuse_port`` several processes share the port.
    """
    speedups.apply()
    grpcfix.apply()
    server = grpclib.server.Server(handlers)
    if secret:
        require_secret(server, secret, who)
    await server.start(host, port, ssl=ssl_context, reuse_port=reuse_port or None)
    listener: Any = server._server  # the asyncio.Server grpclib wraps
    return server, int(listener.sockets[0].getsockname()[1])
