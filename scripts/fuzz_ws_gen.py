"""The steps of WebSocket fuzz sessions, drawn from a seeded generator (no I/O).

A session is one or more connections (:class:`Plan`), each a handshake and then steps:
frames built by hand (:class:`Frame`), raw bytes, waits for the server's next reply,
pauses, half-closes and drops. :mod:`fuzz_ws_cases` and :mod:`fuzz_ws_frames` hold the
catalogues of hostile paths, headers, frames and handshakes; this module composes them
into scenarios.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from fuzz_model import Limits
from fuzz_wire import BINARY, PING, PONG, TEXT
from fuzz_ws_cases import (
    Drop,
    Frame,
    Gen,
    HalfClose,
    Pause,
    Read,
    Step,
    bad_header,
    describe_step,
    hostile_path,
    name_path,
    query_path,
)
from fuzz_ws_frames import handshake_variant, hostile_frames


@dataclass(frozen=True, slots=True)
class Plan:
    """One connection of a session."""

    path: str
    #: The handshake bytes; None: wsproto's standard handshake for ``path``.
    handshake: bytes | None = None
    steps: tuple[Step, ...] = ()
    #: The name the server should decode from ``path`` (None: none, or an invalid one).
    name: str | None = None
    upload: bool = False
    #: False: never read from the socket (half-open), and close it after ``hold`` seconds.
    reads: bool = True
    hold: float = 0.0
    #: Send the steps without waiting for the handshake reply.
    pipelined: bool = False
    #: A well-formed upload (its outcome is shown apart in the summary).
    valid: bool = False
    #: Echo the server's close frame (a quarter of the plans leave the server waiting).
    answer_close: bool = True


@dataclass(frozen=True, slots=True)
class Session:
    index: int
    scenario: str
    plans: tuple[Plan, ...]

    def describe(self) -> str:
        """The session in a few lines, for a finding's report."""
        lines = [f"session {self.index} ({self.scenario}):"]
        for i, plan in enumerate(self.plans):
            how = "standard handshake" if plan.handshake is None else f"raw handshake {plan.handshake[:80]!r}"
            lines.append(f"  connection {i}: {plan.path[:120]!r}, {how}")
            lines.append("    " + "; ".join(describe_step(s) for s in plan.steps)[:2000])
            if not plan.reads:
                lines.append(f"    never reads; closes after {plan.hold:.2f} s")
            elif not plan.answer_close:
                lines.append("    does not answer the server's close frame")
        return "\n".join(lines)


# -- building blocks -----------------------------------------------------------------------


def header_frame(text: str | bytes, label: str = "header") -> Frame:
    return Frame(TEXT, text.encode() if isinstance(text, str) else text, label=label)


def data_frames(g: Gen, data: bytes) -> list[Step]:
    """``data`` in binary frames of random sizes (1 to max_frame), now and then fragmented
    or with a ping or pong between frames, then the empty end frame."""
    steps: list[Step] = []
    style = g.rng.choice(("full", "random", "tiny", "fragmented"))
    i = 0
    while i < len(data):
        if style == "full":
            n = g.limits.max_frame
        elif style == "tiny":
            n = g.rng.randint(1, 512)
        else:
            n = g.rng.randint(1, g.limits.max_frame)
        chunk = data[i : i + n]
        i += len(chunk)
        if style == "fragmented" and len(chunk) > 1:
            cut = g.rng.randint(1, len(chunk) - 1)
            steps += [Frame(BINARY, chunk[:cut], fin=False), Frame(0, chunk[cut:])]
        else:
            steps.append(Frame(BINARY, chunk))
        if g.rng.random() < 0.05:
            steps.append(Frame(g.rng.choice((PING, PONG)), g.rng.randbytes(g.rng.randint(0, 125))))
        if g.rng.random() < 0.1:
            steps.append(g.pause())
    steps.append(Frame(BINARY, b"", label="end"))
    return steps


def valid_upload(g: Gen, name: str, path: str) -> Plan:
    size = g.size()
    data = g.rng.randbytes(size)
    sha = hashlib.sha256(data).hexdigest() if g.rng.random() < 0.5 else None
    header = f'{{"size": {size}}}' if sha is None else f'{{"size": {size}, "sha256": "{sha}"}}'
    steps = [header_frame(header), *data_frames(g, data), Read()]
    return Plan(path, steps=tuple(steps), name=name, upload=True, valid=True)


