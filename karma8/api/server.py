"""The WebSocket edge of the API server: one handler call per connection.

Errors are caught here, at the session edge: a karma8 error becomes one error frame and a
close code the client can act on; a disconnected client is logged; anything unexpected is
logged with its traceback and reported as ``internal``. Cancellation passes through.
What escapes even this (or comes from the WebSocket library's reader task) is caught by
the connection's boundary in :mod:`karma8.api.listener`, which also closes the TCP stream.
"""

from __future__ import annotations

import logging

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from karma8 import speedups
from karma8.api.download import handle_download
from karma8.api.listener import Connection
from karma8.api.metrics import CANCELLED, DISCONNECTED, OK
from karma8.api.queries import (
    handle_delete,
    handle_files,
    handle_rebalance,
    handle_repair,
    handle_stat,
    handle_status,
)
from karma8.api.scrub import handle_verify
from karma8.api.session import Services, Session
from karma8.api.upload import handle_upload
from karma8.core.auth import AUTHORIZATION, header_value, refusal
from karma8.core.protocol import CloseCode, Op, Request, close_code_for, encode_error, parse_path
from karma8.errors import Internal, Karma8Error, Unauthorized

log = logging.getLogger(__name__)


class ApiHandler:
    """Routes each WebSocket connection to its operation."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._token = services.config.client_token.get_secret_value()

    async def handle(self, request: WebSocketRequest, conn: Connection) -> None:
        """Serve one connection (inside its boundary, which closes the TCP stream after)."""
        slog = conn.log
        try:
            ws = conn.ws = await request.accept()
        except ConnectionClosed as exc:
            slog.info("client went away during the handshake (%s)", exc.reason)
            return
        session = Session(ws, self._services, conn.session_id, slog)
        metrics = self._services.metrics
        started = trio.current_time()
        op: Op | None = None

        def ended(outcome: str) -> None:
            # Called before an error frame goes out, so that a client that got one sees it counted.
            if op is not None:
                metrics.session_ended(op, outcome, session.transferred, trio.current_time() - started)

        try:
            self._authorize(request)
            req = parse_path(request.path)
            op = req.op
            with metrics.sessions.labels(op.value).track_inprogress():
                await self._dispatch(session, req)
        except ConnectionClosed as exc:
            ended(DISCONNECTED)
            slog.info("client went away (%s)", exc.reason)
        except Karma8Error as exc:
            slog.warning("%s %s: %s", request.path[:200], exc.code, exc.message)
            metrics.errors.labels(exc.code).inc()
            ended(exc.code)
            await _send_error(ws, exc, self._services.config.idle_timeout)
        except Exception:
            slog.exception("unexpected error serving %s", request.path[:200])
            metrics.errors.labels(Internal.code).inc()
            ended(Internal.code)
            await _send_error(
                ws, Internal("internal error (see the server log)"), self._services.config.idle_timeout
            )
        except BaseException:  # cancelled: the server is stopping
            ended(CANCELLED)
            raise
        else:
            ended(OK)
            with trio.move_on_after(self._services.config.handshake_timeout):
                await ws.aclose(CloseCode.NORMAL)
        finally:
            if session.transferred >= speedups.TRIM_THRESHOLD:
                speedups.trim_heap()  # the buffers of a large transfer, free in the heap

    def _authorize(self, request: WebSocketRequest) -> None:
        """Check the client token of the handshake, when the server requires one."""
        if self._token:
            reason = refusal(header_value(request.headers, AUTHORIZATION), self._token)
            if reason is not None:
                raise Unauthorized(f"client token refused ({reason})")

    async def _dispatch(self, session: Session, req: Request) -> None:
        if req.op is Op.UPLOAD:
            await handle_upload(session, req.name)
        elif req.op is Op.DOWNLOAD:
            await handle_download(session, req.name)
        elif req.op is Op.FILES:
            await handle_files(session, req.listing)
        elif req.op is Op.STAT:
            await handle_stat(session, req.name)
        elif req.op is Op.DELETE:
            await handle_delete(session, req.name)
        elif req.op is Op.VERIFY:
            await handle_verify(session, req.name)
        elif req.op is Op.REBALANCE:
            await handle_rebalance(session, req.dry_run)
        elif req.op is Op.REPAIR:
            await handle_repair(session)
        else:
            await handle_status(session)


async def _send_error(ws: WebSocketConnection, error: Karma8Error, within: float) -> None:
    """Best effort: the client may already be gone or stuck."""
    with trio.move_on_after(within):
        try:
            await ws.send_message(encode_error(error))
            await ws.aclose(close_code_for(error.code), error.code)
        except ConnectionClosed:
            pass
