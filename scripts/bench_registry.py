"""Registry write throughput on SQLite: group commit against one commit per transaction.

Each run makes a fresh registry (WAL, synchronous=FULL, on this machine's disk) and has
``--threads`` threads (the API's registry threads) record uploads as the API does: place
(one transaction) and commit (another), ``--uploads`` in all. The two settings alternate
``--repeat`` times; the table shows medians and the ratio, measured in the same run.

Usage::

    python scripts/bench_registry.py                       # 8 threads, 2000 uploads, 3 repeats
    python scripts/bench_registry.py --threads 1 2 8 --uploads 4000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from karma8.core.coding import Scheme
from karma8.registry.database import GROUP_MAX, SQLite
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow

SCHEME = Scheme.of(6, 2)
LIVE = [BucketSpace(f"bucket-{i}", 1 << 40, 1 << 40) for i in range(8)]
SIZES = [11 * 1024] * SCHEME.width
CHECKSUMS = {p: "cd" * 32 for p in range(SCHEME.width)}


def one_run(root: Path, group: int, threads: int, uploads: int) -> float:
    """Seconds to place and commit ``uploads`` uploads from ``threads`` threads."""
    path = root / f"registry-{group}-{threads}-{time.monotonic_ns()}.sqlite3"
    db = RegistryDB(SQLite(path, group=group))
    per_thread = uploads // threads
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            for n in range(per_thread):
                upload = UploadRow.new(
                    f"{t:08x}{n:024x}", f"bench/{t}/{n}", 64 * 1024, SCHEME, 11 * 1024, 1.0
                )
                db.place_upload(upload, SIZES, LIVE)
                db.commit_upload(
                    upload.upload_id, "ab" * 32, {p: "cd" * 32 for p in range(SCHEME.width)}, 2.0
                )
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    took = time.perf_counter() - started
    db.close()
    if errors:
        raise errors[0]
    return took


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[8], help="writer threads [8]")
    p.add_argument("--uploads", type=int, default=2000, help="uploads per run [2000]")
    p.add_argument("--repeat", type=int, default=3, help="runs of each setting, alternating [3]")
    p.add_argument("--dir", type=Path, default=None, help="where the registries go [a temporary directory]")
    a = p.parse_args(argv)
    settings = {"one commit each": 1, f"group commit (<= {GROUP_MAX})": GROUP_MAX}
    print(f"{a.uploads} uploads (place + commit: 2 transactions each), SQLite WAL synchronous=FULL")
    print(f"{'threads':>7}  {'setting':<24}{'uploads/s':>12}{'ms per tx':>11}{'ratio':>8}")
    with tempfile.TemporaryDirectory(prefix="karma8-bench-registry-", dir=a.dir) as tmp:
        for threads in a.threads:
            times: dict[str, list[float]] = {name: [] for name in settings}
            for _ in range(a.repeat):
                for name, group in settings.items():
                    times[name].append(one_run(Path(tmp), group, threads, a.uploads))
            base = statistics.median(times["one commit each"])
            for name, runs in times.items():
                took = statistics.median(runs)
                done = a.uploads // threads * threads
                print(
                    f"{threads:>7}  {name:<24}{done / took:>12.0f}{took / (2 * done) * 1000:>11.3f}"
                    f"{base / took:>7.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