def insert_randomly(g: Gen, steps: list[Step], extra: list[Step]) -> list[Step]:
    """``extra`` inserted as one block at a random point of ``steps``."""
    at = g.rng.randint(0, len(steps))
    return steps[:at] + extra + steps[at:]


# -- scenarios -----------------------------------------------------------------------------


def s_upload_valid(g: Gen) -> tuple[Plan, ...]:
    name, path = name_path(g, "upload")
    return (valid_upload(g, name, path),)


def s_query_valid(g: Gen) -> tuple[Plan, ...]:
    op = g.rng.choice(
        ("download", "download", "stat", "delete", "files", "status", "rebalance", "verify", "repair")
    )
    if op in ("download", "stat", "delete"):
        name, path = name_path(g, op)
        return (Plan(path, steps=(Read(),), name=name),)
    if op == "verify" and g.rng.random() < 0.5:
        name, path = name_path(g, op)
        return (Plan(path, steps=(Read(),), name=name),)
    return (Plan(query_path(g, op, valid=True), steps=(Read(),)),)


def s_upload_header(g: Gen) -> tuple[Plan, ...]:
    """A hostile header, then a reply, more data, an oversized frame or hostile frames."""
    name, path = name_path(g, "upload")
    text, label = bad_header(g)
    steps: list[Step] = [header_frame(text, label)]
    tail = g.rng.random()
    if tail < 0.3:
        steps += [g.pause(), Frame(BINARY, g.rng.randbytes(g.oversize()), label="oversized")]
    elif tail < 0.5:
        steps += data_frames(g, g.rng.randbytes(g.size()))
    elif tail < 0.8:
        steps += hostile_frames(g, g.rng.randint(1, 3))
    steps.append(Read())
    if g.rng.random() < 0.3:
        steps += hostile_frames(g, g.rng.randint(1, 2))
    return (Plan(path, steps=tuple(steps), name=name, upload=True),)


def s_upload_frames(g: Gen) -> tuple[Plan, ...]:
    """A well-formed upload with hostile frames at a random point (maybe after the reply)."""
    name, path = name_path(g, "upload")
    plan = valid_upload(g, name, path)
    steps = insert_randomly(g, list(plan.steps), hostile_frames(g, g.rng.randint(1, 3)))
    return (Plan(path, steps=tuple(steps), name=name, upload=True),)


def s_frames_anywhere(g: Gen) -> tuple[Plan, ...]:
    """Any endpoint, a few random frames with reads between them."""
    op = g.rng.choice(("upload", "download", "stat", "delete", "files", "status", "rebalance", "repair"))
    if op in ("upload", "download", "stat", "delete"):
        name, path = name_path(g, op)
    else:
        name, path = None, query_path(g, op, valid=True)
    steps: list[Step] = []
    for _ in range(g.rng.randint(1, 5)):
        steps += hostile_frames(g, 1)
        if g.rng.random() < 0.3:
            steps.append(Read())
    return (Plan(path, steps=tuple(steps), name=name, upload=op == "upload"),)


def s_after_reply(g: Gen) -> tuple[Plan, ...]:
    """A request served to the end (or failed), then frames while the server closes."""
    kind = g.rng.random()
    if kind < 0.4:
        name, path = name_path(g, "upload")
        plan = valid_upload(g, name, path)
    elif kind < 0.6:
        name, path = name_path(g, "upload")
        text, label = bad_header(g)
        plan = Plan(path, steps=(header_frame(text, label), Read()), name=name, upload=True)
    else:
        name, path = name_path(g, "download")
        plan = Plan(path, steps=(Read(),), name=name)
    late: list[Step] = [g.pause()] if g.rng.random() < 0.7 else []
    late += hostile_frames(g, g.rng.randint(1, 3))
    return (Plan(plan.path, steps=plan.steps + tuple(late), name=plan.name, upload=plan.upload),)


