"""Benchmark karma8 end to end: throughput, CPU per GiB and memory of every process.

By default it starts its own local stack (``python -m karma8 up`` as a child process, on
free ports, in a temporary data directory) and stops it with SIGINT at the end; ``--api``
uses a running stack instead (``--data`` then helps find its processes). The cases:

- big files: for each size it writes a pseudo-random source file, copies it with a plain
  disk copy (the throughput baseline), then uploads and downloads it ``--repeat`` times;
- small files: ``--small-files`` files of ``--small-size`` (200 x 64 KiB) uploaded, then
  downloaded, ``--repeat`` times at each of ``--concurrency``'s levels (``1,8``: one at a
  time, then 8 at a time); every single upload and download is timed as well, for the
  latency percentiles p50 and p99.

``--policy`` sets how both systems store a file: ``ec62`` (default: the local stack runs 8
buckets with 6 data + 2 parity fragments, Swift's container is in its ``ec62`` policy) or
``rep1`` (6 buckets, no parity; Swift's ``rep1``, one replica). ``--vs-swift`` also runs
every case against the Swift peer (``swiftpeer.sh``, started here unless it is up) in the
same run, alternating karma8 and Swift every repeat (karma8 first on odd repeats, Swift
first on even ones), and prints the ratios karma8 / Swift next to the targets of issue 5.

With parity, each big file is downloaded once more with 2 processes holding its data
fragments killed: 2 buckets of a stack started here (its supervisor paused meanwhile, so
that they stay down), 2 object servers of a Swift peer started here; they are restarted
after that download (docs/performance.md).

Reported: MB/s (10^6 bytes per second) or files/s, median and range; small-file latency p50
and p99 in ms (each repeat's percentiles, median and range over the repeats); the ratio to the disk
copy; CPU seconds per GiB moved for each group of server processes and the client (this
process); each group's peak RSS during each transfer. Every download is checked against
the source's sha256. Exit status: 0 when every transfer round-tripped intact (performance
targets are informational), 1 on a checksum mismatch or a stack failure.

Usage::

    python scripts/bench.py                                  # 1 GiB and 4 GiB, 200 x 64 KiB at c=1 and c=8
    python scripts/bench.py --concurrency 8                  # small files at concurrency 8 only
    python scripts/bench.py --sizes 64M,256M --repeat 3 --json bench.json
    python scripts/bench.py --vs-swift --size 1G --repeat 3         # karma8 6+2 vs Swift ec62
    python scripts/bench.py --vs-swift --policy rep1 --size 1G      # no redundancy on either side
    python scripts/bench.py --api ws://127.0.0.1:8080 --data karma8-data
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio
from bench_cases import Karma8Target, Outage, System, round_trip, small_round
from bench_meter import Meter, settle
from bench_model import (
    DEFAULT_POLICY,
    DOWN,
    MB,
    POLICIES,
    SWIFT_ROLES,
    BenchError,
    Options,
    Policy,
    SizeRun,
    SmallRun,
    Source,
    SystemRuns,
    note,
    size_label,
)
from bench_procs import BucketsDown, LocalStack, Watched, find_stack_processes, open_local_stack, status_bytes
from bench_report import Results, format_report, write_json
from bench_swift import (
    DEFAULT_SCRIPT,
    URL,
    ObjectServersDown,
    SwiftTarget,
    authenticate,
    find_swift_processes,
    open_swift_peer,
)

from karma8 import speedups
from karma8.client import Client
from karma8.config import ClientConfig, GiB, MiB, load, parse_size
from karma8.errors import Karma8Error

BLOCK = MiB
#: Pools of random 1 MiB blocks; coprime sizes make the XOR of two repeat only every 221 MiB.
POOL_A, POOL_B = 13, 17
DEFAULT_SIZES = "1G,4G"
DEFAULT_CONCURRENCY = "1,8"


# -- options ---------------------------------------------------------------------------


def _size(text: str) -> int:
    return int(str(parse_size(text)))


def _levels(text: str) -> tuple[int, ...]:
    """``--concurrency``: ``8`` or ``1,8``, each a positive number, none twice."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--concurrency: {text!r} is not a comma-separated list of numbers") from None
    if min(levels) < 1 or len(set(levels)) != len(levels):
        raise ValueError(f"--concurrency: {text!r}: each level at least 1, none twice")
    return levels


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", help="one file size (e.g. 1G, 512M)")
    parser.add_argument("--sizes", help=f"comma-separated sizes [default {DEFAULT_SIZES}]")
    parser.add_argument("--repeat", type=int, default=1, help="round trips per case [1]")
    parser.add_argument("--small-files", type=int, default=200, help="small files per case; 0: none [200]")
    parser.add_argument("--small-size", default="64K", help="size of each small file [64K]")
    parser.add_argument(
        "--concurrency",
        default=DEFAULT_CONCURRENCY,
        help="small-file transfers at a time; a comma-separated list runs the small-file case at each "
        f"[{DEFAULT_CONCURRENCY}]",
    )
    parser.add_argument("--vs-swift", action="store_true", help="also run every case against the Swift peer")
    parser.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default=DEFAULT_POLICY,
        help="ec62: karma8 6+2 on 8 buckets vs Swift ec62; rep1: karma8 6+0 on 6 buckets vs Swift rep1 "
        f"[{DEFAULT_POLICY}]",
    )
    parser.add_argument(
        "--swift-peer", type=Path, default=DEFAULT_SCRIPT, help=f"swiftpeer.sh [default {DEFAULT_SCRIPT}]"
    )
    parser.add_argument("--api", help="use this running stack (ws://host:port) instead of starting one")
    parser.add_argument("--data", type=Path, help="stack data directory (started here, or the running one's)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory, stack data and log")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.size and args.sizes:
        parser.error("give --size or --sizes, not both")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.small_files < 0:
        parser.error("--small-files must be at least 0")
    try:
        sizes = tuple(_size(s) for s in (args.size or args.sizes or DEFAULT_SIZES).split(","))
        small_size = _size(args.small_size)
        concurrencies = _levels(args.concurrency)
    except ValueError as exc:
        parser.error(str(exc))
    if min(sizes) <= 0 or small_size <= 0:
        parser.error("sizes must be positive")
    return Options(
        sizes,
        args.repeat,
        args.api,
        args.data,
        args.keep,
        args.json_path,
        args.small_files,
        small_size,
        concurrencies,
        args.vs_swift,
        args.swift_peer,
        POLICIES[args.policy],
    )


