"""The balance benchmark's corpus, its per-phase report, and the simulation mode.

The simulation runs the real placement and rebalancing code (karma8.core.placement,
karma8.core.balance and the registry's SQL, on an in-memory SQLite registry) with no
processes and no data: an upload is placed and committed at once, a move is recorded
and finished at once. What it cannot show (throttling, crashes, downloads during moves)
the real-stack mode and the integration tests do.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from karma8.core import balance
from karma8.core.layout import Layout
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Targets of the issue: fill % max/min across buckets, and bytes moved / minimum.
MAX_SPREAD = 1.10
MAX_MOVED_RATIO = 1.3


@dataclass(frozen=True, slots=True)
class Corpus:
    """Seeded file sizes, log-uniform between ``low`` and ``high`` bytes."""

    seed: int
    files: int
    low: int
    high: int

    def sizes(self) -> list[int]:
        rng = random.Random(self.seed)
        lo, hi = math.log(self.low), math.log(self.high)
        return [round(math.exp(rng.uniform(lo, hi))) for _ in range(self.files)]


@dataclass(frozen=True, slots=True)
class Phase:
    """Bytes per bucket after one phase of the benchmark."""

    name: str
    used: dict[str, int]
    capacity: dict[str, int]
    moved: int = 0
    minimum: int = 0

    def fills(self) -> list[float]:
        return [self.used[b] / self.capacity[b] for b in sorted(self.used)]

    @property
    def spread(self) -> float:
        """max/min of fill % across the buckets (inf when one is empty)."""
        fills = self.fills()
        return math.inf if min(fills) == 0 else max(fills) / min(fills)

    @property
    def max_mean(self) -> float:
        fills = self.fills()
        return max(fills) / (sum(fills) / len(fills))

    @property
    def min_mean(self) -> float:
        fills = self.fills()
        return min(fills) / (sum(fills) / len(fills))

    @property
    def moved_ratio(self) -> float | None:
        """Bytes moved / the minimum perfect balance required (None: nothing to move)."""
        return self.moved / self.minimum if self.minimum else None


@dataclass
class Report:
    """Every phase of one run, in order."""

    phases: list[Phase] = field(default_factory=list)

    def failures(self) -> list[str]:
        """Targets missed: spread after the rebalance and after the second corpus, bytes moved."""
        out = []
        for phase in self.phases[2:]:
            if phase.spread > MAX_SPREAD:
                out.append(f"{phase.name}: fill max/min {phase.spread:.3f} > {MAX_SPREAD}")
        rebalance = self.phases[2] if len(self.phases) > 2 else None
        if rebalance is not None and (rebalance.moved_ratio or 0) > MAX_MOVED_RATIO:
            out.append(f"moved {rebalance.moved_ratio:.3f} x the minimum > {MAX_MOVED_RATIO}")
        return out


def format_phase(phase: Phase) -> list[str]:
    """A table of one phase: per-bucket bytes and fill, then the ratios."""
    lines = [f"== {phase.name}", f"  {'bucket':<14}{'MiB':>10}{'fill %':>9}"]
    for bucket in sorted(phase.used):
        used, cap = phase.used[bucket], phase.capacity[bucket]
        lines.append(f"  {bucket[:12]:<14}{used / MiB:>10.1f}{100 * used / cap:>9.2f}")
    spread = "inf" if math.isinf(phase.spread) else f"{phase.spread:.3f}"
    lines.append(f"  max/mean {phase.max_mean:.3f}   min/mean {phase.min_mean:.3f}   max/min {spread}")
    if phase.minimum or phase.moved:
        ratio = "n/a" if phase.moved_ratio is None else f"{phase.moved_ratio:.3f}"
        lines.append(
            f"  moved {phase.moved / MiB:.1f} MiB, minimum {phase.minimum / MiB:.1f} MiB,"
            f" moved/minimum {ratio}"
        )
    return lines


# -- simulation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimOptions:
    files: int = 300
    low: int = KiB
    high: int = 32 * MiB
    initial: int = 6
    added: int = 2
    capacity: int = 4 * GiB
    new_capacity: int = 4 * GiB
    parts: int = 6
    stripe_unit: int = MiB
    tolerance: float = 0.025


class Simulation:
    """A registry with buckets, uploads placed and committed at once, moves done at once."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.db = RegistryDB(Path(":memory:"))
        self.capacity: dict[str, int] = {}

    def add_buckets(self, count: int, capacity: int) -> None:
        start = len(self.capacity)
        for i in range(start, start + count):
            self.capacity[f"bucket-{i + 1:02d}"] = capacity

    def used(self) -> dict[str, int]:
        placed = self.db.placed()
        return {b: placed.get(b, (0, 0))[0] for b in self.capacity}

    def upload(self, corpus: Corpus) -> None:
        o = self.options
        for i, size in enumerate(corpus.sizes()):
            layout = Layout.for_size(size, o.parts, o.stripe_unit)
            sizes = [layout.part_size(p) for p in range(o.parts)]
            used = self.used()
            live = [BucketSpace(b, cap, cap - used[b]) for b, cap in self.capacity.items()]
            upload_id = uuid.UUID(int=random.Random(f"{corpus.seed}/{i}").getrandbits(128)).hex
            row = UploadRow(upload_id, f"c{corpus.seed}/{i}", size, o.parts, layout.unit, "in_progress")
            self.db.place_upload(row, sizes, live)
            self.db.commit_upload(upload_id, "0" * 64, {p: "0" * 64 for p in range(o.parts)}, now=0.0)

    def rebalance(self) -> tuple[int, int]:
        """Run the rebalancer to the end; (bytes moved, minimum it had to move)."""
        minimum = balance.minimum_to_move(self.db.fills(self.capacity), self.options.parts)
        moved = 0
        while (
            move := self.db.start_move(self.capacity, self.options.tolerance, self.options.parts)
        ) is not None:
            assert self.db.finish_move(move)
            moved += move.size
        for stale in self.db.pending_stale():
            self.db.stale_deleted(stale.bucket_id, stale.upload_id, [stale.part])
        return moved, minimum

    def phase(self, name: str, moved: int = 0, minimum: int = 0) -> Phase:
        return Phase(name, self.used(), dict(self.capacity), moved, minimum)


