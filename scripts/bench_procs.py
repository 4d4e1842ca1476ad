"""The processes of a karma8 stack: /proc readers, finding them, starting and stopping a local one,
and taking two of its buckets down for a degraded download.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from bench_model import DOWN, POLL, BenchError, Policy, note

from karma8.client import Client
from karma8.stack import stop_process

STACK_START_TIMEOUT = 120.0
STACK_STOP_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
STACK_LOG_LINES = 10
UP_LINE = re.compile(r"karma8 is up: (ws://\S+)")


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


def dead(pid: int) -> bool:
    """Gone, or a zombie (killed, not yet reaped by its parent)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return any(line.split()[1:2] == ["Z"] for line in text.splitlines() if line.startswith("State:"))


async def wait_dead(pids: Sequence[int]) -> None:
    """Until every one of ``pids`` is dead (after a SIGKILL: at once, unless it is stuck in the kernel)."""
    with trio.move_on_after(STACK_STOP_TIMEOUT) as scope:
        # Another process's state: there is no event to wait on.
        while not all(dead(pid) for pid in pids):  # noqa: ASYNC110
            await trio.sleep(POLL / 10)
    if scope.cancelled_caught:
        raise BenchError(f"processes {pids} still alive {STACK_STOP_TIMEOUT:g} s after SIGKILL")


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
    """The processes measured; the API may be unknown when the stack is not ours. The API
    may be several processes (``karma8 api --workers``: a supervisor and its workers): CPU
    adds up over them, RSS is the largest of them."""

    api: tuple[int, ...]
    buckets: tuple[int, ...]
    client: int

    def groups(self) -> dict[str, tuple[int, ...]]:
        return {
            "api": self.api,
            "buckets": self.buckets,
            "client": (self.client,),
        }

    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pids in self.groups().values() for pid in pids)


def find_stack_processes(url: str, data: Path | None) -> Watched:
    procs = karma8_processes()
    apis = [p for p in procs if p.role == "api" and _is_our_api(p, url, data)]
    membership = None
    if apis:
        api = apis[0]
        membership = str(_ready_info(api).get("membership_port", api.option("--membership-port")))
    buckets = tuple(
        sorted(p.pid for p in procs if p.role == "bucket" and _is_our_bucket(p, data, membership))
    )
    return Watched(tuple(sorted(p.pid for p in apis)), buckets, os.getpid())


# -- the local stack -------------------------------------------------------------------


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a process's log."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


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
            if any("exited with status -9" in line for line in errors):
                note("  (status -9, read around: the buckets killed for the degraded downloads)")


