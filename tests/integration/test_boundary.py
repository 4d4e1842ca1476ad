"""Issue 11: nothing one connection does stops the API server.

Unexpected exceptions are injected inside a session (in our handler's code and past its
own error handling), inside trio-websocket's reader task, in the membership endpoint and
in the metrics endpoint. Each time that connection alone ends (with a 1011 Close where a
WebSocket can still send one), the error is logged once with its context and counted in
``karma8_api_connection_errors_total``, and the server goes on serving: a round trip
works afterwards.
"""

from __future__ import annotations

import functools
import http.client
import logging
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

import karma8.api.server
import karma8.metrics_http
from karma8.api.listener import Connection, ListenerSettings, serve_websockets
from karma8.config import MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.registry import Registry
from tests.integration.harness import (
    Cluster,
    expect_error,
    make_file,
    open_cluster,
    open_raw,
    sha256_of,
    wait_until,
)
from tests.integration.test_observability import http_get, scrape, value

ESCAPES = "karma8_api_connection_errors_total"


class Injected(RuntimeError):
    """The fault a test injects (a bug we did not foresee)."""


def _raise(*args: object, **kwargs: object) -> None:
    raise Injected("injected fault")


async def _escapes(cluster: Cluster, endpoint: str) -> float:
    assert cluster.metrics_port is not None
    return value(await scrape(cluster.metrics_port), ESCAPES, endpoint=endpoint)


async def _close_code(ws: WebSocketConnection) -> int | None:
    """Read until the server closes; the close code it sent."""
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason is not None else None


async def _round_trip(cluster: Cluster, tmp_path: Path, name: str) -> None:
    src, out = tmp_path / f"{name}.src", tmp_path / f"{name}.out"
    digest = make_file(src, MiB + 3, seed=len(name))
    await cluster.client.upload(src, name)
    await cluster.client.download(name, out)
    assert sha256_of(out) == digest


def _escape_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "ended by an unexpected error" in r.getMessage()]


async def test_errors_inside_sessions_and_the_reader_task_end_only_their_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_cluster(tmp_path) as cluster:
        # 1. In our session code: the handler's own edge answers `internal`, closes 1011.
        with monkeypatch.context() as m:
            m.setattr(karma8.api.server, "handle_status", _raise)
            async with open_raw(cluster.url, "/status") as ws:
                assert (await expect_error(ws))["error"] == "internal"
                assert await _close_code(ws) == 1011
        assert await _escapes(cluster, "websocket") == 0

        # 2. Past the handler's edge (its error reply itself fails): the boundary.
        with monkeypatch.context() as m:
            m.setattr(karma8.api.server, "_reply_error", _raise)
            async with open_raw(cluster.url, "/download/missing") as ws:
                assert await _close_code(ws) == 1011
        await wait_until(lambda: len(_escape_records(caplog)) == 1, "the escape to be logged")
        record = _escape_records(caplog)[0]
        assert "session=" in record.getMessage()
        assert "/download/missing" in record.getMessage()
        assert record.exc_info is not None
        assert await _escapes(cluster, "websocket") == 1

        # 3. In trio-websocket's reader task, mid-upload: a Pong makes it raise.
        with monkeypatch.context() as m:
            m.setattr(WebSocketConnection, "_handle_pong_event", _raise)
            async with open_raw(cluster.url, "/upload/half") as ws:
                await ws.send_message(encode_upload_header(UploadHeader(size=4 * MiB)))
                await ws.send_message(b"\x01" * MiB)
                await ws.pong(b"boom")
                assert await _close_code(ws) == 1011
        await wait_until(lambda: len(_escape_records(caplog)) == 2, "the reader's escape to be logged")
        assert await _escapes(cluster, "websocket") == 2
        # The interrupted upload leaves nothing behind.
        await wait_until(lambda: not cluster.all_files(), "the half upload's fragments to go")
        db = cluster.registry()
        try:
            assert db.lookup("half") is None
        finally:
            db.close()

        await _round_trip(cluster, tmp_path, "after")
        assert len(_escape_records(caplog)) == 2  # logged once each


async def test_errors_in_the_membership_and_metrics_endpoints_end_only_that_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_cluster(tmp_path) as cluster:
        assert cluster.metrics_port is not None
        # Every heartbeat fails inside the API for a while: answered INTERNAL, counted.
        with monkeypatch.context() as m:
            m.setattr(Registry, "upsert_bucket", _raise)

            async def counted() -> bool:
                return await _escapes(cluster, "membership") >= 3

            await wait_until(counted, "failed heartbeats to be counted")
        assert any("heartbeat from" in r.getMessage() for r in _escape_records(caplog))
        await cluster.wait_live(6)

        # A request whose handling escapes wsgiref's handler: logged, counted, next served.
        with monkeypatch.context() as m:
            m.setattr(karma8.metrics_http._Handler, "handle", _raise)
            with pytest.raises(http.client.RemoteDisconnected):  # closed without a reply
                await http_get(f"http://127.0.0.1:{cluster.metrics_port}/healthz")
        assert await _escapes(cluster, "metrics") == 1
        assert (await http_get(f"http://127.0.0.1:{cluster.metrics_port}/healthz"))[0] == 200

        await _round_trip(cluster, tmp_path, "after")


async def test_the_boundary_lets_cancellation_through() -> None:
    """Stopping the server cancels every session; none of them counts as an escape."""
    escapes: list[None] = []
    entered = trio.Event()

    async def handler(request: WebSocketRequest, conn: Connection) -> None:
        conn.ws = await request.accept()
        entered.set()
        await trio.sleep_forever()

    settings = ListenerSettings(MiB, 65536, 5.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    serve_websockets, handler, "127.0.0.1", 0, None, settings, lambda: escapes.append(None)
                )
            )
            async with open_raw(f"ws://127.0.0.1:{port}", "/x"):
                await entered.wait()
                nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    assert escapes == []
