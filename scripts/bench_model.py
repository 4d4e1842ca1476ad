"""Values shared by the benchmark modules: options, measured transfers, errors, progress notes."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from karma8.config import GiB, MiB

MB = 1_000_000
POLL = 0.1
ROLES = ("api", "buckets", "client")


class BenchError(Exception):
    """A correctness or stack failure: the run is not valid."""


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...]
    repeat: int
    api: str | None
    data: Path | None
    keep: bool
    json_path: Path | None


def size_label(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


@dataclass(frozen=True, slots=True)
class Transfer:
    """One measured transfer. CPU is in seconds, RSS in bytes; None: process not found."""

    size: int
    seconds: float
    cpu: dict[str, float | None]
    rss_before: dict[str, int | None]
    peak_rss: dict[str, int | None]
    rss_after: dict[str, int | None]

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / MB

    def cpu_per_gib(self, role: str) -> float | None:
        cpu = self.cpu[role]
        return None if cpu is None else cpu / (self.size / GiB)


@dataclass(slots=True)
class SizeRun:
    size: int
    sha256: str
    disk_copy_seconds: list[float] = field(default_factory=list)
    upload: list[Transfer] = field(default_factory=list)
    download: list[Transfer] = field(default_factory=list)

    def disk_mb_per_s(self) -> float:
        return statistics.median(self.size / s / MB for s in self.disk_copy_seconds)
