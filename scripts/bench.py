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
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

from karma8.client import Client
from karma8.config import ClientConfig, GiB, MiB, load, parse_size
from karma8.errors import Karma8Error

T = TypeVar("T")

MB = 1_000_000
BLOCK = MiB
#: Pools of random 1 MiB blocks; coprime sizes make the XOR of two repeat only every 221 MiB.
POOL_A, POOL_B = 13, 17
DEFAULT_SIZES = "1G,4G"
#: Free disk needed, in multiples of the largest size: source, stored fragments, download.
DISK_FACTOR = 3
SAMPLE_INTERVAL = 0.05
POLL = 0.1
STACK_START_TIMEOUT = 120.0
STACK_STOP_TIMEOUT = 30.0
RECLAIM_TIMEOUT = 60.0
API_RSS_TARGET = 150 * MB  # issue 2
CLK_TCK = os.sysconf("SC_CLK_TCK")
STACK_LOG_LINES = 10
UP_LINE = re.compile(r"karma8 is up: (ws://\S+)")
ROLES = ("api", "buckets", "client")


class BenchError(Exception):
    """A correctness or stack failure: the run is not valid."""


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


# -- options ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...]
    repeat: int
    api: str | None
    data: Path | None
    keep: bool
    json_path: Path | None


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


def size_label(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


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


# -- processes (/proc) -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_bytes(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM) in bytes, or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so it measures one transfer."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Karma8Process:
    pid: int
    role: str
    argv: tuple[str, ...]
    cwd: Path

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    def path_option(self, name: str) -> Path | None:
        value = self.option(name)
        return None if value is None else (self.cwd / value).resolve()


def _role(argv: Sequence[str]) -> str | None:
    """``api`` / ``bucket`` for ``python -m karma8 api ...`` or ``.../bin/karma8 bucket ...``."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "karma8" or arg.endswith("/karma8"):
            return argv[i + 1] if argv[i + 1] in ("api", "bucket") else None
    return None


def karma8_processes() -> list[Karma8Process]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = tuple(a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0"))
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        role = _role(argv)
        if role is not None:
            found.append(Karma8Process(int(entry.name), role, argv, cwd))
    return found


def _ready_info(proc: Karma8Process) -> dict[str, Any]:
    ready = proc.path_option("--ready-file")
    with contextlib.suppress(OSError, ValueError):
        if ready is not None:
            info: dict[str, Any] = json.loads(ready.read_text())
            return info
    return {}


def _under(proc: Karma8Process, data: Path) -> bool:
    data_dir = proc.path_option("--data-dir")
    return data_dir is not None and data_dir.is_relative_to(data.resolve())


def _is_our_api(proc: Karma8Process, url: str, data: Path | None) -> bool:
    if data is not None:
        return _under(proc, data)
    port = urlsplit(url).port or 80
    return str(_ready_info(proc).get("port", proc.option("--port"))) == str(port)


def _is_our_bucket(proc: Karma8Process, data: Path | None, membership: str | None) -> bool:
    if data is not None:
        return _under(proc, data)
    api = proc.option("--api")
    return membership is not None and api is not None and api.endswith(f":{membership}")


@dataclass(frozen=True, slots=True)
class Watched:
    """The processes measured; the API may be unknown when the stack is not ours."""

    api: int | None
    buckets: tuple[int, ...]
    client: int

    def groups(self) -> dict[str, tuple[int, ...]]:
        return {
            "api": () if self.api is None else (self.api,),
            "buckets": self.buckets,
            "client": (self.client,),
        }

    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pids in self.groups().values() for pid in pids)


def find_stack_processes(url: str, data: Path | None) -> Watched:
    procs = karma8_processes()
    apis = [p for p in procs if p.role == "api" and _is_our_api(p, url, data)]
    api = apis[0] if len(apis) == 1 else None
    membership = None
    if api is not None:
        membership = str(_ready_info(api).get("membership_port", api.option("--membership-port")))
    buckets = tuple(
        sorted(p.pid for p in procs if p.role == "bucket" and _is_our_bucket(p, data, membership))
    )
    return Watched(api.pid if api else None, buckets, os.getpid())


# -- the local stack -------------------------------------------------------------------


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _report_stack_log(path: Path) -> None:
    """Warnings and errors the stack logged: a clean run has none."""
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()
        errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
        warnings = [line for line in lines if " WARNING " in line]
        if errors or warnings:
            note(f"the stack logged {len(errors)} error(s) and {len(warnings)} warning(s); the first ones:")
            for line in (errors + warnings)[:STACK_LOG_LINES]:
                note(f"  {line}")


async def _wait_until_up(proc: trio.Process, log_path: Path) -> str:
    try:
        with trio.fail_after(STACK_START_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise BenchError(
                        f"karma8 up exited with status {proc.returncode}:\n{_log_tail(log_path)}"
                    )
                match = UP_LINE.search(await trio.Path(log_path).read_text(errors="replace"))
                if match:
                    return match.group(1)
                await trio.sleep(POLL)
    except trio.TooSlowError:
        raise BenchError(
            f"karma8 up not ready after {STACK_START_TIMEOUT:g} s:\n{_log_tail(log_path)}"
        ) from None


async def _stop(proc: trio.Process) -> None:
    """SIGINT (what Ctrl-C sends), then SIGKILL if it is still there after the deadline."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(STACK_STOP_TIMEOUT):
                await proc.wait()
        if proc.returncode is None:
            note(f"karma8 up (pid {proc.pid}) did not stop in {STACK_STOP_TIMEOUT:g} s; killing it")
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def open_local_stack(data: Path, log_path: Path) -> AsyncIterator[str]:
    """Run ``karma8 up`` on free ports (both 0: the ready files carry the real ones)."""
    env = {**os.environ, "KARMA8_STACK_MEMBERSHIP_PORT": "0"}
    cmd = [sys.executable, "-m", "karma8", "up", "--data", str(data), "--port", "0"]
    log_fd = _open_log(log_path)
    try:
        proc = await trio.lowlevel.open_process(cmd, stdout=log_fd, stderr=subprocess.STDOUT, env=env)
    finally:
        os.close(log_fd)
    try:
        yield await _wait_until_up(proc, log_path)
        if proc.returncode is not None:
            raise BenchError(f"the stack exited during the run:\n{_log_tail(log_path)}")
    finally:
        await _stop(proc)
        _report_stack_log(log_path)


# -- measuring one transfer ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transfer:
    """One measured transfer. CPU is in seconds, RSS in bytes; None: process not found."""

    size: int
    seconds: float
    cpu: dict[str, float | None]
    rss_before: dict[str, int | None]
    peak_rss: dict[str, int | None]
    rss_after: dict[str, int | None]

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / MB

    def cpu_per_gib(self, role: str) -> float | None:
        cpu = self.cpu[role]
        return None if cpu is None else cpu / (self.size / GiB)


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


@dataclass(slots=True)
class SizeRun:
    size: int
    sha256: str
    disk_copy_seconds: list[float] = field(default_factory=list)
    upload: list[Transfer] = field(default_factory=list)
    download: list[Transfer] = field(default_factory=list)

    def disk_mb_per_s(self) -> float:
        return statistics.median(self.size / s / MB for s in self.disk_copy_seconds)


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
