"""Running WebSocket fuzz sessions: each plan over its own raw socket, every frame as planned,
and what came back judged against docs/protocol.md.

A session's problems (an ``internal`` error frame, a reply that is not JSON, frames the
server sent after its close, an acknowledgement that does not match what was sent, a
connection the server never closed) become findings with the session's index.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import trio
from fuzz_model import Limits, Report, Ticket, UploadModel, session_rng
from fuzz_wire import Conn, connect
from fuzz_ws_cases import Frame, HalfClose, Pause, Raw, Read, request_bytes
from fuzz_ws_gen import Plan, Session, make_session

CONNECT_TIMEOUT = 5.0
#: Sends and reads get this much beyond the server's own timeouts before we give up.
SLACK = 8.0


class Releaser:
    """Releases the ticket once the last of ``count`` connections is done with its steps."""

    def __init__(self, count: int, ticket: Ticket) -> None:
        self._left = count
        self.ticket = ticket

    def __call__(self) -> None:
        self._left -= 1
        if self._left == 0:
            self.ticket.release()


class WsPlayer:
    """Plays WebSocket session ``index`` of a seed against the API port."""

    def __init__(self, seed: int, port: int, limits: Limits) -> None:
        self.seed, self.port, self.limits = seed, port, limits

    def session(self, index: int) -> Session:
        return make_session(session_rng(self.seed, index), index, self.limits, self.port)

    def describe(self, index: int) -> str:
        return self.session(index).describe()

    async def play(self, index: int, ticket: Ticket) -> Report:
        return await play_session(self.session(index), self.port, self.limits, ticket)


async def play_session(session: Session, port: int, limits: Limits, ticket: Ticket) -> Report:
    """Run every connection of ``session`` at once; release the slot when their steps are done."""
    report = Report(session.index, session.scenario)
    done = Releaser(len(session.plans), ticket)
    rng = random.Random(session.index)
    async with trio.open_nursery() as nursery:
        for plan in session.plans:
            nursery.start_soon(play_plan, plan, port, limits, rng.randbytes(4), report, done)
    return report


async def play_plan(
    plan: Plan, port: int, limits: Limits, key: bytes, report: Report, done: Releaser
) -> None:
    model = UploadModel(plan.name, limits) if plan.upload else None
    with trio.move_on_after(CONNECT_TIMEOUT):
        conn = await connect(port, websocket=True, answer_close=plan.answer_close)
    if conn is None:
        done()
        report.results.append("connect failed")
        return
    done.ticket.connected(conn.local_port)
    hang = False
    try:
        async with trio.open_nursery() as nursery:
            if plan.reads:
                nursery.start_soon(conn.read_all)
            hang = await _converse(conn, port, plan, limits, key, model, done)
            nursery.cancel_scope.cancel()
    finally:
        await conn.aclose()
    judge(conn, plan, model, hang, limits, report)


async def _converse(
    conn: Conn,
    port: int,
    plan: Plan,
    limits: Limits,
    key: bytes,
    model: UploadModel | None,
    done: Callable[[], None],
) -> bool:
    """The handshake, the steps, then the wait for the server to close; True if it never did."""
    try:
        handshake = (
            request_bytes(f"127.0.0.1:{port}", plan.path) if plan.handshake is None else plan.handshake
        )
        with trio.move_on_after(limits.idle_timeout + SLACK):
            await conn.send(handshake)
        if plan.reads and not plan.pipelined and plan.steps:
            with trio.move_on_after(limits.handshake_timeout + SLACK):
                await conn.wait_until(lambda: conn.got.status is not None)
        if not plan.reads or plan.pipelined or conn.got.status == 101:
            await _steps(conn, plan, limits, key, model)
    finally:
        done()
    if not plan.reads:
        await trio.sleep(plan.hold)
        return False
    if conn.closed:
        return False
    with trio.move_on_after(limits.idle_timeout + limits.handshake_timeout + SLACK) as waiting:
        await conn.wait_closed()
    return waiting.cancelled_caught


async def _steps(conn: Conn, plan: Plan, limits: Limits, key: bytes, model: UploadModel | None) -> None:
    """Each step within the server's idle timeout (and some): a server that stops reading
    ends the sending, not the session."""
    seen = 0
    for step in plan.steps:
        if conn.send_failed or conn.closed:
            return
        with trio.move_on_after(limits.idle_timeout + SLACK):
            if isinstance(step, Frame):
                if model is not None:
                    model.frame(step.opcode, step.payload, step.fin, step.rsv, step.masked)
                await conn.send(step.wire(key))
            elif isinstance(step, Raw):
                if model is not None:
                    model.garbage()
                await conn.send(step.data)
            elif isinstance(step, Read):
                await conn.wait_until(lambda n=seen: conn.text_count() > n or conn.got.close is not None)  # type: ignore[misc]
                seen = conn.text_count()
            elif isinstance(step, Pause):
                await trio.sleep(step.seconds)
            elif isinstance(step, HalfClose):
                await conn.shutdown_write()
            else:
                await conn.aclose(reset=step.reset)


# -- judging what came back ----------------------------------------------------------------


def _replies(texts: list[str], problems: list[str]) -> list[dict[str, Any]]:
    replies = []
    for text in texts:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            problems.append(f"reply frame is not a JSON object with a boolean 'ok': {text[:200]!r}")
            continue
        replies.append(obj)
    return replies


def judge(
    conn: Conn, plan: Plan, model: UploadModel | None, hang: bool, limits: Limits, report: Report
) -> None:
    """Turn what the server sent into an outcome and problems (docs/protocol.md)."""
    got, problems = conn.got, report.problems
    replies = _replies(got.texts, problems)
    for reply in replies:
        if reply.get("error") == "internal":
            problems.append(f"the server sent an internal error: {reply.get('message', '')!r}")
    if got.protocol_error is not None:
        problems.append(f"the server's frames do not parse: {got.protocol_error}")
    if got.after_close:
        problems.append(f"the server sent {got.after_close} frame(s) after its close frame")
    if hang:
        waited = limits.idle_timeout + limits.handshake_timeout + SLACK
        problems.append(f"the server kept the connection open {waited:g} s after the client's last step")
    if model is not None:
        _judge_upload(plan, model, replies, report)
    elif replies and replies[0].get("ok") and plan.path.startswith("/download/") and got.data_end:
        header = replies[0]
        if got.data_bytes != header.get("size") or got.sha.hexdigest() != header.get("sha256"):
            problems.append(
                f"download data ({got.data_bytes} bytes, sha256 {got.sha.hexdigest()[:12]}) differs from"
                f" its header ({header.get('size')} bytes, sha256 {str(header.get('sha256'))[:12]})"
            )
    report.results.append(outcome_key(conn, replies, plan))


def _judge_upload(plan: Plan, model: UploadModel, replies: list[dict[str, Any]], report: Report) -> None:
    if model.complete is not None and plan.name is not None:
        report.sent.append((plan.name, model.complete))
    acks = [r for r in replies if r.get("ok")]
    if not acks:
        return
    ack = acks[0]
    version = (ack.get("size"), ack.get("sha256"))
    if plan.name is None:
        report.problems.append(f"an upload to {plan.path[:100]!r}, a name to refuse, was acknowledged: {ack}")
    elif model.complete is None:
        report.problems.append(f"an upload the client did not send whole was acknowledged: {ack}")
    elif ack.get("name") != plan.name:
        report.problems.append(f"the ack names {ack.get('name')!r}, the path named {plan.name!r}")
    elif version != model.complete:
        report.problems.append(f"the ack {version} differs from the data sent {model.complete}")
    else:
        report.acks.append((plan.name, model.complete))


def outcome_key(conn: Conn, replies: list[dict[str, Any]], plan: Plan) -> str:
    """``<reply> <close>``: ``ok 1000``, ``bad_request 4400``, ``- 1009``, ``http 400``..."""
    got = conn.got
    valid = "valid upload: " if plan.valid else ""
    if not plan.reads:
        return "never read"
    if got.status is None:
        return f"{valid}no handshake reply, {got.ended or 'open'}"
    if got.status != 101:
        return f"{valid}http {got.status}"
    reply = "-" if not replies else "ok" if replies[0]["ok"] else str(replies[0].get("error"))
    close = str(got.close[0]) if got.close is not None else str(got.ended or "open")
    return f"{valid}{reply} {close}"
