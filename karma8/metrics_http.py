"""The HTTP endpoint of both server roles: ``/metrics``, ``/healthz`` and ``/ready``.

A small wsgiref server on threads of its own, so neither event loop ever parses HTTP and a
slow scraper cannot delay a transfer. The role's composition root builds the
:class:`~prometheus_client.CollectorRegistry` and the readiness check, starts the endpoint
with :func:`start_endpoint` and closes it (a blocking call: from a worker thread) when the
server stops.

- ``GET /metrics``: the registry in the Prometheus text format (gzip when asked for).
- ``GET /healthz``: 200 ``ok`` while the process runs (liveness).
- ``GET /ready``: 200 ``ready``, or 503 with a one-line reason (readiness).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from karma8.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Returns None when the process is ready, else why not (one line).
ReadyCheck = Callable[[], str | None]
#: Called once for each request that an unexpected error ended (counts it in a metric).
OnError = Callable[[], None]

#: How often the serving thread looks for a stop request (the latency of ``close()``).
POLL_INTERVAL = 0.2
#: A client that stops sending holds its thread this long at most.
CLIENT_TIMEOUT = 10.0


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # One thread per request: a stuck client cannot block the next scrape.
    daemon_threads = True
    on_error: OnError

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The connection's boundary: socketserver calls this for whatever escaped the
        # handler (its default prints a traceback to stderr). Log it once, count it; the
        # request's socket is closed by socketserver and the server keeps serving.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # the client went away or stalled
            log.debug("metrics endpoint: request from %s ended: %s", client_address, error)
            return
        self.on_error()
        log.error(
            "metrics endpoint: request from %s ended by an unexpected error", client_address, exc_info=True
        )


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        # A scrape every few seconds is not news; errors still go to stderr via wsgiref.
        pass


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
    )
    return [data]


def make_app(registry: CollectorRegistry, ready: ReadyCheck, on_error: OnError) -> WSGIApplication:
    """The routing WSGI application of the endpoint."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return route(environ, start_response)
        except Exception:
            on_error()
            log.exception("error serving %s", environ.get("PATH_INFO", "")[:200])
            return _text(start_response, "500 Internal Server Error", "internal error (see the log)\n")

    def route(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            return _text(start_response, "405 Method Not Allowed", "only GET\n")
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = metrics(environ, start_response)
            return body
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/ready":
            reason = ready()
            if reason is None:
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", f"not ready: {reason}\n")
        return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz or /ready\n")

    return app


class HttpEndpoint:
    """A running endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, name: str) -> None:
        self._server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(POLL_INTERVAL,), name=name, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (blocks up to ``POLL_INTERVAL``)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_endpoint(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: ReadyCheck,
    *,
    required: bool,
    who: str,
    on_error: OnError,
) -> HttpEndpoint | None:
    """Serve the endpoint on ``host:port`` (0 picks a free port) on a thread.

    ``on_error`` counts the requests an unexpected error ended (they are logged here).
    A port that is in use is fatal when it was configured (``required``). The default
    port is only a convention: then the error is logged and the server runs without the
    endpoint (None), so that several servers started on one host with default settings
    do not fail to start for the sake of their metrics.

    Raises:
        ConfigError: ``required`` and the address cannot be bound.
    """
    try:
        server = make_server(
            host,
            port,
            make_app(registry, ready, on_error),
            server_class=_Server6 if ":" in host else _Server,
            handler_class=_Handler,
        )
        assert isinstance(server, _Server)
        server.on_error = on_error
    except OSError as exc:
        problem = f"{who} cannot listen on {host}:{port} for /metrics ({exc.strerror or exc})"
        if required:
            raise ConfigError(f"{problem}: choose another metrics_port (0 picks a free one)") from None
        log.error("%s: serving without /metrics, /healthz and /ready; set metrics_port", problem)
        return None
    endpoint = HttpEndpoint(server, f"{who} metrics")
    log.debug("%s serves /metrics, /healthz and /ready on http://%s:%d", who, host, endpoint.port)
    return endpoint
