"""The fuzzer's bookkeeping, without I/O: options, what an upload may have stored, outcomes,
findings and the summary.

Every session draws its choices from its own generator, a pure function of ``--seed`` and
the session's index (:func:`session_rng`), so that any session can be replayed alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote_to_bytes

from chaos_model import ChaosError, count_table, nested
from fuzz_wire import BINARY, CLOSE, CONT, PING, PONG, TEXT

#: What a name may hold: (size, sha256) of an upload.
Version = tuple[int, str]


class FuzzError(ChaosError):
    """The fuzz run itself could not go on (the stack would not start, bad options)."""


@dataclass(frozen=True, slots=True)
class Options:
    """Everything a fuzz run is configured with."""

    mode: str
    seed: int
    sessions: int
    time_limit: float
    concurrency: int
    connections: int
    replay: tuple[int, ...]
    data: Path | None
    keep: bool
    buckets: int
    max_frame: int
    max_file_size: int
    idle_timeout: float
    handshake_timeout: float
    max_crashes: int
    triage_time: float
    check_timeout: float
    log_level: str
    json_path: Path | None

    @property
    def count(self) -> int:
        """Sessions (WebSocket mode) or connections (raw mode) to run."""
        return self.connections if self.mode == "raw" else self.sessions


def note(message: str) -> None:
    print(f"fuzz: {message}", file=sys.stderr, flush=True)


def session_rng(seed: int, index: int) -> random.Random:
    """The generator of session ``index``: the same for a replay of it."""
    return random.Random(f"karma8-fuzz:{seed}:{index}")


@dataclass(frozen=True, slots=True)
class Limits:
    """The API settings the sessions are built around."""

    max_frame: int
    max_file_size: int
    idle_timeout: float
    handshake_timeout: float


# -- names ---------------------------------------------------------------------------------


def expected_name(raw: str) -> str | None:
    """The file name a server following docs/protocol.md decodes from a path's name part
    (the query and fragment already cut off); None if it must refuse it (``bad_name``)."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        return None
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not 1 <= len(name.encode()) <= 1024:
        return None
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return None
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        return None
    return name


# -- what an upload may have stored --------------------------------------------------------


