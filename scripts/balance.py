"""Measure how evenly karma8 fills its buckets when buckets join, and what rebalancing costs.

By default it runs a real local stack (one ``karma8 api`` and ``--initial`` ``karma8
bucket`` processes of ``--capacity`` each, in a temporary directory or ``--workdir``),
uploads a seeded corpus of ``--files`` files with log-uniform sizes, adds ``--added``
buckets, lets placement and the automatic rebalancer work, then uploads a second corpus
(seed + 1000003) and downloads a sample to check it byte for byte. After each phase it
prints every bucket's bytes on disk and fill, max/mean, min/mean and max/min of the
fills, and after the rebalance the bytes moved divided by the minimum a perfect
rebalance moves (``karma8.core.balance.minimum_to_move`` of the fills just before it).

``--sim`` runs the same phases in simulation (the real placement, planner and registry
SQL in memory, no processes) for ``--seeds`` seeds from ``--seed`` on; ``--baseline``
adds what placement without the rebalancer gives.

Targets (issue 4): after the rebalance and after the second corpus, max/min of fill %
across all buckets <= 1.10; bytes moved <= 1.3 x the minimum. Exit status: 0 when every
target is met (and every sampled file came back intact), 1 otherwise, 2 when the run
could not complete. See docs/placement.md.

Usage::

    python scripts/balance.py                          # real stack, about 2 GB written
    python scripts/balance.py --sim --seeds 100 --baseline
    python scripts/balance.py --sim --added 6 --new-capacity 5GiB --json sim.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from balance_model import (
    BalanceError,
    Options,
    baseline_summary,
    baselines,
    format_phase,
    simulate,
    summary,
)
from balance_run import check_disk, note, run_phases
from balance_stack import open_stack
from bench import machine_facts

from karma8.config import parse_size


def _size(text: str) -> int:
    value = parse_size(text)
    if not isinstance(value, int) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive byte size: {text!r}")
    return value


def _bandwidth(text: str) -> int:
    return 0 if text == "0" else _size(text)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="balance.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    d = Options()
    p.add_argument("--sim", action="store_true", help="simulation mode (no processes)")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"--sim: seeds to run [{d.seeds}]")
    p.add_argument("--baseline", action="store_true", help="--sim: also run without the rebalancer")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the first corpus [{d.seed}]")
    p.add_argument("--files", type=int, default=d.files, help=f"files per corpus [{d.files}]")
    p.add_argument("--min-size", type=_size, default=d.low, help="smallest file [1KiB]")
    p.add_argument("--max-size", type=_size, default=d.high, help="largest file [32MiB]")
    p.add_argument("--initial", type=int, default=d.initial, help=f"buckets at the start [{d.initial}]")
    p.add_argument("--added", type=int, default=d.added, help=f"buckets added later [{d.added}]")
    p.add_argument("--capacity", type=_size, default=d.capacity, help="capacity of the first buckets [4GiB]")
    p.add_argument("--new-capacity", type=_size, default=None, help="capacity of the added ones [--capacity]")
    p.add_argument(
        "--threshold", type=float, default=d.threshold, help=f"the API's rebalance_threshold [{d.threshold}]"
    )
    p.add_argument(
        "--bandwidth", type=_bandwidth, default=d.bandwidth, help="the API's rebalance_bandwidth [32MiB]"
    )
    p.add_argument(
        "--delay", type=float, default=d.delay, help=f"the API's rebalance_delay in seconds [{d.delay:g}]"
    )
    p.add_argument(
        "--concurrency", type=int, default=d.concurrency, help=f"uploads at once [{d.concurrency}]"
    )
    p.add_argument("--verify", type=int, default=d.verify, help=f"files downloaded and compared [{d.verify}]")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds to wait for a phase to settle")
    p.add_argument("--workdir", type=Path, help="stack data and logs here [a temporary directory]")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", type=Path, dest="json_path", help="also write the numbers here")
    p.add_argument("--log-level", default=d.log_level, help=f"log level of the servers [{d.log_level}]")
    a = p.parse_args(argv)
    if a.files < 1 or a.seeds < 1 or a.initial < 6 or a.added < 1 or a.concurrency < 1:
        p.error("--files, --seeds, --added, --concurrency must be >= 1 and --initial >= 6")
    if a.min_size > a.max_size:
        p.error("--min-size is larger than --max-size")
    if not 0 < a.threshold <= 1:
        p.error("--threshold must be in (0, 1]")
    if a.delay < 0:
        p.error("--delay must be >= 0")
    return Options(
        seed=a.seed,
        files=a.files,
        low=a.min_size,
        high=a.max_size,
        initial=a.initial,
        added=a.added,
        capacity=a.capacity,
        new_capacity=a.new_capacity or a.capacity,
        threshold=a.threshold,
        bandwidth=a.bandwidth,
        delay=a.delay,
        concurrency=a.concurrency,
        verify=a.verify,
        timeout=a.timeout,
        workdir=a.workdir,
        keep=a.keep,
        json_path=a.json_path,
        log_level=a.log_level,
        sim=a.sim,
        seeds=a.seeds,
        baseline=a.baseline,
    )


def _options_json(options: Options) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}


def _write_json(options: Options, result: dict[str, Any]) -> None:
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2) + "\n")


# -- simulation ------------------------------------------------------------------------


def run_sim(options: Options) -> int:
    sim = options.sim_options()
    seeds = list(range(options.seed, options.seed + options.seeds))
    start = time.monotonic()
    reports = {seed: simulate(seed, sim) for seed in seeds}
    took = time.monotonic() - start
    print(f"simulation, seed {seeds[0]} (the real code of placement and rebalancing, no processes)")
    for phase in reports[seeds[0]].phases:
        print(*format_phase(phase), sep="\n")
    print(f"\n{len(seeds)} seeds in {took:.1f} s")
    print(*summary(reports), sep="\n")
    failures = {seed: r.failures() for seed, r in reports.items() if r.failures()}
    result: dict[str, Any] = {
        "mode": "sim",
        "options": _options_json(options),
        "seeds": {str(seed): r.as_dict() for seed, r in reports.items()},
        "worst": {
            "rebalanced_max_min": max(r.phases[2].spread for r in reports.values()),
            "second_max_min": max(r.phases[3].spread for r in reports.values()),
            "moved_ratio": max(r.phases[2].moved_ratio or 0 for r in reports.values()),
        },
        "failures": {str(seed): f for seed, f in failures.items()},
    }
    if options.baseline:
        base = baselines(seeds, sim)
        print()
        print(*baseline_summary(base, options.added), sep="\n")
        result["baseline"] = {
            label: {str(seed): p.as_dict() for seed, p in phases.items()} for label, phases in base.items()
        }
    for seed, missed in failures.items():
        print(f"seed {seed}: TARGET MISSED: " + "; ".join(missed))
    if not failures:
        print("targets met for every seed")
    _write_json(options, result)
    return 1 if failures else 0


# -- real stack ------------------------------------------------------------------------


async def run_stack(options: Options, root: Path) -> int:
    result: dict[str, Any] = {"mode": "stack", "options": _options_json(options), "machine": machine_facts()}
    if (root / "stack").exists():
        note(f"{root / 'stack'} exists (a previous run?): give an empty --workdir")
        return 2
    try:
        check_disk(options, root)
        work = root / "work"
        work.mkdir(parents=True, exist_ok=True)
        settings = {
            "rebalance_threshold": str(options.threshold),
            "rebalance_bandwidth": str(options.bandwidth),
            "rebalance_delay": str(options.delay),
        }
        start = time.monotonic()
        async with open_stack(root / "stack", settings, options.log_level) as stack:
            run = await run_phases(stack, options, work)
        logged = stack.logged_problems()
    except BalanceError as exc:
        note(f"the run could not complete: {exc}")
        result["error"] = str(exc)
        _write_json(options, result)
        return 2
    total = time.monotonic() - start
    failures = run.report.failures() + run.problems
    if run.verified < min(options.verify, 2 * options.files):
        failures.append(f"only {run.verified} of {options.verify} sampled files verified")
    print(f"\ntotal {total:.1f} s; {run.verified} sampled files byte-identical")
    if logged:
        note(f"the stack logged {len(logged)} warning(s)/error(s); the first ones:")
        for line in logged[:10]:
            note(f"  {line}")
    for failure in failures:
        print(f"TARGET MISSED: {failure}")
    if not failures:
        print("targets met")
    result.update(
        {
            **run.report.as_dict(),
            "buckets": run.ids,
            "rebalancer_runs": list(run.runs.values()),
            "verified": run.verified,
            "moved_files_verified": run.moved_files_verified,
            "logged_problems": logged,
            "seconds": total,
            "failures": failures,
        }
    )
    _write_json(options, result)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.sim:
        return run_sim(options)
    note("$ " + shlex.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]))
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        return trio.run(run_stack, options, options.workdir)
    root = Path(tempfile.mkdtemp(prefix="karma8-balance-"))
    try:
        return trio.run(run_stack, options, root)
    finally:
        if options.keep:
            note(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
