"""Fuzzer of karma8's network edges: hostile WebSocket sessions against the API server, or raw
bytes against the gRPC, membership and metrics ports, on a local stack it starts itself.

It starts one ``python -m karma8 api`` and ``--buckets`` ``python -m karma8 bucket``
processes (loopback only, in ``--data`` or a temporary directory), with a small
``max_frame`` and short timeouts so that oversized frames and abandoned connections are
cheap. Then it runs ``--sessions`` sessions (``--connections`` in raw mode), a few at a
time, for at most ``--time-limit`` seconds. Each session draws every choice from its own
generator, a function of ``--seed`` and its index, so ``--replay INDEX`` runs it again
alone. Processes that die are reported and restarted; suspects are replayed alone to
find the one that does it.

After the run it checks: every process alive and serving (a round trip through the
client library, /healthz on every metrics port); no ``internal`` error ever sent; no
``Traceback`` in any log; file descriptors back to their baseline; nothing stored that
the fuzzer did not upload whole; no temporary file, orphan or unfinished upload left. It
prints a summary and exits 1 on any finding, 0 otherwise (2 if the stack cannot start).
See docs/fuzzing.md.

Usage::

    python scripts/fuzz.py --seed 1 --sessions 2000           # WebSocket sessions
    python scripts/fuzz.py --raw --seed 1 --connections 2000   # raw bytes to the other ports
    python scripts/fuzz.py --seed 1 --replay 517               # one session again, alone
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import trio
from chaos_model import run_script
from chaos_stack import Stack
from fuzz_check import check_client, measure_baseline, serving
from fuzz_model import FuzzError, Limits, Options, Player, Stats, format_summary, note
from fuzz_raw import RawPlayer
from fuzz_run import Run
from fuzz_ws import WsPlayer

from karma8.config import parse_size


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="fuzz.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--mode", choices=("ws", "raw"), default="ws", help="WebSocket sessions or raw bytes [ws]")
    p.add_argument("--raw", action="store_const", const="raw", dest="mode", help="same as --mode raw")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice [random, printed]")
    p.add_argument("--sessions", type=int, default=3000, help="WebSocket sessions to run [3000]")
    p.add_argument("--connections", type=int, default=3000, help="raw-mode connections to run [3000]")
    p.add_argument("--time-limit", type=float, default=120.0, help="stop starting sessions after S s [120]")
    p.add_argument("--concurrency", type=int, default=6, help="sessions sending at once [6]")
    p.add_argument("--replay", default="", help="run only these session indices (1,5,9), one at a time")
    p.add_argument("--data", type=Path, default=None, help="data directory [a temporary one]")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--buckets", type=int, default=6, help="bucket processes [6]")
    p.add_argument("--max-frame", default="64KiB", help="the API's max_frame [64KiB]")
    p.add_argument("--max-file-size", default="1MiB", help="the API's max_file_size [1MiB]")
    p.add_argument("--idle-timeout", type=float, default=2.0, help="the API's idle_timeout [2]")
    p.add_argument("--handshake-timeout", type=float, default=2.0, help="the API's handshake_timeout [2]")
    p.add_argument("--max-crashes", type=int, default=3, help="stop early after this many crashes [3]")
    p.add_argument(
        "--triage-time", type=float, default=180.0, help="replaying suspects alone takes at most S s [180]"
    )
    p.add_argument("--check-timeout", type=float, default=60.0, help="deadline of each end check [60]")
    p.add_argument("--log-level", default="warning", help="log level of the servers [warning]")
    p.add_argument("--json", type=Path, default=None, dest="json_path", help="also write the summary here")
    a = p.parse_args(argv)
    try:
        replay = tuple(int(i) for i in a.replay.split(",") if i.strip())
        max_frame, max_file_size = parse_size(a.max_frame), parse_size(a.max_file_size)
        if not isinstance(max_frame, int) or not isinstance(max_file_size, int):
            raise ValueError("sizes must be integers")
        if a.buckets < 6 or a.concurrency < 1 or min(a.sessions, a.connections) < 0 or a.time_limit <= 0:
            raise ValueError("need --buckets >= 6, --concurrency >= 1, counts >= 0, --time-limit > 0")
        if min(max_frame, max_file_size) < 1024:
            raise ValueError("--max-frame and --max-file-size must be at least 1 KiB")
    except ValueError as exc:
        p.error(str(exc))
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(Options) if hasattr(a, f.name)}
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**32)
    return Options(
        **values | {"seed": seed, "replay": replay, "max_frame": max_frame, "max_file_size": max_file_size}
    )


def fuzz_stack(options: Options, root: Path) -> Stack:
    """The chaos stack, with the API limits the sessions are built around and metrics on
    free ports (the fuzzer reads them from the ready files)."""
    stack = Stack(root, options.buckets, options.log_level)
    stack.env.update(
        {
            "KARMA8_API_MAX_FRAME": str(options.max_frame),
            "KARMA8_API_MAX_FILE_SIZE": str(options.max_file_size),
            "KARMA8_API_IDLE_TIMEOUT": str(options.idle_timeout),
            "KARMA8_API_HANDSHAKE_TIMEOUT": str(options.handshake_timeout),
            "KARMA8_API_METRICS_PORT": "0",
            # Buckets heartbeat every 0.2 s; on a loaded machine 1.5 s of silence is not death.
            "KARMA8_API_BUCKET_TIMEOUT": "5",
            "KARMA8_BUCKET_METRICS_PORT": "0",
            # A Put whose sender went silent is dropped (with its temporary file) soon.
            "KARMA8_BUCKET_IDLE_TIMEOUT": "5",
            # Durability is not under test; fsyncs would only slow the sessions down.
            "KARMA8_BUCKET_FSYNC": "false",
            # A process that hangs is sent SIGABRT: its threads' stacks go to its log.
            "PYTHONFAULTHANDLER": "1",
        }
    )
    return stack


async def run(options: Options, root: Path) -> Stats:
    stack = fuzz_stack(options, root)
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    note(f"seed {options.seed}; data in {root}")
    await stack.start_all()
    try:
        limits = Limits(
            options.max_frame, options.max_file_size, options.idle_timeout, options.handshake_timeout
        )
        player: Player = (
            RawPlayer(options.seed, stack)
            if options.mode == "raw"
            else WsPlayer(options.seed, stack.port, limits)
        )
        fuzz = Run(options, stack, player)
        client = check_client(stack, options.max_frame)
        # A round trip first: the API's channels to every bucket are open in the baseline.
        warmup = await serving(stack, client, fuzz.stats.ledger, work, options.max_frame + 1)
        if warmup:
            raise FuzzError(f"the fresh stack does not serve: {warmup}")
        baseline = await measure_baseline(stack)
        note(f"stack up: API {stack.url}, {options.buckets} buckets; file descriptors {baseline}")
        replaying = bool(options.replay)
        indices: Iterable[int] = options.replay if replaying else range(options.count)
        if replaying:
            for index in options.replay:
                note(player.describe(index))
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fuzz.watcher)
            nursery.start_soon(fuzz.progress)
            if replaying:  # one after the other, each to its end
                await fuzz.sessions(indices, 1, 1)
            else:
                await fuzz.sessions(indices, options.concurrency)
            nursery.cancel_scope.cancel()
        fuzz.stats.fuzz_seconds = trio.current_time() - started
        fuzz.merge()
        if not replaying:
            await fuzz.triage()
        await fuzz.end_checks(work, baseline)
        return fuzz.stats
    finally:
        await stack.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    failed = lambda stats: bool(stats.findings)  # noqa: E731
    return run_script(run, parse_args(argv), "karma8-fuzz-", format_summary, failed, note)


if __name__ == "__main__":
    sys.exit(main())