def header_of(text: str, max_file_size: int) -> tuple[int, str | None] | None:
    """(size, sha256) of a valid upload header by docs/protocol.md, or None."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) - {"size", "sha256"}:
        return None
    size, sha = obj.get("size"), obj.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= max_file_size:
        return None
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        return None
    return size, sha


class UploadModel:
    """What a server that follows docs/protocol.md makes of the frames of one upload.

    Frames are assembled into messages as the server's WebSocket library does (a message
    above ``max_frame`` ends the connection, as does any frame that breaks RFC 6455). It
    answers one question: which content may this session have committed? Where the
    server's reading is not certain (bytes that are not a whole frame), it assumes the
    upload may have completed, so that the stored-files check never blames the server
    for what the fuzzer could have caused.
    """

    def __init__(self, name: str | None, limits: Limits) -> None:
        self.name = name
        self.limits = limits
        self.state = "header"  # then "data", "ended" or "broken"
        self.size = 0
        self.sha: str | None = None
        self.received = 0
        self._hash = hashlib.sha256()
        self._kind: int | None = None
        self._parts: list[bytes] = []
        self._length = 0
        #: (size, sha256) this upload may have committed.
        self.complete: Version | None = None

    def frame(self, opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool) -> None:
        if self.state in ("ended", "broken"):
            return
        if rsv or not masked:
            self.state = "broken"
        elif opcode >= CLOSE:
            if opcode not in (CLOSE, PING, PONG) or len(payload) > 125 or not fin or opcode == CLOSE:
                self.state = "broken"
        elif opcode not in (CONT, TEXT, BINARY) or (opcode == CONT) == (self._kind is None):
            self.state = "broken"
        else:
            if opcode != CONT:
                self._kind, self._parts, self._length = opcode, [], 0
            self._parts.append(payload)
            # trio-websocket counts characters for text, bytes for binary.
            if self._kind == TEXT:
                try:
                    self._length += len(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    self._length += len(payload)
            else:
                self._length += len(payload)
            if self._length > self.limits.max_frame:
                self.state = "broken"
            elif fin:
                kind, data = self._kind, b"".join(self._parts)
                self._kind, self._parts = None, []
                self._message(kind == TEXT, data)

    def _message(self, text: bool, data: bytes) -> None:
        if self.state == "header":
            header = None
            if text:
                try:
                    header = header_of(data.decode("utf-8"), self.limits.max_file_size)
                except UnicodeDecodeError:
                    header = None
            if header is None:
                self.state = "broken"
            else:
                self.size, self.sha = header
                self.state = "data"
        elif text:
            self.state = "broken"
        elif not data:
            self._end()
        else:
            self.received += len(data)
            self._hash.update(data)
            if self.received > self.size:
                self.state = "broken"

    def _end(self) -> None:
        self.state = "ended"
        digest = self._hash.hexdigest()
        if self.received == self.size and self.sha in (None, digest):
            self.complete = (self.size, digest)

    def garbage(self) -> None:
        """Bytes that are not one whole frame: from here on, anything may be read."""
        if self.state == "data" and self.received == self.size:
            self._end()
        elif self.state != "ended":
            self.state = "broken"


@dataclass
class Ledger:
    """The uploads the fuzzer sent: acknowledged ones, and complete ones that may have committed."""

    acked: dict[str, set[Version]] = field(default_factory=dict)
    possible: dict[str, set[Version]] = field(default_factory=dict)

    def ack(self, name: str, version: Version) -> None:
        self.acked.setdefault(name, set()).add(version)

    def sent(self, name: str, version: Version) -> None:
        self.possible.setdefault(name, set()).add(version)

    def check(self, files: list[tuple[str, int, str]]) -> list[str]:
        """Problems with a listing: files the fuzzer did not upload whole."""
        problems = []
        for name, size, sha in files:
            if (size, sha) in self.acked.get(name, set()) | self.possible.get(name, set()):
                continue
            if name in self.acked or name in self.possible:
                problems.append(
                    f"{name!r} is stored with {size} bytes, sha256 {sha[:12]}, which no upload"
                    " of that name sent whole"
                )
            else:
                problems.append(f"{name!r} is stored ({size} bytes) but was never uploaded whole")
        return problems

    @property
    def acknowledged(self) -> int:
        return sum(len(v) for v in self.acked.values())


@dataclass
class Report:
    """What one session (or raw connection) came to."""

    index: int
    scenario: str
    results: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    acks: list[tuple[str, Version]] = field(default_factory=list)
    sent: list[tuple[str, Version]] = field(default_factory=list)

    def record(self, ledger: Ledger) -> None:
        for name, version in self.acks:
            ledger.ack(name, version)
        for name, version in self.sent:
            ledger.sent(name, version)


class Ticket:
    """A running session's link to the run: when its steps are done (its concurrency slot is
    free again; what is left is waiting for the server's timeouts), and which local ports
    its connections use (a server's log line may name one)."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self._on_release = on_release
        self.released = False
        self.ports: list[int] = []

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._on_release is not None:
                self._on_release()

    def connected(self, port: int) -> None:
        self.ports.append(port)


class Player(Protocol):
    """Runs session ``index`` of a mode (WebSocket or raw) and describes it."""

    async def play(self, index: int, ticket: Ticket) -> Report: ...

    def describe(self, index: int) -> str: ...


# -- outcomes, findings and the summary ----------------------------------------------------


def blur(text: str) -> str:
    """``text`` with numbers and hex runs blurred: repeats of one problem compare equal."""
    return re.sub(r"\d+", "N", re.sub(r"\b[0-9a-f]{8,}\b", "H", text))


@dataclass
class Finding:
    """A problem, with the sessions that showed it (their indices replay it)."""

    check: str
    message: str
    sessions: list[int] = field(default_factory=list)
    count: int = 1
    #: A session that reproduced it when replayed alone.
    confirmed: int | None = None
    #: What the session did, for the report.
    description: str = ""
    #: Crashes and tracebacks: the process and the exception line (what a replay must cause).
    child: str = ""
    signature: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "check": self.check,
            "message": self.message,
            "count": self.count,
            "sessions": self.sessions,
            "confirmed": self.confirmed,
            "description": self.description,
        }


