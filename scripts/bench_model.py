"""Values shared by the benchmark modules: options, measured transfers, errors, progress notes."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from karma8.config import GiB, KiB, MiB

MB = 1_000_000
POLL = 0.1
CLIENT = "client"
#: The processes measured, by role: the servers, then the client (this process, never compared).
KARMA8_ROLES = ("api", "buckets", CLIENT)
SWIFT_ROLES = ("proxy", "objects", "others", CLIENT)
#: Processes killed for the degraded download: as many as the erasure code's parity covers.
DOWN = 2


class BenchError(Exception):
    """A correctness or stack failure: the run is not valid."""


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Policy:
    """One storage layout on both systems: karma8's parts + parity, Swift's storage policy.

    karma8 runs as many buckets as a file has fragments; Swift's peer runs its 8 object
    servers whatever the policy.
    """

    name: str
    parts: int
    parity: int

    @property
    def buckets(self) -> int:
        return self.parts + self.parity

    @property
    def scheme(self) -> str:
        return f"{self.parts}+{self.parity}"


#: ``--policy``: Swift's policy names, and karma8's scheme that stores a file the same way.
POLICIES = {"ec62": Policy("ec62", 6, 2), "rep1": Policy("rep1", 6, 0)}
DEFAULT_POLICY = "ec62"


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...]
    repeat: int
    api: str | None
    data: Path | None
    keep: bool
    json_path: Path | None
    #: The small-file case: this many files of small_size, run once at each of concurrencies
    #: (transfers at a time), in that order (0 files: no case).
    small_files: int = 200
    small_size: int = 64 * KiB
    concurrencies: tuple[int, ...] = (1, 8)
    #: Also run every case against the Swift peer started by this script.
    vs_swift: bool = False
    swift_peer: Path | None = None
    #: The layout of both systems: the local stack's buckets and scheme, Swift's container policy.
    policy: Policy = POLICIES[DEFAULT_POLICY]


def size_label(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


@dataclass(frozen=True, slots=True)
class Source:
    """A file to upload and what its copies must hash to (md5 only where Swift needs it)."""

    path: Path
    size: int
    sha256: str
    md5: str | None = None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of ``values``, linear between the closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Transfer:
    """One measured transfer of ``count`` files, ``size`` bytes in all.

    CPU is in seconds, RSS in bytes, by role; None: process not found. ``latencies``: the
    wall time of each single operation (small files: each upload or download), in seconds.
    """

    size: int
    seconds: float
    cpu: dict[str, float | None]
    rss_before: dict[str, int | None]
    peak_rss: dict[str, int | None]
    rss_after: dict[str, int | None]
    count: int = 1
    latencies: tuple[float, ...] = ()

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / MB

    @property
    def files_per_s(self) -> float:
        return self.count / self.seconds

    def latency_ms(self, p: float) -> float | None:
        """The ``p``-th percentile of the single operations' wall times, in ms (None: not timed)."""
        value = percentile(self.latencies, p)
        return None if value is None else value * 1000

    def cpu_per_gib(self, role: str) -> float | None:
        cpu = self.cpu[role]
        return None if cpu is None else cpu / (self.size / GiB)

    def server_cpu_per_gib(self) -> float | None:
        """All the servers' CPU (every role but the client) per GiB moved."""
        per_role = [self.cpu_per_gib(role) for role in self.cpu if role != CLIENT]
        known = [c for c in per_role if c is not None]
        return sum(known) if known and len(known) == len(per_role) else None


@dataclass(slots=True)
class SizeRun:
    """Round trips of one big file."""

    size: int
    sha256: str
    disk_copy_seconds: list[float] = field(default_factory=list)
    upload: list[Transfer] = field(default_factory=list)
    download: list[Transfer] = field(default_factory=list)
    #: Downloads with DOWN processes holding data fragments killed (none: not measured).
    degraded: list[Transfer] = field(default_factory=list)

    def disk_mb_per_s(self) -> float | None:
        return (
            statistics.median(self.size / s / MB for s in self.disk_copy_seconds)
            if self.disk_copy_seconds
            else None
        )


@dataclass(slots=True)
class SmallRun:
    """Rounds of ``files`` small files of ``size`` bytes, ``concurrency`` transfers at a time."""

    files: int
    size: int
    concurrency: int
    upload: list[Transfer] = field(default_factory=list)
    download: list[Transfer] = field(default_factory=list)

    def label(self) -> str:
        return f"{self.files} x {size_label(self.size)} c={self.concurrency}"


@dataclass(slots=True)
class SystemRuns:
    """Everything measured on one system (karma8 or the Swift peer)."""

    name: str
    roles: tuple[str, ...]
    pids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: The storage layout measured: ``6+2`` (karma8's scheme), ``ec62`` (Swift's policy).
    scheme: str = ""
    #: What the degraded download had down (``2 buckets``); empty: not measured, for ``no_degraded``.
    down: str = ""
    no_degraded: str = ""
    runs: list[SizeRun] = field(default_factory=list)
    small: list[SmallRun] = field(default_factory=list)
    lifetime_hwm: dict[str, int | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``karma8 6+2``, ``Swift ec62``: the name with the layout measured."""
        return f"{self.name} {self.scheme}".strip()
