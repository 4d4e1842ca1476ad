"""Benchmark karma8 with millions of files in its registry (issue 14).

For each size (``--baseline``, then ``--files``) it builds a registry of that many
committed files through karma8's own registry code (scripts/scale_build.py: bulk
inserts, realistic names and sizes, 6+2 fragment rows on 8 buckets, the ledger and the
stored-files counter exact), starts a stack on it (one API server and 8 buckets as plain
processes, scripts/chaos_stack.py) and measures, each ``--repeat`` times (median):

- a 1,000-name prefix listing (one page), the first page of a full listing, a delimiter
  listing of the top level, stat of one name, the download of a small file, each one
  request on its own WebSocket connection as a client makes it; a connection alone
  (opened and closed); the API's own time of the download (its duration histogram);
  the registry's own lookup and page, in this process (what the database costs without
  the server);
- walking the full listing with ``karma8 ls -r`` as a subprocess (``--slow-repeat``
  times): names/s, the API's and the client's peak RSS;
- API start: spawn to ready file, on the full registry (the API restarted);
- the rebalancer's plan (``/rebalance?dry_run=1``) after 2 empty buckets joined: time
  and the API's peak RSS (``--slow-repeat`` times; a plan not done after
  ``--plan-timeout`` seconds is given up and shown as ">= " the timeout, the API restarted);
- one reconciliation pass against bucket 0, which holds one fragment of every file (N
  fragments; the issue's "N/8" counts one bucket's share of N files with one fragment
  each): time and the API's peak RSS.

The fragment data of the bulk files does not exist, except for bucket 0, which holds an
empty file for each of its fragments (what a listing needs). So that the missing data
raises no repair storm, the stack runs with reconciliation, repair and the rebalancer
held off: their job leases are held by a fake server (``scale.py``) in the registry, and
``reconcile_interval``, ``repair_after``, ``repair_interval`` are huge and
``rebalance_auto`` is off. For the reconciliation pass the other buckets are stopped
first (only bucket 0 is live), then the lease is let go: the API takes it and
reconciles bucket 0, the pass timed from the API's log ("holding the lease" to
"reconciled"). A few small files are uploaded through the client after start for the
downloads (their fragments are real).

``--skip`` leaves out the walk, the plan or the reconciliation pass (and with it bucket
0's fragment files, which the build would otherwise write, one empty file per file).

It prints one table, the run at ``--files`` beside the run at ``--baseline`` with the
ratio, and the targets of issue 14 (which are for 10M files). Exit status 0 when every
run completed (targets are informational), 1 otherwise.

Usage::

    python scripts/scale.py --files 1000000 --baseline 10000
    python scripts/scale.py --files 100000 --registry postgresql --json scale.json
    python scripts/scale.py --files 1000000 --data /var/tmp/scale --keep   # a kept registry is reused

Run it alone on the machine (``flock /tmp/karma8-bench.lock python scripts/scale.py ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from bench_model import note
from chaos_model import ChaosError
from scale_build import Shape, bucket_ids, build_registry, write_bucket_dirs
from scale_run import Result, ScaleError, run_size
from throwaway_pg import throwaway_postgres

from karma8 import __version__
from karma8.errors import Karma8Error

# (key, label, unit, target at 10M files as issue 14 states it)
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("build_s", "registry build", "s", ""),
    ("build_files_per_s", "registry build rate", "files/s", ""),
    ("bytes_per_file", "registry bytes per file", "B", ""),
    ("api_start_s", "API start (spawn to ready)", "s", "< 5 s"),
    ("api_rss_mb", "API RSS after start", "MB", ""),
    ("prefix_ms", "prefix listing, 1,000 names", "ms", "< 50 ms"),
    ("first_page_ms", "first page of full listing", "ms", "< 50 ms"),
    ("delimiter_ms", "top level with delimiter /", "ms", "< 50 ms"),
    ("stat_ms", "stat of one name", "ms", ""),
    ("stat_session_ms", "stat of one name, in a session", "ms", "< 5 ms"),
    ("download_ms", "download of a small file", "ms", "< 5 ms (lookup)"),
    ("connect_ms", "connection alone (open, close)", "ms", ""),
    ("download_api_ms", "download: API's own time", "ms", ""),
    ("db_lookup_ms", "registry lookup, in process", "ms", ""),
    ("db_page_ms", "registry page of 1,000, in process", "ms", ""),
    ("walk_s", "ls -r to the end", "s", ""),
    ("walk_names_per_s", "ls -r names/s", "names/s", "flat"),
    ("walk_api_rss_mb", "ls -r: API peak RSS", "MB", "<= 100 MB"),
    ("walk_client_rss_mb", "ls -r: client peak RSS", "MB", "<= 100 MB"),
    ("plan_s", "rebalance plan (2 joined)", "s", ""),
    ("plan_api_rss_mb", "rebalance plan: API peak RSS", "MB", "<= 100 MB"),
    ("reconcile_s", "reconciliation pass (bucket 0)", "s", ""),
    ("reconcile_api_rss_mb", "reconciliation: API peak RSS", "MB", "<= 100 MB"),
)


@dataclass(frozen=True, slots=True)
class Options:
    files: int
    baseline: int
    repeat: int
    slow_repeat: int
    registry: str
    data: Path | None
    keep: bool
    json: Path | None
    seed: int
    log_level: str
    plan_timeout: float
    skip: frozenset[str]


#: What ``--skip`` can leave out.
SKIPPABLE = ("walk", "plan", "reconcile")


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000, help="files in the registry [1000000]")
    parser.add_argument(
        "--baseline", type=int, default=10_000, help="files of the baseline run; 0: none [10000]"
    )
    parser.add_argument("--repeat", type=int, default=5, help="samples of each measurement [5]")
    parser.add_argument(
        "--slow-repeat", type=int, default=3, help="samples of the full walk and of the plan [3]"
    )
    parser.add_argument(
        "--plan-timeout", type=float, default=120.0, help="give the rebalancer's plan up after this [120 s]"
    )
    parser.add_argument(
        "--registry",
        default="sqlite",
        help="sqlite, postgresql (a throwaway PostgreSQL, tests/pg.py) or a postgresql:// URL of an"
        " empty database [sqlite]",
    )
    parser.add_argument("--data", type=Path, help="where the registries and stacks live [a temporary dir]")
    parser.add_argument("--keep", action="store_true", help="keep the data (and reuse a kept registry)")
    parser.add_argument(
        "--skip",
        default="",
        help="leave out some of walk, plan, reconcile (comma-separated); without reconcile, bucket 0"
        " gets no fragment files either []",
    )
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--seed", type=int, default=1, help="names, sizes and ids are drawn from it [1]")
    parser.add_argument("--log-level", default="info", help="the stack's log level [info]")
    args = parser.parse_args(argv)
    if args.files < 1 or args.baseline < 0 or args.repeat < 1 or args.slow_repeat < 1:
        parser.error("--files, --repeat and --slow-repeat must be >= 1, --baseline >= 0")
    skip = frozenset(filter(None, args.skip.split(",")))
    if skip - set(SKIPPABLE):
        parser.error(f"--skip: one or more of {', '.join(SKIPPABLE)}")
    return Options(
        args.files,
        args.baseline,
        args.repeat,
        args.slow_repeat,
        args.registry,
        args.data,
        args.keep,
        args.json,
        args.seed,
        args.log_level,
        args.plan_timeout,
        skip,
    )


# -- registries ------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(options: Options) -> Iterator[Any]:
    """A throwaway PostgreSQL cluster with ``--registry postgresql`` (else None)."""
    if options.registry != "postgresql":
        yield None
        return
    with throwaway_postgres(note, ScaleError) as cluster:
        yield cluster


def registry_url(options: Options, cluster: Any, root: Path, files: int) -> str | None:
    """The registry of the run with ``files`` files (None: the API's default SQLite file)."""
    if options.registry == "sqlite":
        return None
    if cluster is not None:
        return str(cluster.create_database(f"karma8_scale_{files}"))
    return options.registry


def _marker(root: Path) -> Path:
    return root / "built.json"


def prepare(options: Options, root: Path, files: int, url: str | None) -> tuple[dict[str, Any], str]:
    """Build (or reuse, with ``--keep``) the registry of ``files`` files under ``root``.

    Returns:
        (what the build recorded, the registry URL the script opens).
    """
    db_url = url if url is not None else str(root / "api" / "registry.sqlite3")
    fragment_files = "reconcile" not in options.skip
    key = {
        "files": files,
        "seed": options.seed,
        "registry": options.registry,
        "with_fragment_files": fragment_files,
    }
    marker = _marker(root)
    if options.keep and url is None and marker.exists():
        built: dict[str, Any] = json.loads(marker.read_text())
        if {k: built.get(k) for k in key} == key:
            note(f"{files:,} files: reusing the registry kept in {root}")
            return built, db_url
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ids = bucket_ids(10, options.seed)
    write_bucket_dirs(root, ids)
    note(f"{files:,} files: building the registry ({db_url if url is None else options.registry})")
    holder = root / "bucket-0" if fragment_files else None
    b = build_registry(db_url, Shape(files), ids[:8], options.seed, holder, note)
    size = registry_bytes(db_url)
    built = {
        **key,
        "buckets": ids,
        "build_s": b.seconds,
        "check_s": b.check_seconds,
        "bytes": b.bytes,
        "fragments": b.fragments,
        "fragment_files": b.fragment_files,
        "fragment_files_s": b.fragment_files_seconds,
        "registry_bytes": size,
    }
    marker.write_text(json.dumps(built))
    note(
        f"{files:,} files: built in {b.seconds:.1f} s ({files / b.seconds:,.0f} files/s), ledger and"
        f" counter checked exact in {b.check_seconds:.1f} s, {b.fragment_files:,} empty fragment files"
        f" for bucket 0 in {b.fragment_files_seconds:.1f} s; registry {size / 1e6:,.1f} MB"
    )
    return built, db_url


def registry_bytes(url: str) -> int:
    """The registry's size on disk (SQLite: the file, after a checkpoint; PostgreSQL: the database)."""
    from karma8.registry.db import RegistryDB

    db = RegistryDB(url)
    try:
        with db.database.read() as tx:
            if db.database.name == "sqlite":
                tx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                pages = tx.execute("PRAGMA page_count").fetchone()[0]
                return int(pages) * int(tx.execute("PRAGMA page_size").fetchone()[0])
            return int(tx.execute("SELECT pg_database_size(current_database())").fetchone()[0])
    finally:
        db.close()


# -- the report ------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("files/s", "names/s", "B"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def format_table(results: list[Result]) -> str:
    """One row per measurement: each run's median (and range), the ratio last/first, the target."""
    head = ["measurement", "unit"] + [f"{r.files:,} files" for r in results]
    if len(results) > 1:
        head.append("ratio")
    head.append("target (10M)")
    lines = [head]
    for key, label, unit, target in ROWS:
        cells = [label, unit]
        medians = [r.median(key) for r in results]
        for r, m in zip(results, medians, strict=True):
            lo, hi = r.spread(key)
            cell = (">= " if key in r.unfinished else "") + _fmt(m, unit)
            if m is not None and len(r.samples.get(key, [])) > 1 and hi > lo:
                cell += f" [{_fmt(lo, unit)}-{_fmt(hi, unit)}]"
            cells.append(cell)
        if len(results) > 1:
            first, last = medians[0], medians[-1]
            cells.append(f"{last / first:.2f}x" if first and last is not None else "-")
        cells.append(target)
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for n, row in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> str:
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {cpus} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


async def main_async(options: Options, data: Path) -> list[Result]:
    sizes = [options.baseline, options.files] if options.baseline else [options.files]
    results = []
    with postgres(options) as cluster:
        for files in sizes:
            root = data / f"{files}"
            url = registry_url(options, cluster, root, files)
            built, db_url = await trio.to_thread.run_sync(prepare, options, root, files, url)
            result = await run_size(
                root,
                files,
                built,
                url,
                db_url,
                options.repeat,
                options.slow_repeat,
                options.plan_timeout,
                options.log_level,
                options.skip,
            )
            results.append(result)
            if not options.keep:
                await trio.to_thread.run_sync(shutil.rmtree, root, True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        if options.data is not None:
            data = options.data.resolve()
            data.mkdir(parents=True, exist_ok=True)
        elif options.keep:
            data = Path(tempfile.mkdtemp(prefix="karma8-scale-"))
        else:
            data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="karma8-scale-")))
        try:
            results = trio.run(main_async, options, data)
        except (ScaleError, ChaosError, Karma8Error) as exc:
            note(f"scale.py: {exc}")
            return 1
        if options.keep:
            note(f"data kept in {data}")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    registry = "SQLite" if options.registry == "sqlite" else "PostgreSQL"
    print(f"karma8 {__version__} scale benchmark, registry {registry}, {date}")
    print(machine())
    for r in results:
        print(r.summary())
    print()
    print(format_table(results))
    if options.json is not None:
        options.json.write_text(
            json.dumps(
                {
                    "options": _options_json(options),
                    "machine": machine(),
                    "date": date,
                    "runs": [r.as_dict() for r in results],
                },
                indent=1,
            )
        )
    return 0


def _options_json(options: Options) -> dict[str, object]:
    return {
        "files": options.files,
        "baseline": options.baseline,
        "repeat": options.repeat,
        "slow_repeat": options.slow_repeat,
        "registry": options.registry if options.registry in ("sqlite", "postgresql") else "url",
        "seed": options.seed,
        "plan_timeout": options.plan_timeout,
        "skip": sorted(options.skip),
    }


if __name__ == "__main__":
    sys.exit(main())
