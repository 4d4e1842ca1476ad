"""The WebSocket edge of the API server: one handler call per connection.

Errors are caught here, at the session edge: a karma8 error becomes one error frame and a
close code the client can act on; a disconnected client is logged; anything unexpected is
logged with its traceback and reported as ``internal``. Cancellation passes through.
What escapes even this (or comes from the WebSocket library's reader task) is caught by
the connection's boundary in :mod:`karma8.api.listener`, which also closes the TCP stream.
"""

from __future__ import annotations

import contextlib
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
from karma8.core.protocol import (
    CloseCode,
    Op,
    Request,
    close_code_for,
    encode_error,
    parse_path,
    parse_session_request,
)
from karma8.errors import BadRequest, Internal, Karma8Error, Timeout, Unauthorized

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
        try:
            self._authorize(request)
            req = parse_path(request.path)
        except Karma8Error as exc:
            slog.warning("%s %s: %s", request.path[:200], exc.code, exc.message)
            self._services.metrics.errors.labels(exc.code).inc()
            await _send_error(ws, exc, self._services.config.idle_timeout)
            return
        if req.op is Op.SESSION:
            await self._serve_session(session)
            return
        error = await self._serve(session, req, request.path)
        if error is None:
            with trio.move_on_after(self._services.config.handshake_timeout):
                await ws.aclose(CloseCode.NORMAL)
        elif not isinstance(error, _Gone):
            await _close(ws, error, self._services.config.idle_timeout)

    async def _serve_session(self, session: Session) -> None:
        """Serve operations one after the other on one connection (``/session``)."""
        config = self._services.config
        while True:
            try:
                with trio.move_on_after(config.idle_timeout) as idle:
                    message = await session.ws.get_message()
            except ConnectionClosed:
                return  # the client ended the session
            if idle.cancelled_caught:
                with trio.move_on_after(config.handshake_timeout):
                    await session.ws.aclose(CloseCode.NORMAL, "idle session")
                return
            try:
                if not isinstance(message, str):
                    raise BadRequest("a session request is a text frame")
                req = parse_session_request(message)
            except Karma8Error as exc:
                session.log.warning("session request %s: %s", exc.code, exc.message)
                self._services.metrics.errors.labels(exc.code).inc()
                await _send_error(session.ws, exc, config.idle_timeout)
                return
            session.transferred = session.frames = 0
            session.log.upload_id = ""
            error = await self._serve(session, req, message)
            if error is None:
                continue
            if isinstance(error, _Gone):
                return
            if req.op is Op.UPLOAD or session.frames or isinstance(error, (_Unexpected, Timeout)):
                # The client may be sending data, or reading a transfer cut short: the
                # session cannot go on in step. The error frame is out; close as a
                # connection of its own would.
                await _close(session.ws, error, config.idle_timeout)
                return
            # Only the error frame went out, after a one-frame request: the session goes on.

    async def _serve(self, session: Session, req: Request, what: str) -> Karma8Error | _Gone | None:
        """Run one operation; None when it succeeded. On an error the error frame is sent
        (the connection is left open) and returned; a client gone is ``_Gone``."""
        slog = session.log
        metrics = self._services.metrics
        started = trio.current_time()
        op = req.op

        def ended(outcome: str) -> None:
            # Called before an error frame goes out, so that a client that got one sees it counted.
            metrics.session_ended(op, outcome, session.transferred, trio.current_time() - started)

        error: Karma8Error
        try:
            with metrics.sessions.labels(op.value).track_inprogress():
                await self._dispatch(session, req)
        except ConnectionClosed as exc:
            ended(DISCONNECTED)
            slog.info("client went away (%s)", exc.reason)
            return _Gone()
        except Karma8Error as exc:
            slog.warning("%s %s: %s", what[:200], exc.code, exc.message)
            metrics.errors.labels(exc.code).inc()
            ended(exc.code)
            error = exc
        except Exception:
            slog.exception("unexpected error serving %s", what[:200])
            metrics.errors.labels(Internal.code).inc()
            ended(Internal.code)
            error = _Unexpected("internal error (see the server log)")
        except BaseException:  # cancelled: the server is stopping
            ended(CANCELLED)
            raise
        else:
            ended(OK)
            return None
        finally:
            if session.transferred >= speedups.TRIM_THRESHOLD:
                speedups.trim_heap()  # the buffers of a large transfer, free in the heap
        if not await _reply_error(session.ws, error, self._services.config.idle_timeout):
            return _Gone()
        return error

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


class _Gone:
    """The client went away during an operation."""


class _Unexpected(Internal):
    """An error of ours, reported as ``internal``: the session does not go on after it."""


async def _reply_error(ws: WebSocketConnection, error: Karma8Error, within: float) -> bool:
    """Send the error frame, best effort; False when the client is gone."""
    with trio.move_on_after(within):
        try:
            await ws.send_message(encode_error(error))
        except ConnectionClosed:
            return False
    return True


async def _send_error(ws: WebSocketConnection, error: Karma8Error, within: float) -> None:
    """The error frame and the close that follows it (best effort: the client may
    already be gone or stuck)."""
    if await _reply_error(ws, error, within):
        await _close(ws, error, within)


async def _close(ws: WebSocketConnection, error: Karma8Error, within: float) -> None:
    """Close with the code that follows an error frame (best effort)."""
    with trio.move_on_after(within), contextlib.suppress(ConnectionClosed):
        await ws.aclose(close_code_for(error.code), error.code)
