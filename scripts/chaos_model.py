"""The chaos run's bookkeeping, without I/O: options, sizes and contents, what each name
may hold, counters, violations and the summary table.

Every random choice comes from generators derived from the one ``--seed``; see
:func:`derive`. A name's state is a set of possibilities: after an acknowledged upload it
is exactly that upload's sha256, after an acknowledged delete it is "absent", and an
operation whose outcome is unknown (the API was killed, the client was killed) adds its
result to the set instead of replacing it. Reading the name back through the API
(a download or the final listing) must find one of the possibilities, and then narrows
the set to what it found.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

#: The state of a name: the sha256 of its content, or None when it does not exist.
Content = str | None

#: How many past operations of a name a violation report quotes.
HISTORY = 12


class ChaosError(Exception):
    """The chaos run itself could not go on (a process would not start, bad options)."""


class ScriptOptions(Protocol):
    """What :func:`run_script` needs of a script's options."""

    @property
    def data(self) -> Path | None: ...
    @property
    def keep(self) -> bool: ...
    @property
    def json_path(self) -> Path | None: ...


OptionsT = TypeVar("OptionsT", bound=ScriptOptions)


class ScriptStats(Protocol):
    """What :func:`run_script` needs of a script's results."""

    def as_json(self, options: Any, elapsed: float) -> dict[str, object]: ...


StatsT = TypeVar("StatsT", bound=ScriptStats)


