"""Chaos test of karma8: concurrent traffic while uploads, clients, buckets and API servers die.

It starts its own local stack (``--api-servers`` ``python -m karma8 api`` processes on one
registry, SQLite or PostgreSQL, and ``--buckets`` ``python -m karma8 bucket`` processes, in
``--data`` or a temporary directory) and for ``--duration``
seconds runs ``--concurrency`` workers that upload files of random sizes with known sha256
(names from a small pool, so versions replace each other), download them and check the
data, and delete some. Meanwhile it injects faults on schedules: uploads whose socket is
closed mid-stream, ``karma8 upload`` processes SIGKILLed mid-upload, buckets and the API
SIGKILLed and restarted, buckets lost for good (wiped and replaced by empty ones), bits
flipped in fragment files on disk. Every random choice follows from ``--seed``.

Then it stops the faults, makes sure every process is up, scrubs every file (which queues
damaged fragments for repair), waits for reconciliation and repair, and checks: every
acknowledged upload that was not replaced or deleted later downloads with its sha256 (0
acknowledged files lost); nothing that was never acknowledged is listed (an upload whose
outcome is unknown may be listed, with exactly its sha256); the fragment files on the
bucket disks are exactly the fragments of committed files, nothing is left to repair, a
second scrub finds nothing damaged, and no temporary file is left. It prints a summary table
and exits 1 on any violation, 0 otherwise (2 if the stack cannot start at all).
See docs/chaos.md.

Usage::

    python scripts/chaos.py --duration 60                    # a short run
    python scripts/chaos.py --duration 600 --seed 42 --keep  # the long run
    python scripts/chaos.py --api-servers 3 --registry postgresql   # several API servers
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio
from chaos_check import report, scrub, wait_reconciled
from chaos_faults import flip_bits, kill_api, kill_buckets, kill_clients, kill_sockets, lose_buckets
from chaos_model import (
    ChaosError,
    Interval,
    Ledger,
    Options,
    Stats,
    derive,
    format_summary,
    registry_kind,
    run_script,
)
from chaos_ops import Chaos, pool_names, verify_listing, worker
from chaos_stack import Stack
from chaos_store import RegistryView
from throwaway_pg import throwaway_postgres

from karma8.config import parse_size
from karma8.errors import Karma8Error

#: Operations still running this long after the chaos ended are cancelled (and reported).
STOP_GRACE = 120.0
PROGRESS_EVERY = 15.0


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="chaos.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of chaos [60]")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice [random, printed]")
    p.add_argument("--data", type=Path, default=None, help="data directory [a temporary one]")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--buckets", type=int, default=9, help="bucket processes [9: 8 for 6+2 while one is lost]")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent workers [8]")
    p.add_argument("--max-size", default="8MiB", help="largest upload [8MiB]; sizes are log-uniform from 0")
    p.add_argument("--names", type=int, default=24, help="size of the pool of file names [24]")
    p.add_argument("--bucket-kill-every", default="2:6", help="seconds between bucket kills [2:6]")
    p.add_argument("--bucket-downtime", default="0.5:3", help="seconds a killed bucket stays down [0.5:3]")
    p.add_argument("--api-servers", type=int, default=1, help="API servers sharing the registry [1]")
    p.add_argument(
        "--registry",
        default="sqlite",
        help="the registry: sqlite, postgresql (a throwaway cluster) or a postgresql:// URL"
        " of an empty database [sqlite]",
    )
    p.add_argument("--api-kill-every", default="3:8", help="seconds between API kills (any server) [3:8]")
    p.add_argument("--api-downtime", default="0.2:1.5", help="seconds the killed API stays down [0.2:1.5]")
    p.add_argument("--socket-kill-every", default="1:4", help="seconds between cut uploads [1:4]")
    p.add_argument("--client-kill-every", default="1:4", help="seconds between killed clients [1:4]")
    p.add_argument(
        "--bucket-loss-every",
        default="25:45",
        help="seconds between buckets lost for good [25:45]; off: none",
    )
    p.add_argument("--bit-flip-every", default="2:5", help="seconds between flipped bits [2:5]; off: none")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=90.0,
        help="give up reconciliation after this long without progress [90]",
    )
    p.add_argument("--log-level", default="info", help="log level of the servers [info]")
    p.add_argument("--json", type=Path, default=None, dest="json_path", help="also write the summary here")
    a = p.parse_args(argv)
    try:
        max_size = parse_size(a.max_size)
        if not isinstance(max_size, int) or max_size < 0:
            raise ValueError(a.max_size)
        if a.buckets < 6 or a.concurrency < 1 or a.names < 1 or a.duration <= 0 or a.api_servers < 1:
            raise ChaosError(
                "need --buckets >= 6, --api-servers >= 1, --concurrency >= 1, --names >= 1, --duration > 0"
            )
        if a.registry not in ("sqlite", "postgresql") and not a.registry.startswith("postgresql://"):
            raise ChaosError(f"--registry {a.registry!r}: use sqlite, postgresql or a postgresql:// URL")
        return Options(
            duration=a.duration,
            seed=a.seed if a.seed is not None else random.SystemRandom().randrange(2**32),
            data=a.data,
            keep=a.keep,
            buckets=a.buckets,
            concurrency=a.concurrency,
            max_size=max_size,
            names=a.names,
            bucket_kill_every=Interval.parse(a.bucket_kill_every),
            bucket_downtime=Interval.parse(a.bucket_downtime),
            api_kill_every=Interval.parse(a.api_kill_every),
            api_downtime=Interval.parse(a.api_downtime),
            socket_kill_every=Interval.parse(a.socket_kill_every),
            client_kill_every=Interval.parse(a.client_kill_every),
            bucket_loss_every=None if a.bucket_loss_every == "off" else Interval.parse(a.bucket_loss_every),
            bit_flip_every=None if a.bit_flip_every == "off" else Interval.parse(a.bit_flip_every),
            settle_timeout=a.settle_timeout,
            log_level=a.log_level,
            json_path=a.json_path,
            api_servers=a.api_servers,
            registry=a.registry,
        )
    except (ValueError, ChaosError) as exc:
        p.error(str(exc))


def note(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


async def progress(ctx: Chaos) -> None:
    started = trio.current_time()
    while True:
        await trio.sleep(PROGRESS_EVERY)
        s = ctx.stats
        faults = ", ".join(f"{k} {n}" for k, n in sorted(s.faults.items()))
        note(
            f"{trio.current_time() - started:.0f} s: {s.acknowledged} uploads acknowledged,"
            f" {s.operations['download', 'ok']} downloads verified; faults: {faults or 'none yet'};"
            f" {len(s.violations)} violation(s)"
        )


async def chaos_phase(ctx: Chaos) -> None:
    """Workers and fault injectors for ``--duration``; then let them finish."""
    master = random.Random(ctx.options.seed)
    worker_rngs = [derive(master) for _ in range(ctx.options.concurrency)]
    injectors = (kill_sockets, kill_clients, kill_buckets, kill_api, lose_buckets, flip_bits)
    fault_rngs = [derive(master) for _ in injectors]
    with trio.move_on_after(ctx.options.duration + STOP_GRACE) as scope:
        async with trio.open_nursery() as nursery:
            for i, rng in enumerate(worker_rngs):
                nursery.start_soon(worker, ctx, i, rng)
            for injector, rng in zip(injectors, fault_rngs, strict=True):
                nursery.start_soon(injector, ctx, rng)
            await trio.sleep(ctx.options.duration)
            note("stopping the faults; waiting for running operations")
            ctx.stopping.set()
    if scope.cancelled_caught:
        ctx.stats.violation(f"operations still running {STOP_GRACE:g} s after the end were cancelled (hang)")


@contextlib.contextmanager
def registry_url(options: Options) -> Iterator[str | None]:
    """The registry URL of the run's API servers (None: SQLite); with ``--registry
    postgresql``, a throwaway PostgreSQL cluster (tests/pg.py) runs meanwhile."""
    if options.registry == "sqlite":
        yield None
        return
    if options.registry != "postgresql":
        yield options.registry
        return
    with throwaway_postgres(note, ChaosError) as cluster:
        yield cluster.create_database("karma8")


async def run(options: Options, root: Path) -> Stats:
    """One chaos run in ``root``; the stats hold the violations."""
    with registry_url(options) as url:
        return await run_on(options, root, url)


async def run_on(options: Options, root: Path, url: str | None) -> Stats:
    """One chaos run in ``root`` on the registry at ``url`` (None: SQLite)."""
    stats = Stats()
    stack = Stack(root, options.buckets, options.log_level, options.api_servers, url)
    stack.on_crash = lambda message: stats.violation(f"crash: {message}")
    registry = RegistryView(stack.registry_url)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    note(f"seed {options.seed}; data in {root}; settings: {', '.join(stack.notes)}")
    try:
        await stack.start_all()
        note(
            f"stack up: API {', '.join(stack.urls())} on {registry_kind(options)}, {options.buckets} buckets;"
            f" {options.duration:g} s of chaos"
        )
        ctx = Chaos(options, stack, registry, Ledger(pool_names(options.names)), stats, work)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stack.watch)
                nursery.start_soon(progress, ctx)
                await chaos_phase(ctx)
                await stack.ensure_up()
                await stack.wait_live()
                found = await scrub(ctx, final=False)
                note(
                    f"every process is up; the scrub found {found} damaged fragment(s); waiting for"
                    " reconciliation and repair"
                )
                snapshot, disks, comparison, took = await wait_reconciled(ctx)
                if comparison.clean:
                    note(f"reconciled after {took:.1f} s")
                else:
                    note(f"NOT reconciled after {took:.1f} s: {comparison.brief()}")
                await report(ctx, snapshot, disks, comparison)
                await verify_listing(ctx)
                await scrub(ctx, final=True)
                nursery.cancel_scope.cancel()
        except* (ChaosError, Karma8Error) as group:
            for exc in group.exceptions:
                stats.violation(f"the run could not go on: {exc}")
    finally:
        await stack.aclose()
        registry.close()
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    failed = lambda stats: bool(stats.violations)  # noqa: E731
    return run_script(run, parse_args(argv), "karma8-chaos-", format_summary, failed, note)


if __name__ == "__main__":
    sys.exit(main())
