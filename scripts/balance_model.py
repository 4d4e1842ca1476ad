"""The balance benchmark's corpus, its per-phase report, and the simulation mode.

The simulation runs the real placement and rebalancing code (karma8.core.placement,
karma8.core.balance and the registry's SQL, on an in-memory SQLite registry) with no
processes and no data: an upload is placed and committed at once, a move is recorded
and finished at once. What it cannot show (throttling, crashes, downloads during moves)
the real-stack mode and the integration tests do.

Baselines (``--baseline``) run the same corpora without the rebalancer: with karma8's
fill-aware placement alone, and with the placement karma8 had before it (weighted
rendezvous hashing by free space, ``-free / ln(h)``), to show what each part contributes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from karma8.core import balance
from karma8.core.layout import Layout
from karma8.core.placement import unit_hash
from karma8.registry.db import BucketSpace, FragmentRow, RegistryDB, UploadRow

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Targets of the issue: fill % max/min across buckets, and bytes moved / minimum.
MAX_SPREAD = 1.10
MAX_MOVED_RATIO = 1.3
#: The second corpus's seed is derived from the first's.
SECOND_SEED_OFFSET = 1_000_003
#: Bytes generated at a time for a file of the corpus.
BLOCK = MiB

Placement = Literal["fill", "rendezvous"]


class BalanceError(Exception):
    """The run cannot go on (a process died, a deadline passed, a file came back wrong)."""


def second_seed(seed: int) -> int:
    return seed + SECOND_SEED_OFFSET


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

    def name(self, index: int) -> str:
        return f"balance/c{self.seed}/{index:04d}"

    def blocks(self, index: int, size: int) -> Iterator[bytes]:
        """The content of file ``index`` (``size`` bytes), in blocks: the same for the same seed."""
        for block, start in enumerate(range(0, size, BLOCK)):
            yield random.Random(f"{self.seed}/{index}/{block}").randbytes(min(BLOCK, size - start))


@dataclass(frozen=True, slots=True)
class Phase:
    """Bytes per bucket after one phase of the benchmark."""

    name: str
    used: dict[str, int]
    capacity: dict[str, int]
    moved: int = 0
    minimum: int = 0
    seconds: float | None = None
    parts: int = 6

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
    def target_spread(self) -> float:
        """max/min of used/target (targets capped at 1/parts of all bytes: what a rebalance evens)."""
        fills = [balance.Fill(b, self.used[b], self.capacity[b]) for b in sorted(self.used)]
        return balance.imbalance(fills, self.parts)

    @property
    def moved_ratio(self) -> float | None:
        """Bytes moved / the minimum perfect balance required (None: nothing to move)."""
        return self.moved / self.minimum if self.minimum else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "used": self.used,
            "capacity": self.capacity,
            "fill": {b: self.used[b] / self.capacity[b] for b in sorted(self.used)},
            "max_mean": self.max_mean,
            "min_mean": self.min_mean,
            "max_min": None if math.isinf(self.spread) else self.spread,
            "target_max_min": None if math.isinf(self.target_spread) else self.target_spread,
            "moved": self.moved,
            "minimum": self.minimum,
            "moved_ratio": self.moved_ratio,
            "seconds": self.seconds,
        }


@dataclass
class Report:
    """Every phase of one run, in order: first corpus, buckets added, rebalanced, second corpus."""

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

    def as_dict(self) -> dict[str, Any]:
        return {"phases": [p.as_dict() for p in self.phases], "failures": self.failures()}


def format_phase(phase: Phase, labels: Mapping[str, str] | None = None) -> list[str]:
    """A table of one phase: per-bucket bytes and fill, then the ratios.

    ``labels`` maps bucket keys to what the table shows (default: the keys).
    """
    took = "" if phase.seconds is None else f"  ({phase.seconds:.1f} s)"
    labels = labels or {}
    width = max(14, *(len(labels.get(b, b)) + 2 for b in phase.used))
    lines = [f"== {phase.name}{took}", f"  {'bucket':<{width}}{'MiB':>10}{'fill %':>9}"]
    for bucket in sorted(phase.used):
        used, cap = phase.used[bucket], phase.capacity[bucket]
        lines.append(f"  {labels.get(bucket, bucket):<{width}}{used / MiB:>10.1f}{100 * used / cap:>9.2f}")
    spread = "inf" if math.isinf(phase.spread) else f"{phase.spread:.3f}"
    lines.append(f"  max/mean {phase.max_mean:.3f}   min/mean {phase.min_mean:.3f}   max/min {spread}")
    if not math.isinf(phase.spread) and abs(phase.target_spread - phase.spread) > 1e-9:
        # Some bucket's capacity share exceeds 1/parts: its target is capped (docs/placement.md).
        lines.append(f"  used/target max/min {phase.target_spread:.3f} (targets capped at 1/parts)")
    if phase.minimum or phase.moved:
        ratio = "n/a" if phase.moved_ratio is None else f"{phase.moved_ratio:.3f}"
        lines.append(
            f"  moved {phase.moved / MiB:.1f} MiB, minimum {phase.minimum / MiB:.1f} MiB,"
            f" moved/minimum {ratio}"
        )
    return lines


def minimum_to_move(used: Mapping[str, int], capacity: Mapping[str, int], parts: int) -> int:
    """The bytes a perfect rebalance of ``used`` moves (karma8.core.balance.minimum_to_move)."""
    fills = [balance.Fill(b, used[b], capacity[b]) for b in sorted(used)]
    return balance.minimum_to_move(fills, parts)


@dataclass(frozen=True, slots=True)
class Setup:
    """The corpus and the buckets of a run (both modes)."""

    files: int = 300
    low: int = KiB
    high: int = 32 * MiB
    initial: int = 6
    added: int = 2
    capacity: int = 4 * GiB
    new_capacity: int = 4 * GiB


@dataclass(frozen=True, slots=True)
class Options(Setup):
    """What ``scripts/balance.py`` was asked to do (both modes)."""

    seed: int = 1
    #: The API's ``rebalance_threshold``; a rebalance evens the buckets to half of it.
    threshold: float = 0.05
    #: The API's ``rebalance_bandwidth`` in bytes per second (0: unlimited).
    bandwidth: int = 32 * MiB
    #: The API's ``rebalance_delay``: buckets that join within it are balanced by one run.
    delay: float = 5.0
    concurrency: int = 3
    verify: int = 24
    timeout: float = 120.0
    workdir: Path | None = None
    keep: bool = False
    json_path: Path | None = None
    log_level: str = "info"
    sim: bool = False
    seeds: int = 20
    baseline: bool = False

    def corpora(self) -> tuple[Corpus, Corpus]:
        return (
            Corpus(self.seed, self.files, self.low, self.high),
            Corpus(second_seed(self.seed), self.files, self.low, self.high),
        )

    def sim_options(self) -> SimOptions:
        setup = {f.name: getattr(self, f.name) for f in dataclasses.fields(Setup)}
        return SimOptions(**setup, tolerance=self.threshold / 2)


# -- simulation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimOptions(Setup):
    """A simulation: the run's set-up, and what the API server would be configured with."""

    parts: int = 6
    stripe_unit: int = MiB
    #: Where a rebalance stops: half of ``rebalance_threshold`` (0.05 by default).
    tolerance: float = 0.025
    placement: Placement = "fill"
    rebalance: bool = True


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
            upload_id = uuid.UUID(int=random.Random(f"{corpus.seed}/{i}").getrandbits(128)).hex
            row = UploadRow(upload_id, corpus.name(i), size, o.parts, layout.unit, "in_progress")
            if o.placement == "fill":
                live = [BucketSpace(b, cap, cap - used[b]) for b, cap in self.capacity.items()]
                self.db.place_upload(row, sizes, live)
            else:
                chosen = rendezvous(
                    upload_id, {b: cap - used[b] for b, cap in self.capacity.items()}, o.parts
                )
                frags = [FragmentRow(upload_id, p, b, sizes[p], None) for p, b in enumerate(chosen)]
                self.db.begin_upload(row, frags)
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
        return Phase(name, self.used(), dict(self.capacity), moved, minimum, parts=self.options.parts)


