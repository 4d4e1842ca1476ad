"""Starting a grpclib server (asyncio side), shared by buckets and the API's endpoint."""

from __future__ import annotations

from typing import Any

import grpclib.server


async def start_grpc_server(handlers: list[Any], host: str, port: int) -> tuple[Any, int]:
    """Start serving ``handlers``; return the server and its real port (port 0 picks one)."""
    server = grpclib.server.Server(handlers)
    await server.start(host, port)
    listener: Any = server._server  # the asyncio.Server grpclib wraps
    return server, int(listener.sockets[0].getsockname()[1])