def s_paths(g: Gen) -> tuple[Plan, ...]:
    path, name, op = hostile_path(g)
    steps: list[Step] = []
    if op == "upload" and g.rng.random() < 0.6:
        size = g.rng.randint(0, 64)
        steps = [
            header_frame(f'{{"size": {size}}}'),
            Frame(BINARY, g.rng.randbytes(size)),
            Frame(BINARY, b""),
        ]
    steps.append(Read())
    return (Plan(path, steps=tuple(steps), name=name, upload=op == "upload"),)


def s_handshake(g: Gen) -> tuple[Plan, ...]:
    handshake, steps, pipelined = handshake_variant(g)
    return (Plan("/status", handshake=handshake, steps=tuple(steps), pipelined=pipelined),)


def s_abandon(g: Gen) -> tuple[Plan, ...]:
    """Connections left behind at some point: silent, half-open, half-closed, dropped."""
    name, path = name_path(g, g.rng.choice(("upload", "upload", "download")))
    upload = path.startswith("/upload/")
    steps: list[Step] = []
    if upload:
        full = valid_upload(g, name, path).steps
        steps = list(full[: g.rng.randint(0, len(full) - 1)])
    how = g.rng.choice(("silent", "never_read", "half_close", "fin", "rst", "no_handshake", "half_handshake"))
    if how == "no_handshake":
        return (Plan(path, handshake=b"", reads=g.rng.random() < 0.5, hold=g.hold()),)
    if how == "half_handshake":
        partial = g.standard_handshake(path)
        return (Plan(path, handshake=partial[: g.rng.randint(1, len(partial) - 1)]),)
    if how == "never_read":
        return (Plan(path, steps=tuple(steps), name=name, upload=upload, reads=False, hold=g.hold()),)
    if how == "half_close":
        steps.append(HalfClose())
    elif how in ("fin", "rst"):
        steps += [g.pause(), Drop(reset=how == "rst")]
    return (Plan(path, steps=tuple(steps), name=name, upload=upload),)


def s_concurrent(g: Gen) -> tuple[Plan, ...]:
    """Several uploads of one name at once (conflicts), one maybe with hostile frames."""
    name, path = name_path(g, "upload")
    plans = []
    for i in range(g.rng.randint(2, 4)):
        plan = valid_upload(g, name, path)
        steps = list(plan.steps)
        steps.insert(g.rng.randint(1, len(steps) - 1), Pause(g.rng.uniform(0, 0.05)))
        if i == 0 and g.rng.random() < 0.3:
            steps = insert_randomly(g, steps, hostile_frames(g, 1))
            plan = Plan(path, steps=tuple(steps), name=name, upload=True)
        else:
            plan = Plan(path, steps=tuple(steps), name=name, upload=True, valid=True)
        plans.append(plan)
    return tuple(plans)


def s_download_hostile(g: Gen) -> tuple[Plan, ...]:
    """A download while the client sends frames, stops reading or drops the connection."""
    name, path = name_path(g, "download")
    steps: list[Step] = [Read()] if g.rng.random() < 0.5 else []
    steps += hostile_frames(g, g.rng.randint(1, 3))
    if g.rng.random() < 0.3:
        steps.append(Drop(reset=g.rng.random() < 0.5))
    return (Plan(path, steps=tuple(steps), name=name, reads=g.rng.random() < 0.8, hold=g.hold()),)


SCENARIOS: dict[str, tuple[float, Callable[[Gen], tuple[Plan, ...]]]] = {
    "upload_valid": (12, s_upload_valid),
    "query_valid": (8, s_query_valid),
    "upload_header": (12, s_upload_header),
    "upload_frames": (12, s_upload_frames),
    "frames_anywhere": (10, s_frames_anywhere),
    "after_reply": (10, s_after_reply),
    "paths": (10, s_paths),
    "handshake": (8, s_handshake),
    "abandon": (6, s_abandon),
    "concurrent": (4, s_concurrent),
    "download_hostile": (5, s_download_hostile),
}


def make_session(rng: random.Random, index: int, limits: Limits, port: int) -> Session:
    """Session ``index``, drawn from its own generator."""
    g = Gen(rng, limits, f"127.0.0.1:{port}")
    names = list(SCENARIOS)
    scenario = rng.choices(names, weights=[SCENARIOS[n][0] for n in names])[0]
    plans = tuple(replace(p, answer_close=rng.random() < 0.75) for p in SCENARIOS[scenario][1](g))
    return Session(index, scenario, plans)