# -- machine facts ---------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], check=False, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


def _git_revision() -> str:
    return _git("describe", "--always", "--dirty") or "?"


def _uncommitted() -> str:
    """The tracked files that differ from the revision: what "-dirty" stands for."""
    return ", ".join(_git("diff", "--name-only", "HEAD").split()) or "none"


def _memory() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    return f"{int(total) * 1024 / GiB:.1f} GiB" if total.isdigit() else "?"


def _load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def machine_facts() -> dict[str, str]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "memory": _memory(),
        "loadavg": _load_average(),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "karma8": _git_revision(),
        "uncommitted": _uncommitted(),
    }


# -- files -----------------------------------------------------------------------------


def _random_block() -> int:
    return int.from_bytes(os.urandom(BLOCK), "little")


def write_random_file(path: Path, size: int, *, md5: bool = False) -> Source:
    """Write ``size`` pseudo-random bytes to ``path``; their sha256 (and md5, which Swift checks).

    Block i is the XOR of a block from each of two small urandom pools and of i itself: every
    block differs, at about 1 GB/s (os.urandom alone is about half as fast).
    """
    left = [_random_block() for _ in range(POOL_A)]
    right = [_random_block() for _ in range(POOL_B)]
    hashers = [hashlib.sha256(), *([hashlib.md5(usedforsecurity=False)] if md5 else [])]
    with path.open("wb") as f:
        for index in range(-(-size // BLOCK)):
            block = (left[index % POOL_A] ^ right[index % POOL_B] ^ index).to_bytes(BLOCK, "little")
            block = block[: size - index * BLOCK]
            for hasher in hashers:
                hasher.update(block)
            f.write(block)
        os.fsync(f.fileno())
    digests = [h.hexdigest() for h in hashers]
    return Source(path, size, digests[0], digests[1] if md5 else None)


def disk_copy(src: Path, dst: Path) -> float:
    """Copy ``src`` to ``dst`` in 1 MiB blocks and fsync; return the seconds it took."""
    view = memoryview(bytearray(BLOCK))
    start = time.perf_counter()
    with src.open("rb", buffering=0) as fin, dst.open("wb", buffering=0) as fout:
        while n := fin.readinto(view):
            fout.write(view[:n])
        os.fsync(fout.fileno())
    return time.perf_counter() - start


def check_disk_space(workdir: Path, largest: int, policy: Policy) -> None:
    """Room for the source, its download and its stored fragments (parity included)."""
    factor = 2 + policy.buckets / policy.parts
    free = shutil.disk_usage(workdir).free
    if free < factor * largest:
        raise BenchError(
            f"not enough disk space in {workdir}: {free / GiB:.1f} GiB free, "
            f"{factor:.2f} x {size_label(largest)} needed (source, stored fragments, download)"
        )


# -- the benchmark ---------------------------------------------------------------------


def _in_turn(systems: Sequence[System], repeat: int) -> Sequence[System]:
    """Alternate: karma8 first on odd repeats, the peer first on even ones."""
    return systems if repeat % 2 else systems[::-1]


async def bench_size(systems: Sequence[System], size: int, repeat: int, workdir: Path, md5: bool) -> None:
    label = size_label(size).replace(" ", "")
    path, copy = workdir / f"source-{label}.bin", workdir / f"copy-{label}.bin"
    note(f"{size_label(size)}: writing the source file")
    try:
        src = await trio.to_thread.run_sync(lambda: write_random_file(path, size, md5=md5))
        disk_copy_seconds: list[float] = []  # one baseline for every system
        runs = {s.target.name: SizeRun(size, src.sha256, disk_copy_seconds) for s in systems}
        for system in systems:
            system.results.runs.append(runs[system.target.name])
        for i in range(1, repeat + 1):
            await settle()
            disk_copy_seconds.append(await trio.to_thread.run_sync(disk_copy, path, copy))
            await trio.Path(copy).unlink()
            note(f"{size_label(size)} #{i}: disk copy {size / disk_copy_seconds[-1] / MB:.1f} MB/s")
            for system in _in_turn(systems, i):
                note("  " + await round_trip(system, runs[system.target.name], src, workdir))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()


async def bench_small(systems: Sequence[System], options: Options, workdir: Path) -> None:
    """The small-file case at each concurrency level in turn, ``--repeat`` rounds each."""
    path = workdir / f"small-{options.small_size}.bin"
    src = await trio.to_thread.run_sync(lambda: write_random_file(path, options.small_size, md5=True))
    for concurrency in options.concurrencies:
        runs = {
            s.target.name: SmallRun(options.small_files, options.small_size, concurrency) for s in systems
        }
        for system in systems:
            system.results.small.append(runs[system.target.name])
        label = runs[systems[0].target.name].label()
        for i in range(1, options.repeat + 1):
            note(f"{label} #{i}")
            for system in _in_turn(systems, i):
                note("  " + await small_round(system, runs[system.target.name], src, workdir))
    await trio.Path(path).unlink()


async def karma8_system(
    url: str, data: Path | None, local: LocalStack | None, options: Options, results: Results
) -> System:
    watched = find_stack_processes(url, data)
    if not watched.api:
        note("warning: API server process not found; its CPU and RSS are not reported")
    results.watched = watched
    idle = [rss for pid in watched.api if (rss := status_bytes(pid, "VmRSS")) is not None]
    results.idle_api_rss = max(idle, default=None)
    client = Client(load(ClientConfig, api=url))
    status = await client.status()  # fails early if the API server is unreachable
    scheme = str(status["protection"]["configured"])  # what the API server stores new files as
    results.stack += f"; {status['live']} live buckets, files stored as {scheme}"
    results.karma8.pids = watched.groups()
    results.karma8.scheme = scheme
    if scheme != options.policy.scheme:
        wanted = options.policy
        note(f"warning: karma8 stores files as {scheme}, not as --policy {wanted.name}'s {wanted.scheme}")
    outage: Outage | None = None
    if local is None:
        results.karma8.no_degraded = "the stack was not started here (its buckets are not ours to kill)"
    elif int(scheme.split("+")[1]) < DOWN:
        results.karma8.no_degraded = f"{scheme} has no parity to read around {DOWN} buckets down"
    else:
        outage = BucketsDown(local, client, int(status["live"]))
        results.karma8.down = outage.what
    return System(Karma8Target(client), Meter(watched.groups()), results.karma8, outage)


async def swift_system(started: bool, options: Options, log_path: Path, results: Results) -> System:
    policy = options.policy
    account = await trio.to_thread.run_sync(authenticate, policy.name)
    procs = find_swift_processes()
    results.swift = SystemRuns("Swift", SWIFT_ROLES, procs.groups(), scheme=policy.name)
    results.swift_peer = (
        f"{'started here' if started else 'already running'} at {URL}, container {account.container} "
        f"(policy {policy.name}); {len(procs.proxy)} proxy, {len(procs.objects)} object server, "
        f"{len(procs.others)} other processes"
    )
    outage: Outage | None = None
    if not started:
        results.swift.no_degraded = "the peer was not started here (its servers are not ours to kill)"
    elif policy.parity < DOWN:
        results.swift.no_degraded = f"{policy.name} has no parity to read around {DOWN} object servers down"
    else:
        script = options.swift_peer or DEFAULT_SCRIPT
        outage = ObjectServersDown(script, account, policy.name, log_path)
        results.swift.down = outage.what
    return System(SwiftTarget(account), Meter(procs.groups()), results.swift, outage)


async def bench_systems(systems: Sequence[System], options: Options, workdir: Path) -> None:
    for size in options.sizes:
        await bench_size(systems, size, options.repeat, workdir, md5=options.vs_swift)
    if options.small_files:
        await bench_small(systems, options, workdir)
    for system in systems:
        system.results.lifetime_hwm = system.meter.lifetime_peaks()


async def run_bench(options: Options, workdir: Path, results: Results) -> None:
    start = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        started = False
        swift_log = workdir / "swift.log"
        if options.vs_swift:
            script = options.swift_peer or DEFAULT_SCRIPT
            started = await stack.enter_async_context(open_swift_peer(script, swift_log))
        data = options.data
        local = None
        if options.api is not None:
            url = options.api
            results.stack = f"running stack at {url}"
        else:
            data = options.data or workdir / "data"
            policy = options.policy
            local = await stack.enter_async_context(open_local_stack(data, workdir / "stack.log", policy))
            url = local.url
            results.stack = f"local stack started here ({url}, data in {data})"
            note(f"karma8 is up at {url}")
        systems = [await karma8_system(url, data, local, options, results)]
        if options.vs_swift:
            systems.append(await swift_system(started, options, swift_log, results))
        await bench_systems(systems, options, workdir)
    results.seconds = time.perf_counter() - start
    results.facts["loadavg_end"] = _load_average()


# -- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def work_directory(options: Options) -> Iterator[Path]:
    """A temporary directory beside the data directory (or in $TMPDIR), removed unless --keep."""
    parent = options.data.absolute().parent if options.data is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="karma8-bench-", dir=parent))
    try:
        yield workdir
    finally:
        if options.keep:
            note(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _leaves(group: BaseExceptionGroup[Exception]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", *sys.argv])
    results = Results(command, machine_facts(), "", Watched((), (), os.getpid()))
    failures: list[str] = []
    with work_directory(options) as workdir:
        try:
            check_disk_space(workdir, max(options.sizes), options.policy)
            speedups.tune_malloc()  # the client in this process, as the karma8 CLI does
            trio.run(run_bench, options, workdir, results)
        except* (BenchError, Karma8Error, OSError, http.client.HTTPException) as group:
            failures += [str(exc) for exc in _leaves(group)]
        except* KeyboardInterrupt:
            failures.append("interrupted")
    if failures:
        print("FAILED: " + "\n".join(failures), file=sys.stderr)
        return 1
    print(format_report(results, options))
    if options.json_path is not None:
        write_json(options.json_path, results, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