#: A finding lists at most this many sessions.
SESSIONS_KEPT = 50


@dataclass
class Stats:
    """Counters for the summary, and the findings (one per distinct problem)."""

    sessions: int = 0
    scenarios: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    findings: dict[tuple[str, str], Finding] = field(default_factory=dict)
    crashes: int = 0
    #: How many sessions had started when the first finding was made (None: no finding).
    first_finding_after: int | None = None
    ledger: Ledger = field(default_factory=Ledger)
    checks: dict[str, str] = field(default_factory=dict)
    #: Seconds from the first session to the last one's end (triage and checks excluded).
    fuzz_seconds: float = 0.0

    def outcome(self, scenario: str, result: str) -> None:
        self.outcomes[scenario, result] += 1

    def find(
        self, check: str, message: str, sessions: tuple[int, ...] = (), started: int = 0, **extra: str
    ) -> Finding:
        """Record a problem; a repeat of a known one only adds its sessions."""
        key = (check, blur(message))
        finding = self.findings.get(key)
        if finding is None:
            finding = self.findings[key] = Finding(check, message, **extra)  # type: ignore[arg-type]
            if self.first_finding_after is None:
                self.first_finding_after = started
        else:
            finding.count += 1
        for index in sessions:
            if index not in finding.sessions and len(finding.sessions) < SESSIONS_KEPT:
                finding.sessions.append(index)
        return finding

    def as_json(self, options: Options, elapsed: float) -> dict[str, object]:
        return {
            "mode": options.mode,
            "seed": options.seed,
            "elapsed": round(elapsed, 1),
            "fuzz_seconds": round(self.fuzz_seconds, 1),
            "sessions": self.sessions,
            "scenarios": dict(sorted(self.scenarios.items())),
            "outcomes": nested(self.outcomes),
            "acknowledged": self.ledger.acknowledged,
            "crashes": self.crashes,
            "first_finding_after": self.first_finding_after,
            "checks": self.checks,
            "findings": [f.as_json() for f in self.findings.values()],
        }


def format_summary(stats: Stats, options: Options, elapsed: float) -> str:
    """The summary table printed at the end of a run."""
    unit = "connections" if options.mode == "raw" else "sessions"
    lines = [
        f"fuzz summary: {options.mode} mode, seed {options.seed}, {stats.sessions} {unit} in"
        f" {stats.fuzz_seconds:.0f} s ({60 * stats.sessions / max(stats.fuzz_seconds, 1e-9):.0f}/min),"
        f" {elapsed:.0f} s in all",
        "",
        *count_table(stats.outcomes, ("scenario", "outcome"), (28, 34)),
    ]
    lines += ["", f"{'scenario':<28}{unit:>12}"]
    for scenario, n in sorted(stats.scenarios.items()):
        lines.append(f"{scenario:<28}{n:>12}")
    lines += ["", f"{'check':<34}result"]
    for check, result in stats.checks.items():
        lines.append(f"{check:<34}{result}")
    lines += [
        "",
        f"{'acknowledged uploads':<34}{stats.ledger.acknowledged:>8}",
        f"{'process crashes':<34}{stats.crashes:>8}",
        f"{'findings':<34}{len(stats.findings):>8}",
    ]
    if stats.first_finding_after is not None:
        lines.append(f"{'first finding after':<34}{stats.first_finding_after:>8} {unit}")
    for f in stats.findings.values():
        times = f" (x{f.count})" if f.count > 1 else ""
        lines.append(f"  FINDING [{f.check}]{times} {f.message}")
        if f.confirmed is not None:
            lines.append(f"    reproduced alone by: --seed {options.seed} --replay {f.confirmed}")
        elif f.sessions:
            shown = ",".join(map(str, f.sessions[:20])) + (" ..." if len(f.sessions) > 20 else "")
            lines.append(f"    sessions involved (replay with --seed {options.seed} --replay INDEX): {shown}")
        if f.description:
            lines += ["    " + line for line in f.description.splitlines()]
    return "\n".join(lines)