def rendezvous(upload_id: str, free: Mapping[str, int], parts: int) -> list[str]:
    """The placement karma8 had before issue 4: weighted rendezvous, score ``-free / ln(h)``."""
    ranked = sorted(free, key=lambda b: free[b] / -math.log(unit_hash(upload_id, b)), reverse=True)
    return ranked[:parts]


def simulate(seed: int, options: SimOptions) -> Report:
    """The benchmark's four phases in simulation (the third does nothing without rebalancing)."""
    sim = Simulation(options)
    report = Report()
    sim.add_buckets(options.initial, options.capacity)
    sim.upload(Corpus(seed, options.files, options.low, options.high))
    report.phases.append(sim.phase("first corpus"))
    sim.add_buckets(options.added, options.new_capacity)
    report.phases.append(sim.phase(f"{options.added} buckets added"))
    if options.rebalance:
        moved, minimum = sim.rebalance()
        report.phases.append(sim.phase("rebalanced", moved, minimum))
    else:
        minimum = balance.minimum_to_move(sim.db.fills(sim.capacity), options.parts)
        report.phases.append(sim.phase("not rebalanced", 0, minimum))
    sim.upload(Corpus(second_seed(seed), options.files, options.low, options.high))
    report.phases.append(sim.phase("second corpus"))
    return report


