"""The benchmark report: the plain-text tables, the memory summary and the JSON dump."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_compare import (
    API_RSS_TARGET,
    BUCKET_RSS_TARGET,
    DEGRADED_AT_LEAST,
    LATENCIES,
    compare,
    degraded_ratio,
    format_comparison,
    transfers,
)
from bench_model import CLIENT, KARMA8_ROLES, MB, Options, SizeRun, SmallRun, SystemRuns, Transfer, size_label
from bench_procs import Watched


@dataclass(slots=True)
class Results:
    command: str
    facts: dict[str, str]
    stack: str
    watched: Watched
    idle_api_rss: int | None = None
    karma8: SystemRuns = field(default_factory=lambda: SystemRuns("karma8", KARMA8_ROLES))
    swift: SystemRuns | None = None
    swift_peer: str = ""
    seconds: float = 0.0


# -- the tables ------------------------------------------------------------------------


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _mb(value: int | None) -> str:
    return _num(None if value is None else value / MB, "{:.1f}")


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def _peak(transfers: Sequence[Transfer], role: str) -> int | None:
    return max((r for t in transfers if (r := t.peak_rss[role]) is not None), default=None)


#: RSS columns name one process: the largest of the group.
SINGULAR = {"buckets": "bucket", "objects": "object", "others": "other"}
LEFT = "{:<17} {:<12} {:>22} {:<7} {:>6}"
COLUMN = "{:>7}"


def _columns(values: Sequence[str]) -> str:
    return " ".join(COLUMN.format(v) for v in values)


def _row(left: Sequence[str], cpu: Sequence[str], rss: Sequence[str]) -> str:
    return f"{LEFT.format(*left)} | {_columns(cpu)} | {_columns(rss)}".rstrip()


def _rate(rates: Sequence[float]) -> str:
    return f"{statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}]"


def _measures(roles: Sequence[str], transfers: Sequence[Transfer]) -> tuple[list[str], list[str]]:
    cpu = [_median([t.cpu_per_gib(role) for t in transfers]) for role in roles]
    cpu.append(_median([t.server_cpu_per_gib() for t in transfers]))
    return [_num(c) for c in cpu], [_mb(_peak(transfers, role)) for role in roles]


def _size_rows(roles: Sequence[str], run: SizeRun) -> Iterator[str]:
    label, disk = size_label(run.size), run.disk_mb_per_s()
    if run.disk_copy_seconds:
        rates = [run.size / s / MB for s in run.disk_copy_seconds]
        yield _row(
            [label, "disk copy", _rate(rates), "MB/s", "1.00"], [""] * (len(roles) + 1), [""] * len(roles)
        )
    for op, done in (("upload", run.upload), ("download", run.download), ("degraded", run.degraded)):
        if not done:
            continue
        rates = [t.mb_per_s for t in done]
        ratio = "" if disk is None else f"{statistics.median(rates) / disk:.2f}"
        yield _row([label, op, _rate(rates), "MB/s", ratio], *_measures(roles, done))


def _small_rows(roles: Sequence[str], run: SmallRun) -> Iterator[str]:
    for op, done in (("upload", run.upload), ("download", run.download)):
        rates = [t.files_per_s for t in done]
        yield _row([run.label(), op, _rate(rates), "files/s", ""], *_measures(roles, done))
        for p, name in LATENCIES.items():
            ms = [v for t in done if (v := t.latency_ms(p)) is not None]
            if ms:
                blank = [""] * len(roles)
                yield _row([run.label(), f"{op} {name}", _rate(ms), "ms", ""], [*blank, ""], blank)


def format_table(system: SystemRuns) -> list[str]:
    roles = system.roles
    cpu_width = len(_columns([""] * (len(roles) + 1)))
    rss_width = len(_columns([""] * len(roles)))
    groups = f"{'CPU s per GiB moved':^{cpu_width}} | {'peak RSS (MB)':^{rss_width}}"
    heading = _row(
        ["case", "op", "median [min-max]", "unit", "x disk"],
        [*roles, "server"],
        [SINGULAR.get(role, role) for role in roles],
    )
    degraded = f" (degraded = download with {system.down} down)" if system.down else ""
    lines = [
        system.label + degraded,
        (" " * len(LEFT.format(*[""] * 5)) + " | " + groups).rstrip(),
        heading,
        "-" * len(heading),
    ]
    for run in system.runs:
        lines += _size_rows(roles, run)
    for small in system.small:
        lines += _small_rows(roles, small)
    return lines


# -- memory ----------------------------------------------------------------------------


def _run_peak(run: SizeRun, role: str) -> int | None:
    return _peak(transfers(run), role)


def _extremes(results: Results) -> tuple[SizeRun, SizeRun]:
    by_size = sorted(results.karma8.runs, key=lambda run: run.size)
    return by_size[0], by_size[-1]


def _growth(results: Results, role: str) -> str:
    """Peak RSS at the largest size vs the smallest: ``large / small MB, ratio r``."""
    smallest, largest = _extremes(results)
    small, large = _run_peak(smallest, role), _run_peak(largest, role)
    ratio = None if not small or large is None else large / small
    return f"{_mb(large)} / {_mb(small)} MB, ratio {_num(ratio)} (flat = 1.00)"


def _api_steps(results: Results) -> Iterator[str]:
    """Where the API's RSS grows: during a transfer, and what it keeps afterwards."""
    cases: list[tuple[str, SizeRun | SmallRun]] = [(size_label(r.size), r) for r in results.karma8.runs]
    cases += [(r.label(), r) for r in results.karma8.small]
    for label, run in cases:
        degraded = run.degraded if isinstance(run, SizeRun) else []
        for i, (up, down) in enumerate(zip(run.upload, run.download, strict=True)):
            steps = [("upload", up), ("download", down), *(("degraded", t) for t in degraded[i : i + 1])]
            for op, t in steps:
                path = " > ".join(
                    _mb(v) for v in (t.rss_before["api"], t.peak_rss["api"], t.rss_after["api"])
                )
                yield f"  {label:<17} {op:<9} {path}"


