"""Raw-bytes mode: connections to the buckets' gRPC ports, the API's membership port and every
metrics port, each sending one payload from :mod:`fuzz_raw_cases` and ending in some way
(read to the end, FIN, RST with SO_LINGER 0, half-close, never read, slowloris pieces).

A connection's outcome is what the server answered (an HTTP status, HTTP/2 frames and
the gRPC status of the first call, nothing) and how the connection ended. A metrics port
that answers a valid GET with a 5xx status, or not at all, is a finding; everything else
is judged by the checks after the run (processes alive, descriptors, tracebacks).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import hpack
import trio
from chaos_stack import Stack
from fuzz_model import Report, Ticket, session_rng
from fuzz_raw_cases import (
    CONTINUATION,
    END_HEADERS,
    GOAWAY,
    H2_FAMILIES,
    HEADERS,
    HTTP_FAMILIES,
    PADDED,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    h2_payload,
    http_payload,
)
from fuzz_wire import Conn, connect
from fuzz_ws_cases import Drop, HalfClose, Pause, Raw, Step, describe_step

CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
#: How long a valid metrics request may take to be answered.
ANSWER_TIMEOUT = 10.0
ENDINGS = (
    "drain",
    "drain",
    "drain",
    "drain",
    "half_close",
    "fin",
    "rst",
    "rst_midway",
    "never_read",
    "slowloris",
)


@dataclass(frozen=True, slots=True)
class RawPlan:
    index: int
    #: ("bucket-3", "grpc"), ("api", "membership"), ("api", "metrics"), ...
    target: tuple[str, str]
    family: str
    ending: str
    steps: tuple[Step, ...]
    #: Read until the server closes, for at most this long (0: never read).
    linger: float
    hold: float
    must_answer: bool

    @property
    def scenario(self) -> str:
        return f"{self.target[1]}:{self.family}"

    def describe(self) -> str:
        pieces = [s for s in self.steps if isinstance(s, Raw) and s.label == "piece"]
        if pieces:
            total = sum(s.seconds for s in self.steps if isinstance(s, Pause))
            rest = [describe_step(s) for s in self.steps if not (isinstance(s, Raw | Pause) and s in pieces)]
            steps = f"{len(pieces)} pieces of 1-20 B, 10-100 ms apart ({total:.1f} s); " + "; ".join(rest)
        else:
            steps = "; ".join(describe_step(s) for s in self.steps)
        where = f"{self.target[0]} {self.target[1]} port"
        return f"connection {self.index} to {where} ({self.family}, {self.ending}): {steps[:1500]}"


def targets(buckets: int) -> list[tuple[str, str]]:
    out = [(f"bucket-{i}", "grpc") for i in range(buckets)]
    out += [("api", "membership"), ("api", "metrics")]
    out += [(f"bucket-{i}", "metrics") for i in range(buckets)]
    return out


def make_raw(rng: random.Random, index: int, buckets: int, secret: str) -> RawPlan:
    kind = rng.random()
    if kind < 0.45:
        target = (f"bucket-{rng.randrange(buckets)}", "grpc")
    elif kind < 0.6:
        target = ("api", "membership")
    else:
        target = rng.choice(targets(buckets)[buckets + 1 :])
    if target[1] == "metrics":
        family = rng.choice(HTTP_FAMILIES)
        payload = http_payload(rng, family)
    else:
        family = rng.choice(H2_FAMILIES)
        use_secret = rng.random() < (0.5 if target[1] == "grpc" else 0.4)
        payload = h2_payload(
            rng, family, secret if use_secret else None, "bucket" if target[1] == "grpc" else "membership"
        )
    ending = rng.choice(ENDINGS)
    if family == "nothing" or rng.random() < 0.03:
        payload, family = b"", "nothing"
    steps: list[Step] = []
    if ending == "slowloris":
        i, waited = 0, 0.0
        while i < len(payload) and waited < 2.0:
            n = rng.randint(1, 20)
            pause = rng.uniform(0.01, 0.1)
            steps += [Raw(payload[i : i + n], "piece"), Pause(pause)]
            i, waited = i + n, waited + pause
        if i < len(payload) and rng.random() < 0.5:
            steps.append(Raw(payload[i:], "the rest"))
    elif payload:
        cut = rng.randint(0, len(payload)) if ending == "rst_midway" else len(payload)
        steps.append(Raw(payload[:cut], family))
    if ending == "half_close":
        steps.append(HalfClose())
    elif ending in ("fin", "rst", "rst_midway"):
        steps += [Pause(rng.choice((0.0, 0.01, 0.1))), Drop(reset=ending != "fin")]
    must_answer = family == "valid" and ending in ("drain", "half_close")
    linger = 0.0 if ending == "never_read" else (ANSWER_TIMEOUT if must_answer else rng.uniform(0.2, 2.0))
    return RawPlan(index, target, family, ending, tuple(steps), linger, rng.uniform(0.1, 3.0), must_answer)


class RawPlayer:
    """Plays raw connection ``index`` of a seed against the stack's current ports."""

    def __init__(self, seed: int, stack: Stack) -> None:
        self.seed, self.stack = seed, stack
        self.secret = stack.env.get("KARMA8_BUCKET_SECRET", "")

    def plan(self, index: int) -> RawPlan:
        return make_raw(session_rng(self.seed, index), index, len(self.stack.buckets), self.secret)

    def describe(self, index: int) -> str:
        return self.plan(index).describe()

    def port(self, target: tuple[str, str]) -> int | None:
        child = {c.name: c for c in self.stack.children()}[target[0]]
        if target[1] == "membership":
            return self.stack.membership_port
        value = child.info.get("metrics_port" if target[1] == "metrics" else "port")
        return value if isinstance(value, int) else None

    async def play(self, index: int, ticket: Ticket) -> Report:
        plan = self.plan(index)
        report = Report(index, plan.scenario)
        port = self.port(plan.target)
        conn = None
        if port is not None:
            with trio.move_on_after(CONNECT_TIMEOUT):
                conn = await connect(port, websocket=False)
        if conn is None:
            ticket.release()
            report.results.append("connect failed")
            return report
        ticket.connected(conn.local_port)
        try:
            async with trio.open_nursery() as nursery:
                if plan.linger:
                    nursery.start_soon(conn.read_all)
                await _send_steps(conn, plan.steps)
                ticket.release()
                if plan.linger and not conn.closed:
                    with trio.move_on_after(plan.linger):
                        await conn.wait_closed()
                elif not plan.linger:
                    await trio.sleep(plan.hold)
                nursery.cancel_scope.cancel()
        finally:
            ticket.release()
            await conn.aclose()
        result = classify(conn.got.head) if plan.linger else "never read"
        report.results.append(f"{result}, {conn.got.ended or 'open'}" if plan.linger else result)
        if plan.must_answer and not result.startswith("http "):
            report.problems.append(f"{plan.target[0]} metrics port did not answer a valid request: {result}")
        elif result.startswith("http 5"):
            report.problems.append(f"{plan.target[0]} metrics port answered {result}")
        return report