#: The baselines: (label, options changed), each without the rebalancer.
BASELINES: tuple[tuple[str, Placement], ...] = (
    ("fill-aware placement, no rebalancer", "fill"),
    ("rendezvous (weighted by free space), no rebalancer", "rendezvous"),
)


def baselines(seeds: list[int], options: SimOptions) -> dict[str, dict[int, Phase]]:
    """The second corpus's phase of every seed under each baseline."""
    out: dict[str, dict[int, Phase]] = {}
    for label, placement in BASELINES:
        variant = replace(options, placement=placement, rebalance=False)
        out[label] = {seed: simulate(seed, variant).phases[3] for seed in seeds}
    return out


def summary(reports: Mapping[int, Report]) -> list[str]:
    """One line per seed and the worst case over all of them."""
    lines = [f"{'seed':>6}{'rebalanced max/min':>20}{'second max/min':>16}{'moved/min':>11}"]
    for seed, r in reports.items():
        lines.append(
            f"{seed:>6}{r.phases[2].spread:>20.3f}{r.phases[3].spread:>16.3f}"
            f"{r.phases[2].moved_ratio or 0:>11.3f}"
        )
    runs = list(reports.values())
    for label, pick in (("median", statistics.median), ("worst", max)):
        lines.append(
            f"{label:>6}{pick(r.phases[2].spread for r in runs):>20.3f}"
            f"{pick(r.phases[3].spread for r in runs):>16.3f}"
            f"{pick(r.phases[2].moved_ratio or 0 for r in runs):>11.3f}"
        )
    return lines


def baseline_summary(results: Mapping[str, Mapping[int, Phase]], added: int) -> list[str]:
    """Per baseline, after the second corpus: the worst max/min, and the newest bucket's fill."""
    lines = [f"{'after the second corpus':<52}{'max/min worst':>14}{'newest/mean':>13}"]
    for label, phases in results.items():
        worst = max(p.spread for p in phases.values())
        newest = [_newest_over_mean(p, added) for p in phases.values()]
        lines.append(f"{label:<52}{worst:>14.3f}{min(newest):>8.3f}-{max(newest):.3f}")
    return lines


def _newest_over_mean(phase: Phase, added: int) -> float:
    """The fill of the emptiest added bucket over the mean fill."""
    fills = phase.fills()
    return min(fills[-added:]) / (sum(fills) / len(fills)) if added else 1.0