def run_script(
    run: Callable[[OptionsT, Path], Awaitable[StatsT]],
    options: OptionsT,
    prefix: str,
    summary: Callable[[StatsT, OptionsT, float], str],
    failed: Callable[[StatsT], bool],
    note: Callable[[str], None],
) -> int:
    """Run a stack script (chaos, fuzz) in ``--data`` or a temporary directory, print its
    summary and write its JSON; the exit status: 1 if ``failed``, 2 if the stack could not
    start (:class:`ChaosError`), 130 if interrupted, else 0. The temporary directory is
    kept with ``--keep`` or a failure."""
    root = options.data.absolute() if options.data else Path(tempfile.mkdtemp(prefix=prefix))
    started = time.monotonic()
    # SIGTERM (kill, timeout) stops the run as Ctrl-C does: the stack's processes with it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stats = trio.run(run, options, root)
    except ChaosError as exc:
        note(f"the stack did not start: {exc}")
        return 2
    except KeyboardInterrupt:
        note(f"interrupted; data in {root}")
        return 130
    except BaseExceptionGroup as group:  # interrupted inside a nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        note(f"interrupted; data in {root}")
        return 130
    elapsed = time.monotonic() - started
    print(summary(stats, options, elapsed), flush=True)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(stats.as_json(options, elapsed), indent=2) + "\n")
    if options.data is None:
        if options.keep or failed(stats):
            note(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed(stats) else 0


def count_table(
    counts: Counter[tuple[str, str]], heads: tuple[str, str], widths: tuple[int, int]
) -> list[str]:
    """``{(kind, outcome): n}`` as a table: a header line, then one line per pair, sorted."""
    w1, w2 = widths
    lines = [f"{heads[0]:<{w1}}{heads[1]:<{w2}}{'count':>8}"]
    lines += [f"{kind:<{w1}}{outcome[: w2 - 1]:<{w2}}{n:>8}" for (kind, outcome), n in sorted(counts.items())]
    return lines


def nested(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{(kind, outcome): n}`` as ``{kind: {outcome: n}}``, sorted (for JSON summaries)."""
    out: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(counts.items()):
        out.setdefault(kind, {})[outcome] = n
    return out


@dataclass(frozen=True, slots=True)
class Interval:
    """A range of seconds to draw from uniformly (``"2:6"``, or ``"3"`` for exactly 3)."""

    lo: float
    hi: float

    @classmethod
    def parse(cls, text: str) -> Interval:
        lo_text, _, hi_text = text.partition(":")
        try:
            lo = float(lo_text)
            hi = float(hi_text) if hi_text else lo
        except ValueError:
            raise ChaosError(f"not an interval: {text!r} (try 2:6 or 3)") from None
        if lo < 0 or hi < lo:
            raise ChaosError(f"not an interval: {text!r} (need 0 <= lo <= hi)")
        return cls(lo, hi)

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    def __str__(self) -> str:
        return f"{self.lo:g}:{self.hi:g}"


@dataclass(frozen=True, slots=True)
class Options:
    """Everything a chaos run is configured with."""

    duration: float
    seed: int
    data: Path | None
    keep: bool
    buckets: int
    concurrency: int
    max_size: int
    names: int
    bucket_kill_every: Interval
    bucket_downtime: Interval
    api_kill_every: Interval
    api_downtime: Interval
    socket_kill_every: Interval
    client_kill_every: Interval
    #: None: no such fault.
    bucket_loss_every: Interval | None
    bit_flip_every: Interval | None
    settle_timeout: float
    log_level: str
    json_path: Path | None
    #: API server processes sharing the registry.
    api_servers: int = 1
    #: ``sqlite``, ``postgresql`` (a throwaway cluster) or a ``postgresql://`` URL.
    registry: str = "sqlite"


def derive(rng: random.Random) -> random.Random:
    """A new generator seeded from ``rng``: one per task keeps each task's choices repeatable."""
    return random.Random(rng.getrandbits(64))


def log_uniform_size(rng: random.Random, max_size: int, floor: int = 0) -> int:
    """A size from 0 to ``max_size``, log-uniform (as many tiny files as big ones)."""
    size = int(math.exp(rng.uniform(0.0, math.log(max_size + 1)))) - 1
    return min(max_size, max(size, min(floor, max_size)))


def content(seed: int, size: int) -> bytes:
    """The bytes of an upload: a pure function of its seed and size."""
    return random.Random(seed).randbytes(size)


def write_content(path: Path, seed: int, size: int) -> str:
    """Write an upload's bytes to ``path``; return their sha256 (blocking: run in a thread)."""
    data = content(seed, size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file (blocking: run in a thread)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def short(value: Content) -> str:
    return "absent" if value is None else value[:12]


@dataclass
class NameState:
    """What one name may hold, and how it got there."""

    possible: set[Content] = field(default_factory=lambda: {None})
    #: The sha256 of the last acknowledged upload while it may still be the current version.
    acked: str | None = None
    history: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.history.append(line)
        del self.history[:-HISTORY]

    def describe(self) -> str:
        shown = ", ".join(sorted(short(p) for p in self.possible))
        return f"expected one of {{{shown}}}; history: " + " | ".join(self.history)


class Ledger:
    """What every name of the pool may hold."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.states = {name: NameState() for name in names}

    def upload_acked(self, name: str, sha: str, op: str) -> None:
        state = self.states[name]
        state.possible = {sha}
        state.acked = sha
        state.note(f"{op} upload {short(sha)} acknowledged")

    def upload_failed(self, name: str, sha: str, op: str, why: str) -> None:
        self.states[name].note(f"{op} upload {short(sha)} failed ({why})")

    def upload_unknown(self, name: str, sha: str, op: str, why: str) -> None:
        state = self.states[name]
        state.possible.add(sha)
        state.note(f"{op} upload {short(sha)} outcome unknown ({why})")

    def delete_acked(self, name: str, op: str) -> None:
        state = self.states[name]
        state.possible = {None}
        state.acked = None
        state.note(f"{op} delete acknowledged")

    def delete_unknown(self, name: str, op: str, why: str) -> None:
        state = self.states[name]
        state.possible.add(None)
        state.note(f"{op} delete outcome unknown ({why})")

    def observe(self, name: str, found: Content, op: str) -> str | None:
        """Record that the API showed ``found`` for ``name``; a violation message if impossible."""
        state = self.states[name]
        problem = None
        if found not in state.possible:
            problem = f"{op}: {name!r} is {short(found)}, {state.describe()}"
        state.possible = {found}
        if found != state.acked:
            state.acked = None
        state.note(f"{op} saw {short(found)}")
        return problem

    def acknowledged(self, name: str) -> bool:
        """True when the name must hold exactly its last acknowledged upload."""
        state = self.states[name]
        return state.acked is not None and state.possible == {state.acked}


@dataclass
class Stats:
    """Counters for the summary, and the violations found."""

    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    fault_misses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    acknowledged: int = 0
    files_verified: int = 0
    acknowledged_verified: int = 0
    orphans: int = 0
    missing: int = 0
    tmp_files: int = 0
    #: Acknowledged current versions that could not be read back at the end.
    lost_files: int = 0
    #: Fragments the scrub at the end found damaged, after repairs.
    damaged_after_repair: int = 0
    #: Deletions left pending on buckets lost for good (they can never be confirmed).
    pending_on_lost: int = 0
    bytes_uploaded: int = 0
    unknown_outcomes: int = 0
    #: Fragment files not (or no longer) part of a committed file, and pending deletions,
    #: when the chaos stopped; and how long the cleanup then took.
    backlog_fragments: int = 0
    backlog_pending: int = 0
    settle_seconds: float = 0.0

    def op(self, kind: str, outcome: str) -> None:
        self.operations[kind, outcome] += 1

    def violation(self, message: str) -> None:
        self.violations.append(message)

    @property
    def internal_errors(self) -> int:
        """Operations the server failed with ``internal``: not a violation, but a bug to look at."""
        return sum(n for (_, outcome), n in self.operations.items() if outcome == "internal")

    def as_json(self, options: Options, elapsed: float) -> dict[str, object]:
        return {
            "seed": options.seed,
            "duration": options.duration,
            "elapsed": round(elapsed, 1),
            "buckets": options.buckets,
            "api_servers": options.api_servers,
            "registry": registry_kind(options),
            "concurrency": options.concurrency,
            "operations": nested(self.operations),
            "faults": dict(sorted(self.faults.items())),
            "fault_misses": dict(sorted(self.fault_misses.items())),
            "acknowledged": self.acknowledged,
            "unknown_outcomes": self.unknown_outcomes,
            "bytes_uploaded": self.bytes_uploaded,
            "files_verified": self.files_verified,
            "acknowledged_verified": self.acknowledged_verified,
            "backlog_fragments": self.backlog_fragments,
            "backlog_pending": self.backlog_pending,
            "settle_seconds": round(self.settle_seconds, 1),
            "orphans": self.orphans,
            "missing": self.missing,
            "tmp_files": self.tmp_files,
            "lost_files": self.lost_files,
            "damaged_after_repair": self.damaged_after_repair,
            "pending_on_lost": self.pending_on_lost,
            "internal_errors": self.internal_errors,
            "violations": self.violations,
        }


FAULT_KINDS = ("socket_kill", "client_kill", "bucket_kill", "api_kill", "bucket_loss", "bit_flip")


def registry_kind(options: Options) -> str:
    """``sqlite`` or ``postgresql`` (never a URL: it may hold a password)."""
    return "postgresql" if options.registry.startswith("postgres") else "sqlite"


def format_summary(stats: Stats, options: Options, elapsed: float) -> str:
    """The summary table printed at the end of a run."""
    lines = [
        f"chaos summary: seed {options.seed}, {options.duration:g} s of chaos "
        f"({elapsed:.0f} s in all), {options.api_servers} API server(s) on {registry_kind(options)},"
        f" {options.buckets} buckets, {options.concurrency} workers",
        "",
        *count_table(stats.operations, ("operation", "outcome"), (22, 28)),
    ]
    lines += ["", f"{'fault':<22}{'injected':>10}{'missed':>10}"]
    for kind in FAULT_KINDS:
        lines.append(f"{kind:<22}{stats.faults[kind]:>10}{stats.fault_misses[kind]:>10}")
    uploaded_mb = stats.bytes_uploaded / 1e6
    lines += [
        "",
        f"{'acknowledged uploads':<34}{stats.acknowledged:>8}",
        f"{'outcomes unknown':<34}{stats.unknown_outcomes:>8}",
        f"{'MB acknowledged':<34}{uploaded_mb:>8.1f}",
        f"{'files verified':<34}{stats.files_verified:>8}",
        f"{'  of them acknowledged':<34}{stats.acknowledged_verified:>8}",
        f"{'garbage fragments at the stop':<34}{stats.backlog_fragments:>8}",
        f"{'pending deletions at the stop':<34}{stats.backlog_pending:>8}",
        f"{'seconds to reconcile':<34}{stats.settle_seconds:>8.1f}",
        f"{'orphans found':<34}{stats.orphans:>8}",
        f"{'missing found':<34}{stats.missing:>8}",
        f"{'temporary files left':<34}{stats.tmp_files:>8}",
        f"{'acknowledged files lost':<34}{stats.lost_files:>8}",
        f"{'damaged after repair (scrub)':<34}{stats.damaged_after_repair:>8}",
        f"{'deletions left on lost buckets':<34}{stats.pending_on_lost:>8}",
        f"{'server internal errors':<34}{stats.internal_errors:>8}",
        f"{'violations':<34}{len(stats.violations):>8}",
    ]
    for v in stats.violations:
        lines.append(f"  VIOLATION: {v}")
    return "\n".join(lines)
