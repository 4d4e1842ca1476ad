"""The benchmark report: the plain-text table, the memory summary and the JSON dump."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_model import MB, ROLES, Options, SizeRun, Transfer, size_label
from bench_procs import Watched

API_RSS_TARGET = 150 * MB  # issue 2


@dataclass(slots=True)
class Results:
    command: str
    facts: dict[str, str]
    stack: str
    watched: Watched
    idle_api_rss: int | None = None
    runs: list[SizeRun] = field(default_factory=list)
    lifetime_hwm: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0


# -- the report ------------------------------------------------------------------------


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _mb(value: int | None) -> str:
    return _num(None if value is None else value / MB, "{:.1f}")


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def _peak(transfers: Sequence[Transfer], role: str) -> int | None:
    return max((r for t in transfers if (r := t.peak_rss[role]) is not None), default=None)


def _server_cpu(t: Transfer) -> float | None:
    api, buckets = t.cpu_per_gib("api"), t.cpu_per_gib("buckets")
    return None if api is None or buckets is None else api + buckets


LEFT = "{:<8} {:<9} {:>22} {:>6}"
CPU = "{:>7} {:>7} {:>7} {:>7}"
RSS = "{:>7} {:>7} {:>7}"


def _row(left: Sequence[str], cpu: Sequence[str], rss: Sequence[str]) -> str:
    return f"{LEFT.format(*left)} | {CPU.format(*cpu)} | {RSS.format(*rss)}".rstrip()


def _rate(rates: Sequence[float]) -> str:
    return f"{statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}]"


def _transfer_row(run: SizeRun, op: str, transfers: Sequence[Transfer]) -> str:
    rates = [t.mb_per_s for t in transfers]
    ratio = statistics.median(rates) / run.disk_mb_per_s()
    cpu = [_median([t.cpu_per_gib(role) for t in transfers]) for role in ROLES]
    cpu.append(_median([_server_cpu(t) for t in transfers]))
    rss = [_mb(_peak(transfers, role)) for role in ROLES]
    return _row([size_label(run.size), op, _rate(rates), f"{ratio:.2f}"], [_num(c) for c in cpu], rss)


def _disk_row(run: SizeRun) -> str:
    rates = [run.size / s / MB for s in run.disk_copy_seconds]
    return _row([size_label(run.size), "disk copy", _rate(rates), "1.00"], [""] * 4, [""] * 3)


def format_table(results: Results) -> list[str]:
    cpu_width, rss_width = len(CPU.format(*[""] * 4)), len(RSS.format(*[""] * 3))
    groups = f"{'CPU s per GiB moved':^{cpu_width}} | {'peak RSS (MB)':^{rss_width}}"
    heading = _row(
        ["size", "op", "MB/s median [min-max]", "x disk"],
        ["api", "buckets", "client", "server"],
        ["api", "bucket", "client"],
    )
    lines = [(" " * len(LEFT.format(*[""] * 4)) + " | " + groups).rstrip(), heading, "-" * len(heading)]
    for run in results.runs:
        lines += [
            _disk_row(run),
            _transfer_row(run, "upload", run.upload),
            _transfer_row(run, "download", run.download),
        ]
    return lines


def _run_peak(run: SizeRun, role: str) -> int | None:
    return _peak([*run.upload, *run.download], role)


def _extremes(results: Results) -> tuple[SizeRun, SizeRun]:
    by_size = sorted(results.runs, key=lambda run: run.size)
    return by_size[0], by_size[-1]


def _growth(results: Results, role: str) -> str:
    """Peak RSS at the largest size vs the smallest: ``large / small MB, ratio r``."""
    smallest, largest = _extremes(results)
    small, large = _run_peak(smallest, role), _run_peak(largest, role)
    ratio = None if not small or large is None else large / small
    return f"{_mb(large)} / {_mb(small)} MB, ratio {_num(ratio)} (flat = 1.00)"


def _api_steps(results: Results) -> Iterator[str]:
    """Where the API's RSS grows: during a transfer, and what it keeps afterwards."""
    for run in results.runs:
        for up, down in zip(run.upload, run.download, strict=True):
            for op, t in (("upload", up), ("download", down)):
                path = " > ".join(
                    _mb(v) for v in (t.rss_before["api"], t.peak_rss["api"], t.rss_after["api"])
                )
                yield f"  {size_label(run.size):<8} {op:<9} {path}"


def format_memory(results: Results) -> list[str]:
    smallest, largest = _extremes(results)
    sizes = f"{size_label(largest.size)} / {size_label(smallest.size)}"
    peaks = [p for run in results.runs if (p := _run_peak(run, "api")) is not None]
    under = "n/a" if not peaks else ("yes" if max(peaks) < API_RSS_TARGET else "NO")
    highest = f" (highest {max(peaks) / MB:.1f} MB)" if peaks else ""
    hwm = results.lifetime_hwm
    return [
        f"API RSS idle before transfers   : {_mb(results.idle_api_rss)} MB (memory baseline)",
        f"API peak RSS {sizes:<19}: {_growth(results, 'api')}",
        f"bucket peak RSS {sizes:<16}: {_growth(results, 'buckets')}",
        f"API peak under {API_RSS_TARGET // MB} MB (issue 2)  : {under}{highest}",
        f"VmHWM at end (process lifetime) : api {_mb(hwm.get('api'))} MB, buckets max "
        f"{_mb(hwm.get('buckets'))} MB, client {_mb(hwm.get('client'))} MB",
        "API RSS per transfer, in run order (MB): before > peak > after",
        *_api_steps(results),
    ]


def format_report(results: Results, options: Options) -> str:
    facts = results.facts
    w = results.watched
    lines = [
        "karma8 benchmark",
        f"command : {results.command}",
        f"date    : {facts['date']}",
        f"machine : {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} RAM, Linux {facts['kernel']}, "
        f"load average at start {facts['loadavg']}",
        f"python  : {facts['python']}; karma8 {facts['karma8']}",
        f"stack   : {results.stack}; api pid {w.api or 'not found'}, {len(w.buckets)} bucket processes",
        f"run     : sizes {', '.join(map(size_label, options.sizes))}; {options.repeat} round trip(s) each; "
        f"took {results.seconds:.0f} s; load average at end {facts['loadavg_end']}",
        "",
        "MB = 10^6 bytes. x disk = karma8 MB/s / plain disk copy MB/s (read + write + fsync, 1 MiB blocks).",
        "CPU s per GiB = (utime + stime) during the transfer / GiB moved; buckets summed;",
        "  server = api + buckets (client excluded).",
        "peak RSS = max of VmRSS sampled every 50 ms and VmHWM reset before each transfer;",
        "  bucket = the largest bucket process.",
        "",
        *format_table(results),
        "",
        *format_memory(results),
    ]
    return "\n".join(lines)


def write_json(path: Path, results: Results, options: Options) -> None:
    data = {
        "command": results.command,
        "facts": results.facts,
        "stack": results.stack,
        "options": {**asdict(options), "data": str(options.data), "json_path": str(options.json_path)},
        "pids": asdict(results.watched),
        "idle_api_rss": results.idle_api_rss,
        "lifetime_hwm": results.lifetime_hwm,
        "seconds": results.seconds,
        "runs": [
            {
                **asdict(run),
                "disk_mb_per_s": run.disk_mb_per_s(),
                "upload_mb_per_s": [t.mb_per_s for t in run.upload],
                "download_mb_per_s": [t.mb_per_s for t in run.download],
            }
            for run in results.runs
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
