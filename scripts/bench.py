"""Benchmark karma8 end to end: throughput, CPU per GiB and memory of every process.

By default it starts its own local stack (``python -m karma8 up`` as a child process, on
free ports, in a temporary data directory) and stops it with SIGINT at the end; ``--api``
uses a running stack instead (``--data`` then helps find its processes). For each size it
writes a pseudo-random source file, copies it with a plain disk copy (the throughput
baseline), then uploads and downloads it ``--repeat`` times with the client library,
checking sha256 every time.

Reported: MB/s (10^6 bytes per second, median and range), the ratio to the disk copy, CPU
seconds per GiB moved for the API server, the buckets (summed) and the client (this
process), and each process's peak RSS during each transfer. Exit status: 0 when every
transfer round-tripped intact (performance targets are informational), 1 on a checksum
mismatch or a stack failure.

Usage::

    python scripts/bench.py                                  # 1 GiB and 4 GiB, once each
    python scripts/bench.py --sizes 64M,256M --repeat 3 --json bench.json
    python scripts/bench.py --api ws://127.0.0.1:8080 --data karma8-data
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio
from bench_model import MB, POLL, BenchError, Options, SizeRun, Transfer, note, size_label
from bench_procs import Watched, cpu_seconds, find_stack_processes, open_local_stack, reset_peak, status_bytes
from bench_report import Results, format_report, write_json

from karma8.client import Client
from karma8.config import ClientConfig, GiB, MiB, load, parse_size
from karma8.errors import Karma8Error

T = TypeVar("T")

BLOCK = MiB
#: Pools of random 1 MiB blocks; coprime sizes make the XOR of two repeat only every 221 MiB.
POOL_A, POOL_B = 13, 17
DEFAULT_SIZES = "1G,4G"
#: Free disk needed, in multiples of the largest size: source, stored fragments, download.
DISK_FACTOR = 3
SAMPLE_INTERVAL = 0.05
RECLAIM_TIMEOUT = 60.0


# -- options ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", help="one file size (e.g. 1G, 512M)")
    parser.add_argument("--sizes", help=f"comma-separated sizes [default {DEFAULT_SIZES}]")
    parser.add_argument("--repeat", type=int, default=1, help="round trips per size [1]")
    parser.add_argument("--api", help="use this running stack (ws://host:port) instead of starting one")
    parser.add_argument("--data", type=Path, help="stack data directory (started here, or the running one's)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory, stack data and log")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.size and args.sizes:
        parser.error("give --size or --sizes, not both")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        sizes = tuple(int(str(parse_size(s))) for s in (args.size or args.sizes or DEFAULT_SIZES).split(","))
    except ValueError as exc:
        parser.error(str(exc))
    if min(sizes) <= 0:
        parser.error("sizes must be positive")
    return Options(sizes, args.repeat, args.api, args.data, args.keep, args.json_path)


# -- machine facts ---------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "?"
    return rev.stdout.strip() or "?"


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
    }


# -- files -----------------------------------------------------------------------------


def _random_block() -> int:
    return int.from_bytes(os.urandom(BLOCK), "little")


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; return their sha256.

    Block i is the XOR of a block from each of two small urandom pools and of i itself: every
    block differs, at about 1 GB/s (os.urandom alone is about half as fast).
    """
    left = [_random_block() for _ in range(POOL_A)]
    right = [_random_block() for _ in range(POOL_B)]
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        for index in range(-(-size // BLOCK)):
            block = (left[index % POOL_A] ^ right[index % POOL_B] ^ index).to_bytes(BLOCK, "little")
            block = block[: size - index * BLOCK]
            hasher.update(block)
            f.write(block)
        os.fsync(f.fileno())
    return hasher.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def disk_copy(src: Path, dst: Path) -> float:
    """Copy ``src`` to ``dst`` in 1 MiB blocks and fsync; return the seconds it took."""
    view = memoryview(bytearray(BLOCK))
    start = time.perf_counter()
    with src.open("rb", buffering=0) as fin, dst.open("wb", buffering=0) as fout:
        while n := fin.readinto(view):
            fout.write(view[:n])
        os.fsync(fout.fileno())
    return time.perf_counter() - start


def check_disk_space(workdir: Path, largest: int) -> None:
    free = shutil.disk_usage(workdir).free
    if free < DISK_FACTOR * largest:
        raise BenchError(
            f"not enough disk space in {workdir}: {free / GiB:.1f} GiB free, "
            f"{DISK_FACTOR} x {size_label(largest)} needed (source, stored fragments, download)"
        )


# -- measuring one transfer ------------------------------------------------------------


def _cpu_snapshot(pids: Sequence[int]) -> dict[int, float | None]:
    return {pid: cpu_seconds(pid) for pid in pids}


def _cpu_by_role(
    watched: Watched, before: dict[int, float | None], after: dict[int, float | None]
) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for role, pids in watched.groups().items():
        deltas = [(after[p], before[p]) for p in pids]
        ok = pids and all(a is not None and b is not None for a, b in deltas)
        result[role] = sum(a - b for a, b in deltas if a is not None and b is not None) if ok else None
    return result


def _rss_now(pids: Sequence[int]) -> dict[int, int]:
    return {pid: rss for pid in pids if (rss := status_bytes(pid, "VmRSS")) is not None}


def _rss_by_role(watched: Watched, peaks: dict[int, int]) -> dict[str, int | None]:
    return {
        role: max((peaks[p] for p in pids if p in peaks), default=None)
        for role, pids in watched.groups().items()
    }


async def sample_rss(pids: Sequence[int], peaks: dict[int, int]) -> None:
    """Record each process's largest VmRSS, every SAMPLE_INTERVAL, until cancelled."""
    while True:
        for pid, rss in _rss_now(pids).items():
            peaks[pid] = max(rss, peaks.get(pid, 0))
        await trio.sleep(SAMPLE_INTERVAL)


def _add_hwm(pids: Iterable[int], peaks: dict[int, int]) -> None:
    """Fold in VmHWM, which also sees the peaks between samples."""
    for pid in pids:
        hwm = status_bytes(pid, "VmHWM")
        if hwm is not None:
            peaks[pid] = max(hwm, peaks.get(pid, 0))


async def settle() -> None:
    """Flush dirty pages, so that an fsync in the next measurement pays only for its own data."""
    await trio.to_thread.run_sync(os.sync)


@dataclass(slots=True)
class Meter:
    """Measures transfers; keeps each process's lifetime VmHWM across the per-transfer resets."""

    watched: Watched
    lifetime: dict[int, int] = field(default_factory=dict)

    def _reset_peaks(self, pids: Sequence[int]) -> list[int]:
        """Reset VmHWM (keeping the lifetime peak it held); the pids where that worked."""
        _add_hwm(pids, self.lifetime)
        return [pid for pid in pids if reset_peak(pid)]

    def lifetime_peaks(self) -> dict[str, int | None]:
        _add_hwm(self.watched.pids(), self.lifetime)
        return _rss_by_role(self.watched, self.lifetime)

    async def measure(self, size: int, transfer: Callable[[], Awaitable[T]]) -> tuple[Transfer, T]:
        """Run ``transfer`` while sampling RSS; its time, CPU and memory by role."""
        await settle()
        watched, pids = self.watched, self.watched.pids()
        reset = self._reset_peaks(pids)
        rss_before = _rss_by_role(watched, _rss_now(pids))
        peaks: dict[int, int] = {}
        before = _cpu_snapshot(pids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss, pids, peaks)
            start = time.perf_counter()
            result = await transfer()
            seconds = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        cpu = _cpu_by_role(watched, before, _cpu_snapshot(pids))
        _add_hwm(reset, peaks)
        rss_after = _rss_by_role(watched, _rss_now(pids))
        return Transfer(size, seconds, cpu, rss_before, _rss_by_role(watched, peaks), rss_after), result


# -- the benchmark ---------------------------------------------------------------------


async def used_bytes(client: Client) -> int:
    status = await client.status()
    return sum(int(b["used"]) for b in status["buckets"])


async def delete_and_reclaim(client: Client, name: str, baseline: int) -> None:
    """Delete ``name`` and wait until the buckets report its space freed (bounded disk use)."""
    await client.delete(name)
    with trio.move_on_after(RECLAIM_TIMEOUT) as scope:
        # Usage arrives with bucket heartbeats: there is no event to wait on.
        while await used_bytes(client) > baseline:  # noqa: ASYNC110
            await trio.sleep(POLL)
    if scope.cancelled_caught:
        note(f"warning: buckets still use more than before {name!r} after {RECLAIM_TIMEOUT:g} s")


async def round_trip(client: Client, meter: Meter, run: SizeRun, src: Path, workdir: Path) -> None:
    name = f"bench/{src.name}"
    dst = workdir / f"download-{src.name}"
    up, info = await meter.measure(run.size, lambda: client.upload(src, name))
    if info.sha256 != run.sha256 or info.size != run.size:
        raise BenchError(
            f"upload of {name}: server has {info.size} B sha256 {info.sha256}, source {run.sha256}"
        )
    down, _ = await meter.measure(run.size, lambda: client.download(name, dst))
    got = await trio.to_thread.run_sync(sha256_file, dst)
    await trio.Path(dst).unlink()
    if got != run.sha256:
        raise BenchError(f"download of {name}: sha256 {got}, source {run.sha256}")
    run.upload.append(up)
    run.download.append(down)
    note(f"  upload {up.mb_per_s:7.1f} MB/s, download {down.mb_per_s:7.1f} MB/s, sha256 ok")


async def bench_size(client: Client, meter: Meter, size: int, repeat: int, workdir: Path) -> SizeRun:
    label = size_label(size).replace(" ", "")
    src = workdir / f"source-{label}.bin"
    copy = workdir / f"copy-{label}.bin"
    note(f"{size_label(size)}: writing the source file")
    try:
        run = SizeRun(size, await trio.to_thread.run_sync(write_random_file, src, size))
        for i in range(1, repeat + 1):
            await settle()
            run.disk_copy_seconds.append(await trio.to_thread.run_sync(disk_copy, src, copy))
            await trio.Path(copy).unlink()
            note(f"{size_label(size)} #{i}: disk copy {size / run.disk_copy_seconds[-1] / MB:.1f} MB/s")
            baseline = await used_bytes(client)
            await round_trip(client, meter, run, src, workdir)
            await delete_and_reclaim(client, f"bench/{src.name}", baseline)
    finally:
        with contextlib.suppress(FileNotFoundError):
            src.unlink()
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()
    return run


async def bench_stack(url: str, data: Path | None, options: Options, workdir: Path, results: Results) -> None:
    watched = find_stack_processes(url, data)
    if watched.api is None:
        note("warning: API server process not found; its CPU and RSS are not reported")
    results.watched = watched
    results.idle_api_rss = None if watched.api is None else status_bytes(watched.api, "VmRSS")
    client = Client(load(ClientConfig, api=url))
    status = await client.status()  # fails early if the API server is unreachable
    results.stack += f"; {status['live']} live buckets"
    meter = Meter(watched)
    for size in options.sizes:
        results.runs.append(await bench_size(client, meter, size, options.repeat, workdir))
    results.lifetime_hwm = meter.lifetime_peaks()


async def run_bench(options: Options, workdir: Path, results: Results) -> None:
    start = time.perf_counter()
    if options.api is not None:
        results.stack = f"running stack at {options.api}"
        await bench_stack(options.api, options.data, options, workdir, results)
    else:
        data = options.data or workdir / "data"
        async with open_local_stack(data, workdir / "stack.log") as url:
            results.stack = f"local stack started here ({url}, data in {data})"
            note(f"karma8 is up at {url}")
            await bench_stack(url, data, options, workdir, results)
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
    results = Results(command, machine_facts(), "", Watched(None, (), os.getpid()))
    failures: list[str] = []
    with work_directory(options) as workdir:
        try:
            check_disk_space(workdir, max(options.sizes))
            trio.run(run_bench, options, workdir, results)
        except* (BenchError, Karma8Error, OSError) as group:
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
