"""The rebalancer's plan on a big registry: its time, its peak memory, and how long it
keeps writers out (issue 14).

Builds (once, then reuses) a SQLite registry of N committed 6+2 files on 8 buckets with
scripts/scale_build.py, then, in a fresh process per run, plans the rebalance after 2
empty buckets join (the dry run's ``RegistryDB.rebalance_plan``) and reports: seconds,
moves and bytes planned, the process's peak RSS above what it had before planning
(``VmHWM`` reset first), and the longest wait of a writer committing one small
transaction every 10 ms on another thread meanwhile.

    python scripts/plan_bench.py --files 200000 --registry /tmp/plan-200k.sqlite3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from scale_build import Shape, bucket_ids, build_registry

from karma8.registry.db import RegistryDB

CAPACITY = 1 << 40


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _plan(url: str, seed: int) -> dict[str, object]:
    ids = bucket_ids(10, seed)
    live = dict.fromkeys(ids, CAPACITY)
    db = RegistryDB(url)
    stop = threading.Event()
    waits: list[float] = []

    def writer() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            with db.database.transaction() as tx:
                tx.execute(
                    "INSERT INTO leases (job, holder, epoch, expires) VALUES ('bench', 'x', 1, 0)"
                    " ON CONFLICT (job) DO UPDATE SET epoch = leases.epoch + 1"
                )
            waits.append(time.perf_counter() - started)
            stop.wait(0.01)

    _rss_reset()
    before = _kb("VmRSS")
    thread = threading.Thread(target=writer)
    thread.start()
    started = time.perf_counter()
    try:
        if hasattr(db, "rebalance_plan"):
            plan = db.rebalance_plan(live, 0.025, 8)
            moves, size, complete = plan.count, plan.bytes, plan.complete
        else:
            old = db.plan_moves(live, 0.025, 8)
            moves, size, complete = len(old), sum(m.size for m in old), None
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        thread.join()
    peak = _kb("VmHWM")
    db.close()
    return {
        "seconds": round(seconds, 2),
        "moves": moves,
        "bytes": size,
        "complete": complete,
        "rss_before_mb": round(before / 1024, 1),
        "peak_above_mb": round((peak - before) / 1024, 1),
        "writer_max_wait_s": round(max(waits, default=0.0), 3),
        "writer_commits": len(waits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--registry", type=Path, default=Path("/tmp/plan-bench.sqlite3"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    url = str(options.registry)
    if options.child:
        print(json.dumps(_plan(url, options.seed)))
        return
    if not options.registry.exists():
        built = build_registry(
            url, Shape(options.files), bucket_ids(10, options.seed)[:8], options.seed, None, print
        )
        print(f"built {built.files:,} files, {built.fragments:,} fragments in {built.seconds:.0f} s")
    for _ in range(options.runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--registry", url, "--seed", str(options.seed)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