async def _wait_until_up(proc: trio.Process, log_path: Path) -> str:
    try:
        with trio.fail_after(STACK_START_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise BenchError(f"karma8 up exited with status {proc.returncode}:\n{log_tail(log_path)}")
                match = UP_LINE.search(await trio.Path(log_path).read_text(errors="replace"))
                if match:
                    return match.group(1)
                await trio.sleep(POLL)
    except trio.TooSlowError:
        raise BenchError(
            f"karma8 up not ready after {STACK_START_TIMEOUT:g} s:\n{log_tail(log_path)}"
        ) from None


async def _stop(proc: trio.Process) -> None:
    """SIGINT (what Ctrl-C sends), then SIGKILL if it is still there after the deadline."""
    if await stop_process(proc, signal.SIGINT, STACK_STOP_TIMEOUT):
        note(f"karma8 up (pid {proc.pid}) did not stop in {STACK_STOP_TIMEOUT:g} s; killed it")


@dataclass(frozen=True, slots=True)
class LocalStack:
    """A stack started here: where clients connect, its data, and its supervisor (``karma8 up``)."""

    url: str
    data: Path
    supervisor: int


@contextlib.asynccontextmanager
async def open_local_stack(data: Path, log_path: Path, policy: Policy) -> AsyncIterator[LocalStack]:
    """Run ``karma8 up`` with ``policy``'s buckets and scheme, on free ports (both 0: the ready
    files carry the real ones).
    """
    env = {
        **os.environ,
        "KARMA8_STACK_MEMBERSHIP_PORT": "0",
        # The API child reads these: the scheme is the policy's, not the environment's.
        "KARMA8_API_PARTS": str(policy.parts),
        "KARMA8_API_PARITY": str(policy.parity),
    }
    cmd = [sys.executable, "-m", "karma8", "up", "--data", str(data), "--port", "0"]
    cmd += ["--buckets", str(policy.buckets)]
    log_fd = _open_log(log_path)
    try:
        proc = await trio.lowlevel.open_process(cmd, stdout=log_fd, stderr=subprocess.STDOUT, env=env)
    finally:
        os.close(log_fd)
    try:
        yield LocalStack(await _wait_until_up(proc, log_path), data, proc.pid)
        if proc.returncode is not None:
            raise BenchError(f"the stack exited during the run:\n{log_tail(log_path)}")
    finally:
        # A paused supervisor (see BucketsDown) would not hear the SIGINT.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        await _stop(proc)
        _report_stack_log(log_path)


# -- buckets down ----------------------------------------------------------------------


def stack_buckets(data: Path) -> dict[str, tuple[int, int | None]]:
    """The running bucket processes of the stack in ``data``: bucket id -> (pid, port when ready).

    The id is the one in the bucket's ``--data-dir``, the port its ready file's (written once
    it serves; a restarted bucket gets a new port).
    """
    found: dict[str, tuple[int, int | None]] = {}
    for proc in karma8_processes():
        data_dir = proc.path_option("--data-dir")
        if proc.role != "bucket" or data_dir is None or not _under(proc, data):
            continue
        with contextlib.suppress(OSError):
            bucket_id = (data_dir / "bucket-id").read_text().strip()
            info = _ready_info(proc)
            port = info.get("port") if info.get("bucket_id") == bucket_id else None
            found[bucket_id] = (proc.pid, None if port is None else int(port))
    return found


class BucketsDown:
    """The outage of a degraded download on a stack started here: DOWN buckets holding data
    fragments of the file, killed.

    The supervisor (``karma8 up``) is paused first (SIGSTOP), so that it restarts nothing
    while the download runs: the buckets are down for the whole download whatever its
    length, and no restart's start-up work lands in the measurement. The buckets get
    SIGKILL (no goodbye to the API server: as if their machine died). Afterwards the
    supervisor resumes (SIGCONT) and restarts them as after any crash; the outage ends
    when the API server has every bucket live again, the restarted ones at their new ports.
    """

    def __init__(self, stack: LocalStack, client: Client, buckets: int) -> None:
        self.stack = stack
        self.client = client
        self.buckets = buckets
        self.what = f"{DOWN} buckets"

    async def _victims(self, name: str) -> dict[str, int]:
        stat = await self.client.stat(name)
        holders = [str(p["bucket"]) for p in stat["parts"] if p["role"] == "data" and p["bucket"]]
        running = await trio.to_thread.run_sync(stack_buckets, self.stack.data)
        victims = {bucket: running[bucket][0] for bucket in holders if bucket in running}
        if len(victims) < DOWN:
            raise BenchError(
                f"{name}: fewer than {DOWN} running buckets hold its data fragments "
                f"(data fragments on {holders}, buckets running: {sorted(running)})"
            )
        return dict(list(victims.items())[:DOWN])

    @contextlib.asynccontextmanager
    async def down(self, name: str) -> AsyncIterator[tuple[int, ...]]:
        """Kill DOWN buckets holding data fragments of ``name``; yield their pids; restart them after."""
        victims = await self._victims(name)
        supervisor = self.stack.supervisor
        os.kill(supervisor, signal.SIGSTOP)
        try:
            for pid in victims.values():
                os.kill(pid, signal.SIGKILL)
            await wait_dead(tuple(victims.values()))
            yield tuple(victims.values())
        finally:
            os.kill(supervisor, signal.SIGCONT)
        await self._wait_back(list(victims))

    async def _back(self, ids: Sequence[str]) -> bool:
        running = await trio.to_thread.run_sync(stack_buckets, self.stack.data)
        status = await self.client.status()
        rows = {str(b["id"]): b for b in status["buckets"]}

        def known(bucket: str) -> bool:
            port = running.get(bucket, (0, None))[1]
            row = rows.get(bucket, {})
            return port is not None and bool(row.get("live")) and str(row.get("address")).endswith(f":{port}")

        return int(status["live"]) >= self.buckets and all(known(b) for b in ids)

    async def _wait_back(self, ids: Sequence[str]) -> None:
        with trio.move_on_after(STACK_START_TIMEOUT) as scope:
            # Another process's state: there is no event to wait on.
            while not await self._back(ids):  # noqa: ASYNC110
                await trio.sleep(POLL)
        if scope.cancelled_caught:
            raise BenchError(f"buckets {', '.join(ids)} not back after {STACK_START_TIMEOUT:g} s")

    def groups(self) -> dict[str, tuple[int, ...]]:
        """The stack's processes to measure from now on (the restarted buckets' new pids)."""
        return find_stack_processes(self.stack.url, self.stack.data).groups()