def simulate(seed: int, options: SimOptions) -> Report:
    """The benchmark's four phases in simulation."""
    sim = Simulation(options)
    report = Report()
    sim.add_buckets(options.initial, options.capacity)
    sim.upload(Corpus(seed, options.files, options.low, options.high))
    report.phases.append(sim.phase("first corpus"))
    sim.add_buckets(options.added, options.new_capacity)
    report.phases.append(sim.phase(f"{options.added} buckets added"))
    moved, minimum = sim.rebalance()
    report.phases.append(sim.phase("rebalanced", moved, minimum))
    sim.upload(Corpus(seed + 1_000_003, options.files, options.low, options.high))
    report.phases.append(sim.phase("second corpus"))
    return report


def summary(reports: Mapping[int, Report]) -> list[str]:
    """One line per seed and the worst case over all of them."""
    lines = [f"{'seed':>6}{'rebalanced max/min':>20}{'second max/min':>16}{'moved/min':>11}"]
    for seed, r in reports.items():
        lines.append(
            f"{seed:>6}{r.phases[2].spread:>20.3f}{r.phases[3].spread:>16.3f}"
            f"{r.phases[2].moved_ratio or 0:>11.3f}"
        )
    worst: Sequence[Report] = list(reports.values())
    lines.append(
        f"{'worst':>6}{max(r.phases[2].spread for r in worst):>20.3f}"
        f"{max(r.phases[3].spread for r in worst):>16.3f}"
        f"{max(r.phases[2].moved_ratio or 0 for r in worst):>11.3f}"
    )
    return lines