def _under(results: Results, role: str, limit: int) -> str:
    runs: list[SizeRun | SmallRun] = [*results.karma8.runs, *results.karma8.small]
    peaks = [p for run in runs if (p := _peak(transfers(run), role)) is not None]
    if not peaks:
        return "n/a"
    return f"{'yes' if max(peaks) <= limit else 'NO'} (highest {max(peaks) / MB:.1f} MB)"


def format_memory(results: Results) -> list[str]:
    smallest, largest = _extremes(results)
    sizes = f"{size_label(largest.size)} / {size_label(smallest.size)}"
    hwm = results.karma8.lifetime_hwm
    return [
        f"API RSS idle before transfers   : {_mb(results.idle_api_rss)} MB (memory baseline)",
        f"API peak RSS {sizes:<19}: {_growth(results, 'api')}",
        f"bucket peak RSS {sizes:<16}: {_growth(results, 'buckets')}",
        f"API peak <= {API_RSS_TARGET // MB} MB (issue 5)     : {_under(results, 'api', API_RSS_TARGET)}",
        f"bucket peak <= {BUCKET_RSS_TARGET // MB} MB (issue 5)   : "
        f"{_under(results, 'buckets', BUCKET_RSS_TARGET)}",
        f"VmHWM at end (process lifetime) : api {_mb(hwm.get('api'))} MB, buckets max "
        f"{_mb(hwm.get('buckets'))} MB, client {_mb(hwm.get(CLIENT))} MB",
        "API RSS per transfer, in run order (MB): before > peak > after",
        *_api_steps(results),
    ]


# -- degraded downloads ----------------------------------------------------------------


def _degraded_lines(system: SystemRuns) -> Iterator[str]:
    for run in system.runs:
        if not run.degraded:
            continue
        healthy = [t.mb_per_s for t in run.download]
        rates = [t.mb_per_s for t in run.degraded]
        ratio = degraded_ratio(run)
        met = "n/a" if ratio is None else "yes" if ratio >= DEGRADED_AT_LEAST else "NO"
        yield (
            f"  {system.label:<12} {size_label(run.size):<8} healthy {_rate(healthy)} MB/s, "
            f"download ({system.down} down) {_rate(rates)} MB/s = {_num(ratio)} x healthy "
            f"(target >= {DEGRADED_AT_LEAST:.2f} x: {met})"
        )


def format_degraded(systems: Sequence[SystemRuns]) -> list[str]:
    """Each big size's degraded download against its healthy one, or why it was not measured."""
    lines = [
        "Degraded downloads: processes holding data fragments of the file killed (SIGKILL) before",
        "  the download, back after it; median [min-max] MB/s",
    ]
    for system in systems:
        if system.no_degraded:
            lines.append(f"  {system.label:<12} not measured: {system.no_degraded}")
        lines += _degraded_lines(system)
    return lines


# -- the report ------------------------------------------------------------------------


def _cases(options: Options) -> str:
    levels = " and ".join(map(str, options.concurrencies))
    small = (
        f"; {options.small_files} x {size_label(options.small_size)} at concurrency {levels}"
        if options.small_files
        else ""
    )
    return f"sizes {', '.join(map(size_label, options.sizes))}{small}"


