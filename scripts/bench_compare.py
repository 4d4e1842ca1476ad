"""karma8 against the Swift peer: one row per case and metric, the ratio and the issue's target.

The ratio is always karma8 / Swift. For MB/s and files/s higher is better (> 1: karma8
ahead); for CPU s/GiB, MB and the small-file latencies (p50, p99 in ms) lower is better
(< 1: karma8 cheaper or faster). The issues set no latency target: those rows say which way
the ratio reads instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bench_model import DOWN, MB, SizeRun, SmallRun, SystemRuns, Transfer, size_label

#: Issue 5: karma8 at least 1.5 x Swift's throughput and file rate, at most Swift's CPU per GiB.
FASTER = 1.5
CPU_AT_MOST = 1.0
#: Issue 5: absolute memory targets for karma8 (Swift's peaks are shown for reference).
API_RSS_TARGET = 100 * MB
BUCKET_RSS_TARGET = 64 * MB
#: A download with DOWN buckets holding data fragments down: at least half a healthy one's MB/s.
DEGRADED_AT_LEAST = 0.5
#: The target column of the latency rows: none set, lower is better.
LATENCY_READS = "none; < 1 faster"
#: Latency percentiles compared: percentile -> its name in the case column.
LATENCIES = {50: "p50", 99: "p99"}


@dataclass(frozen=True, slots=True)
class Comparison:
    """One line of the side-by-side table; values are medians over the repeats (peaks for RSS)."""

    case: str
    unit: str
    karma8: float | None
    karma8_range: tuple[float, float] | None
    swift: float | None
    swift_range: tuple[float, float] | None
    target: str
    met: bool | None

    @property
    def ratio(self) -> float | None:
        return None if self.karma8 is None or not self.swift else self.karma8 / self.swift


def _spread(values: Sequence[float | None]) -> tuple[float | None, tuple[float, float] | None]:
    known = [v for v in values if v is not None]
    if not known or len(known) != len(values):
        return None, None
    return statistics.median(known), (min(known), max(known))


def _row(
    case: str,
    unit: str,
    ours: Sequence[Transfer],
    theirs: Sequence[Transfer],
    metric: Callable[[Transfer], float | None],
    higher_is_better: bool,
    targeted: bool = True,
) -> Comparison:
    k, k_range = _spread([metric(t) for t in ours])
    s, s_range = _spread([metric(t) for t in theirs])
    row = Comparison(case, unit, k, k_range, s, s_range, "", None)
    ratio = row.ratio
    met: bool | None
    if not targeted:
        target, met = LATENCY_READS, None
    elif higher_is_better:
        target, met = f">= {FASTER:.2f} x", None if ratio is None else ratio >= FASTER
    else:
        target, met = f"<= {CPU_AT_MOST:.2f} x", None if ratio is None else ratio <= CPU_AT_MOST
    return Comparison(case, unit, k, k_range, s, s_range, target, met)


def _latency_rows(ours: SystemRuns, theirs: SystemRuns) -> Iterator[Comparison]:
    """p50 and p99 of each small-file upload and download, in ms: lower is better, no target."""
    for x, y in zip(ours.small, theirs.small, strict=True):
        label = f"{size_label(x.size)} (c={x.concurrency})"
        for op, mine, peer in (("upload", x.upload, y.upload), ("download", x.download, y.download)):
            for p, name in LATENCIES.items():

                def metric(t: Transfer, p: float = p) -> float | None:
                    return t.latency_ms(p)

                yield _row(f"{label} {op} {name}", "ms", mine, peer, metric, False, targeted=False)


def _cases(ours: SystemRuns, theirs: SystemRuns) -> Iterator[tuple[str, str, list[Transfer], list[Transfer]]]:
    """(case, unit, karma8's transfers, Swift's) for every direction of every case both ran
    (the degraded download where either measured it).
    """
    for a, b in zip(ours.runs, theirs.runs, strict=True):
        label = size_label(a.size)
        yield f"{label} upload", "MB/s", a.upload, b.upload
        yield f"{label} download", "MB/s", a.download, b.download
        if a.degraded or b.degraded:
            yield f"{label} download ({DOWN} down)", "MB/s", a.degraded, b.degraded
    for x, y in zip(ours.small, theirs.small, strict=True):
        label = f"{size_label(x.size)} (c={x.concurrency})"
        yield f"{label} uploads", "files/s", x.upload, y.upload
        yield f"{label} downloads", "files/s", x.download, y.download


def transfers(run: SizeRun | SmallRun) -> list[Transfer]:
    """Every transfer of a case: uploads, downloads, degraded downloads."""
    return [*run.upload, *run.download, *(run.degraded if isinstance(run, SizeRun) else ())]


def _peak(runs: Sequence[SizeRun | SmallRun], role: str) -> float | None:
    peaks = [r for run in runs for t in transfers(run) if (r := t.peak_rss[role]) is not None]
    return max(peaks) / MB if peaks else None


def degraded_ratio(run: SizeRun) -> float | None:
    """Median MB/s of the degraded downloads / of the healthy ones (None: not measured)."""
    if not run.degraded or not run.download:
        return None
    return statistics.median(t.mb_per_s for t in run.degraded) / statistics.median(
        t.mb_per_s for t in run.download
    )


def _degraded_rows(ours: SystemRuns, theirs: SystemRuns) -> Iterator[Comparison]:
    for a, b in zip(ours.runs, theirs.runs, strict=True):
        if a.degraded or b.degraded:
            k, s = degraded_ratio(a), degraded_ratio(b)
            met = None if k is None else k >= DEGRADED_AT_LEAST
            target = f"karma8 >= {DEGRADED_AT_LEAST:.2f} x"
            yield Comparison(f"{size_label(a.size)} degraded / healthy", "x", k, None, s, None, target, met)


def _memory_row(case: str, ours: float | None, theirs: float | None, limit: int) -> Comparison:
    met = None if ours is None else ours <= limit / MB
    return Comparison(case, "MB", ours, None, theirs, None, f"karma8 <= {limit // MB} MB", met)


def compare(ours: SystemRuns, theirs: SystemRuns) -> list[Comparison]:
    cases = list(_cases(ours, theirs))
    rows = [
        _row(case, unit, k, s, (lambda t: t.mb_per_s) if unit == "MB/s" else (lambda t: t.files_per_s), True)
        for case, unit, k, s in cases
    ]
    rows += _latency_rows(ours, theirs)
    rows += _degraded_rows(ours, theirs)
    rows += [
        _row(f"{case} CPU", "s/GiB", k, s, lambda t: t.server_cpu_per_gib(), False) for case, _, k, s in cases
    ]
    ours_all: list[SizeRun | SmallRun] = [*ours.runs, *ours.small]
    theirs_all: list[SizeRun | SmallRun] = [*theirs.runs, *theirs.small]
    rows += [
        _memory_row(
            "peak RSS API / proxy", _peak(ours_all, "api"), _peak(theirs_all, "proxy"), API_RSS_TARGET
        ),
        _memory_row(
            "peak RSS bucket / object server",
            _peak(ours_all, "buckets"),
            _peak(theirs_all, "objects"),
            BUCKET_RSS_TARGET,
        ),
    ]
    return rows


# -- the table -------------------------------------------------------------------------

LINE = "{:<32} {:<7} {:>24} {:>24} {:>8}  {:<17} {}"


def _value(value: float | None, spread: tuple[float, float] | None) -> str:
    if value is None:
        return "n/a"
    fmt = "{:.1f}" if abs(value) >= 10 else "{:.2f}"
    if spread is None or spread[0] == spread[1]:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(spread[0])}-{fmt.format(spread[1])}]"


def format_comparison(
    rows: Sequence[Comparison], repeat: int, ours: SystemRuns, theirs: SystemRuns
) -> list[str]:
    heading = LINE.format("case", "unit", ours.label, theirs.label, "k8/Swift", "target (issue 5)", "met")
    lines = [
        f"{ours.label} vs {theirs.label}: median [min-max] over {repeat} repeat(s), alternating; "
        "CPU = servers only (client excluded), s per GiB moved",
    ]
    if any(row.unit == "ms" for row in rows):
        lines.append(
            "p50, p99 = percentiles of the wall time of each single small-file upload or download (ms): "
            "lower is better, so k8/Swift < 1 means karma8 answered faster"
        )
    if any(row.unit == "x" for row in rows):
        lines.append(
            f"({DOWN} down) = {ours.name}: {ours.down or 'not measured'}, {theirs.name}: "
            f"{theirs.down or 'not measured'}, each holding a data fragment of the file, killed for "
            "the download"
        )
    lines += [heading, "-" * len(heading)]
    for row in rows:
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.2f}"
        met = "n/a" if row.met is None else "yes" if row.met else "NO"
        lines.append(
            LINE.format(
                row.case,
                row.unit,
                _value(row.karma8, row.karma8_range),
                _value(row.swift, row.swift_range),
                ratio,
                row.target,
                met,
            ).rstrip()
        )
    return lines