async def _send_steps(conn: Conn, steps: tuple[Step, ...]) -> None:
    for step in steps:
        if conn.send_failed or conn.closed:
            return
        if isinstance(step, Raw):
            with trio.move_on_after(SEND_TIMEOUT):
                await conn.send(step.data)
        elif isinstance(step, Pause):
            await trio.sleep(step.seconds)
        elif isinstance(step, HalfClose):
            await conn.shutdown_write()
        elif isinstance(step, Drop):
            await conn.aclose(reset=step.reset)


def classify(head: bytes) -> str:
    """What the first bytes a server sent back were."""
    if not head:
        return "nothing"
    if head.startswith(b"HTTP/"):
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        return f"http {parts[1].decode(errors='replace')}" if len(parts) > 1 else "http ?"
    if len(head) >= 9 and head[3] == SETTINGS:
        return _h2(head)
    return "other bytes"


def _h2(data: bytes) -> str:
    """The HTTP/2 frames of a reply: a GOAWAY's error code, else the first gRPC status."""
    decoder, block, i = hpack.Decoder(), b"", 0
    status: str | None = None
    reset: int | None = None
    while i + 9 <= len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        kind, flags = data[i + 3], data[i + 4]
        payload = data[i + 9 : i + 9 + length]
        i += 9 + length
        if kind == GOAWAY and len(payload) >= 8:
            return f"h2 goaway {struct.unpack('!I', payload[4:8])[0]}"
        if kind == RST_STREAM and len(payload) >= 4 and reset is None:
            reset = struct.unpack("!I", payload[:4])[0]
        if kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                pad = payload[0] if flags & PADDED and payload else 0
                payload = payload[
                    (1 if flags & PADDED else 0) + (5 if flags & PRIORITY_FLAG else 0) : len(payload) - pad
                ]
            block += payload
            if flags & END_HEADERS:
                try:
                    headers = {str(k): str(v) for k, v in decoder.decode(block, raw=False)}
                except hpack.HPACKError:
                    return "h2 undecodable headers"
                block = b""
                if status is None and "grpc-status" in headers:
                    status = headers["grpc-status"]
    if status is not None:
        return f"h2 grpc-status {status}"
    return f"h2 rst_stream {reset}" if reset is not None else "h2 settings"