def format_report(results: Results, options: Options) -> str:
    facts = results.facts
    w = results.watched
    peer = [f"swift   : {results.swift_peer}"] if results.swift is not None else []
    systems = [results.karma8, *([results.swift] if results.swift is not None else [])]
    lines = [
        "karma8 benchmark: " + " vs ".join(system.label for system in systems),
        f"command : {results.command}",
        f"date    : {facts['date']}",
        f"machine : {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} RAM, Linux {facts['kernel']}, "
        f"load average at start {facts['loadavg']}",
        f"python  : {facts['python']}; karma8 {facts['karma8']}",
        f"changes : uncommitted in the tree measured: {facts.get('uncommitted', '?')}",
        f"stack   : {results.stack}; api pid {w.api or 'not found'}, {len(w.buckets)} bucket processes",
        *peer,
        f"run     : {_cases(options)}; {options.repeat} round trip(s) each; "
        f"took {results.seconds:.0f} s; load average at end {facts['loadavg_end']}",
        "",
        "MB = 10^6 bytes. x disk = MB/s / plain disk copy MB/s (read + write + fsync, 1 MiB blocks).",
        "CPU s per GiB = (utime + stime) during the transfer / GiB moved, each group of processes summed;",
        "  server = every server process (client excluded); client = this process.",
        "peak RSS = max of VmRSS sampled every 50 ms and VmHWM reset before each transfer;",
        "  the largest process of each group (bucket, object server, other = account/container/memcached).",
        "c=N: N small-file transfers at a time. p50, p99 = percentiles of the wall time of each single",
        "  upload or download in one repeat, in ms (lower is better), median [min-max] over the repeats.",
        "",
        *format_table(results.karma8),
    ]
    if results.swift is not None:
        lines += ["", *format_table(results.swift)]
        rows = compare(results.karma8, results.swift)
        lines += ["", *format_comparison(rows, options.repeat, results.karma8, results.swift)]
    lines += ["", *format_degraded(systems)]
    lines += ["", *format_memory(results)]
    return "\n".join(lines)


def _runs_json(system: SystemRuns) -> dict[str, object]:
    return {
        "name": system.name,
        "scheme": system.scheme,
        "down": system.down,
        "no_degraded": system.no_degraded,
        "pids": system.pids,
        "lifetime_hwm": system.lifetime_hwm,
        "runs": [
            {
                **asdict(run),
                "disk_mb_per_s": run.disk_mb_per_s(),
                "upload_mb_per_s": [t.mb_per_s for t in run.upload],
                "download_mb_per_s": [t.mb_per_s for t in run.download],
                "degraded_mb_per_s": [t.mb_per_s for t in run.degraded],
                "degraded_ratio": degraded_ratio(run),
                "upload_server_cpu_per_gib": [t.server_cpu_per_gib() for t in run.upload],
                "download_server_cpu_per_gib": [t.server_cpu_per_gib() for t in run.download],
                "degraded_server_cpu_per_gib": [t.server_cpu_per_gib() for t in run.degraded],
            }
            for run in system.runs
        ],
        "small": [
            {
                **asdict(run),
                "upload_files_per_s": [t.files_per_s for t in run.upload],
                "download_files_per_s": [t.files_per_s for t in run.download],
                **{
                    f"{op}_latency_{name}_ms": [t.latency_ms(p) for t in done]
                    for op, done in (("upload", run.upload), ("download", run.download))
                    for p, name in LATENCIES.items()
                },
                "upload_server_cpu_per_gib": [t.server_cpu_per_gib() for t in run.upload],
                "download_server_cpu_per_gib": [t.server_cpu_per_gib() for t in run.download],
            }
            for run in system.small
        ],
    }


def write_json(path: Path, results: Results, options: Options) -> None:
    karma8 = _runs_json(results.karma8)
    data: dict[str, object] = {
        "command": results.command,
        "facts": results.facts,
        "stack": results.stack,
        "options": {
            **asdict(options),
            "data": str(options.data),
            "json_path": str(options.json_path),
            "swift_peer": str(options.swift_peer),
        },
        "pids": asdict(results.watched),
        "idle_api_rss": results.idle_api_rss,
        "lifetime_hwm": results.karma8.lifetime_hwm,
        "seconds": results.seconds,
        "runs": karma8["runs"],
        "small": karma8["small"],
        "karma8": {k: karma8[k] for k in ("scheme", "down", "no_degraded")},
    }
    if results.swift is not None:
        data["swift_peer"] = results.swift_peer
        data["swift"] = _runs_json(results.swift)
        data["comparison"] = [
            {**asdict(row), "ratio": row.ratio} for row in compare(results.karma8, results.swift)
        ]
    path.write_text(json.dumps(data, indent=2) + "\n")
