"""One run of scripts/scale.py: a stack on a built registry, and what is measured on it."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chaos_stack
import trio
from bench_model import note
from bench_procs import reset_peak, status_bytes
from chaos_stack import Stack
from scale_build import Shape

from karma8.client import Client
from karma8.config import ClientConfig
from karma8.registry.db import RegistryDB

MB = 1_000_000
#: Buckets: 8 hold the files, 2 more join for the rebalancer's plan.
BUCKETS, JOINING = 8, 2
#: The fake holder of the leases of the jobs that would react to the missing data.
HOLDER = "scale.py"
HELD_JOBS = ("reconciler", "repair", "rebalancer")
#: Real files uploaded after start, for the downloads.
SMALL = tuple((f"bench/small-{i}.bin", 4096 * (i + 1)) for i in range(5))
#: The stack's settings: background jobs held off (see scripts/scale.py), membership quick.
API_SETTINGS = {
    "heartbeat_interval": "1.0",
    "bucket_timeout": "4.0",
    "janitor_interval": "5.0",
    "reconcile_interval": "1000000",
    "orphan_grace": "1000000",
    "rebalance_auto": "false",
    "rebalance_interval": "1000000",
    "repair_after": "1000000",
    "repair_interval": "1000000",
}
POLL = 0.1
LIVE_TIMEOUT = 120.0
# The client of the walk: ``karma8 ls -r``, reporting its own peak RSS when it exits.
_LS = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: sys.stderr.write("
    "'\\nscale-maxrss-kib %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    "sys.argv = ['karma8', *sys.argv[1:]]\n"
    "runpy.run_module('karma8', run_name='__main__', alter_sys=True)\n"
)


class ScaleError(Exception):
    """The run could not go on (a process would not start, a check failed)."""


@dataclass
class Result:
    """The samples of one run, by measurement key (see ``ROWS`` in scripts/scale.py)."""

    files: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: Measurements given up at a deadline: their samples are that deadline.
    unfinished: set[str] = field(default_factory=set)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def spread(self, key: str) -> tuple[float, float]:
        values = self.samples.get(key) or [0.0]
        return min(values), max(values)

    def summary(self) -> str:
        i = self.info
        behind = (
            f"but bucket 0's {i['fragment_files']:,} empty fragment files"
            if i.get("fragment_files")
            else "nor fragment files"
        )
        reconciled = (
            f"reconciliation listed {i['reconcile_listed']:,} fragments, {i.get('reconcile_unknown', '?')}"
            f" unknown, {i.get('reconcile_missing', '?')} missing"
            if i.get("reconcile_listed") is not None
            else "no reconciliation pass"
        )
        plan = "not done" if "plan_s" in self.unfinished else format(i.get("plan_moves", 0), ",")
        return (
            f"{self.files:,} files: {i.get('bytes', 0) / 1e9:,.1f} GB stored (no data behind the bulk"
            f" files {behind}), {i.get('fragments', 0):,} fragment rows; listed {i.get('walk_names', 0):,}"
            f" names; plan: {plan} moves; {reconciled}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "median": {k: self.median(k) for k in self.samples},
            "samples": self.samples,
            "info": self.info,
            "unfinished": sorted(self.unfinished),
        }


def _mb(value: int | None) -> float:
    return (value or 0) / MB


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = await call()
    return time.perf_counter() - start, out


class Peak:
    """A process's peak RSS over a stretch: VmHWM reset at the start, VmRSS sampled too."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    async def sample(self) -> None:
        reset_peak(self.pid)
        while True:
            self.peak = max(self.peak, status_bytes(self.pid, "VmRSS") or 0)
            await trio.sleep(0.05)

    def read(self) -> int:
        return max(self.peak, status_bytes(self.pid, "VmHWM") or 0)


def hold_leases(db_url: str, release: bool = False) -> None:
    """Have the fake server hold the background jobs' leases for good (or let them go)."""
    db = RegistryDB(db_url, server_id=HOLDER)
    try:
        with db.database.transaction() as tx:
            for job in HELD_JOBS:
                if release:
                    tx.execute(
                        f"UPDATE leases SET expires = {db.database.now} - 1 WHERE job = ? AND holder = ?",
                        (job, HOLDER),
                    )
                    continue
                tx.execute(
                    "INSERT INTO leases (job, holder, epoch, expires) VALUES"
                    f" (?, ?, 1, {db.database.now} + 1e9) ON CONFLICT (job) DO UPDATE SET"
                    " holder = excluded.holder, epoch = leases.epoch + 1, expires = excluded.expires",
                    (job, HOLDER),
                )
    finally:
        db.close()


class Run:
    """The stack of one size and its measurements."""

    def __init__(self, root: Path, files: int, url: str | None, db_url: str, log_level: str) -> None:
        self.root = root
        self.files = files
        self.shape = Shape(files)
        self.db_url = db_url
        self.stack = Stack(root, BUCKETS + JOINING, log_level, registry_url=url)
        for key, value in API_SETTINGS.items():
            self.stack.env[f"KARMA8_API_{key.upper()}"] = value
        self.stack.env["KARMA8_LOG_FORMAT"] = "json"
        self.stack.env["KARMA8_API_METRICS_PORT"] = "0"  # the API's own time of a download
        self.client = Client(ClientConfig(api=self.stack.url, connect_timeout=30.0, idle_timeout=600.0))
        self.rng = random.Random(files)

    @property
    def api_pid(self) -> int:
        proc = self.stack.api.proc
        assert proc is not None
        return proc.pid

    async def wait_live(self, count: int) -> None:
        timeout = LIVE_TIMEOUT
        with trio.move_on_after(timeout):
            while int((await self.client.status())["live"]) != count:  # noqa: ASYNC110 (other processes)
                await trio.sleep(POLL)
            return
        raise ScaleError(f"not {count} live buckets after {timeout:g} s")

    async def start(self) -> float:
        """Start the API and the 8 buckets; the API's start time."""
        seconds, _ = await _timed(lambda: self.stack.start(self.stack.api))
        async with trio.open_nursery() as nursery:
            for bucket in self.stack.buckets[:BUCKETS]:
                nursery.start_soon(self.stack.start, bucket)
        await self.wait_live(BUCKETS)
        return seconds

    async def upload_small(self, work: Path) -> list[str]:
        names = []
        for name, size in SMALL:
            src = work / "small.bin"
            src.write_bytes(os.urandom(size))
            await self.client.upload(src, name)
            names.append(name)
        return names

    async def quick(self, result: Result, repeat: int, small: list[str], work: Path) -> None:
        """The one-request measurements, in turn, ``repeat`` times."""
        leaf = self.shape.listed_leaf()
        db = RegistryDB(self.db_url, server_id=HOLDER)
        try:
            async with self.client.session() as session:
                await self._quick(result, repeat, small, work, leaf, db, session)
        finally:
            db.close()

    async def _quick(
        self,
        result: Result,
        repeat: int,
        small: list[str],
        work: Path,
        leaf: str,
        db: RegistryDB,
        session: Client,
    ) -> None:
        from karma8.core.listing import ListQuery

        for i in range(repeat):
            t, page = await _timed(lambda: self.client.list_page(leaf, limit=1000))
            result.add("prefix_ms", t * 1000)
            result.info["prefix_names"] = len(page["files"])
            t, page = await _timed(lambda: self.client.list_page("", limit=1000))
            result.add("first_page_ms", t * 1000)
            t, page = await _timed(lambda: self.client.list_page("", delimiter="/", limit=1000))
            result.add("delimiter_ms", t * 1000)
            result.info["top_prefixes"] = len(page["prefixes"])
            name = self.shape.name(self.rng.randrange(self.files))
            t, st = await _timed(functools.partial(self.client.stat, name))
            if st["name"] != name:
                raise ScaleError(f"stat of {name} answered {st['name']}")
            result.add("stat_ms", t * 1000)
            name = self.shape.name(self.rng.randrange(self.files))
            t, st = await _timed(functools.partial(session.stat, name))
            if st["name"] != name:
                raise ScaleError(f"stat of {name} answered {st['name']}")
            result.add("stat_session_ms", t * 1000)
            before = await trio.to_thread.run_sync(self.downloads_seconds)
            t, _ = await _timed(functools.partial(self.client.download, small[i % len(small)], work / "copy"))
            result.add("download_ms", t * 1000)
            after = await trio.to_thread.run_sync(self.downloads_seconds)
            if before is not None and after is not None and after[1] == before[1] + 1:
                result.add("download_api_ms", (after[0] - before[0]) * 1000)
            t, _ = await _timed(self.connect_only)
            result.add("connect_ms", t * 1000)
            other = self.shape.name(self.rng.randrange(self.files))
            start = time.perf_counter()
            found = await trio.to_thread.run_sync(db.lookup, other)
            result.add("db_lookup_ms", (time.perf_counter() - start) * 1000)
            if found is None or len(found.fragments) != 8:
                raise ScaleError(f"the registry lookup of {other} found {found}")
            start = time.perf_counter()
            await trio.to_thread.run_sync(db.list_page, ListQuery(leaf, limit=1000, paged=True))
            result.add("db_page_ms", (time.perf_counter() - start) * 1000)

    async def connect_only(self) -> None:
        """A connection as each request opens one, closed at once (the ``/status`` path,
        its answer not waited for): what every time above includes besides the work."""
        async with self.client._connect("/status"):
            pass

    def downloads_seconds(self) -> tuple[float, float] | None:
        """The API's ``karma8_api_download_duration_seconds`` (handshake to last frame, in
        the server): (sum, count) of complete downloads so far; None: no metrics port."""
        port = self.stack.api.info.get("metrics_port")
        if not port:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found = dict(re.findall(r"^karma8_api_download_duration_seconds_(sum|count) (\S+)$", text, re.M))
        if "sum" not in found or "count" not in found:
            return None
        return float(found["sum"]), float(found["count"])

    async def walk(self, result: Result, expected: int) -> None:
        """``karma8 ls -r`` to the end, its lines counted here."""
        err = self.root / "logs" / "ls.err"
        with err.open("wb") as stderr:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", _LS, "ls", "-r", "--api", self.stack.url],
                stdout=-1,  # subprocess.PIPE
                stderr=stderr,
                env=self.stack.env,
            )
        api = Peak(self.api_pid)
        lines = 0
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(api.sample)
            assert proc.stdout is not None
            while chunk := await proc.stdout.receive_some(1 << 16):
                lines += chunk.count(b"\n")
            await proc.wait()
            seconds = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        text = err.read_text(errors="replace")
        if proc.returncode != 0 or lines != expected:
            raise ScaleError(
                f"ls -r exited {proc.returncode} after {lines} of {expected} names:\n{text[-2000:]}"
            )
        client_kib = [
            int(line.split()[1]) for line in text.splitlines() if line.startswith("scale-maxrss-kib ")
        ]
        result.add("walk_s", seconds)
        result.add("walk_names_per_s", lines / seconds)
        result.add("walk_api_rss_mb", _mb(api.read()))
        if client_kib:
            result.add("walk_client_rss_mb", client_kib[-1] * 1024 / MB)
        result.info["walk_names"] = lines

    async def restart_api(self, result: Result) -> None:
        await self.stack.stop(self.stack.api)
        seconds, _ = await _timed(lambda: self.stack.start(self.stack.api))
        result.add("api_start_s", seconds)
        result.add("api_rss_mb", _mb(status_bytes(self.api_pid, "VmRSS")))
        await self.wait_live(BUCKETS)

    async def plan(self, result: Result, repeat: int, deadline: float) -> None:
        """2 empty buckets join; the rebalancer's plan, ``repeat`` times (one that takes
        longer than ``deadline`` seconds is given up: the API is restarted, as it would go on
        planning with the registry held)."""
        async with trio.open_nursery() as nursery:
            for bucket in self.stack.buckets[BUCKETS:]:
                nursery.start_soon(self.stack.start, bucket)
        await self.wait_live(BUCKETS + JOINING)
        for _ in range(repeat):
            api = Peak(self.api_pid)
            with trio.move_on_after(deadline) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(api.sample)
                    seconds, plan = await _timed(functools.partial(self.client.rebalance, dry_run=True))
                    nursery.cancel_scope.cancel()
            result.add("plan_api_rss_mb", _mb(api.read()))
            if scope.cancelled_caught:
                result.add("plan_s", deadline)
                result.unfinished.add("plan_s")
                note(f"{self.files:,} files: no plan after {deadline:g} s; restarting the API")
                await self.stack.kill(self.stack.api)
                await self.stack.start(self.stack.api)
                await self.wait_live(BUCKETS + JOINING)
                return
            result.add("plan_s", seconds)
            result.info["plan_moves"] = int(plan["count"])

    async def reconcile(self, result: Result, bucket_id: str) -> None:
        """Only bucket 0 live; the lease let go; the API reconciles bucket 0: time it by its log."""
        async with trio.open_nursery() as nursery:
            for bucket in self.stack.buckets[1:]:
                nursery.start_soon(self.stack.stop, bucket)
        await self.wait_live(1)
        log = self.stack.api.log
        offset = log.stat().st_size
        api = Peak(self.api_pid)
        timeout = 300 + self.files / 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(api.sample)
            await trio.to_thread.run_sync(lambda: hold_leases(self.db_url, release=True))
            with trio.move_on_after(timeout):
                while (times := _reconciled(log, offset, bucket_id)) is None:  # noqa: ASYNC110 (its log)
                    await trio.sleep(POLL)
            nursery.cancel_scope.cancel()
        if times is None:
            raise ScaleError(f"bucket 0 not reconciled {timeout:g} s after the lease was let go")
        seconds, message = times
        result.add("reconcile_s", seconds)
        result.add("reconcile_api_rss_mb", _mb(api.read()))
        row = next(b for b in (await self.client.status())["buckets"] if b["id"] == bucket_id)
        listed = re.search(r"reconciled: (\d+) fragment", message)
        result.info["reconcile_listed"] = int(listed.group(1)) if listed else None
        result.info["reconcile_unknown"] = row["unknown_fragments"]
        result.info["reconcile_missing"] = row["missing_fragments"]
        result.info["reconcile_log"] = message


def _reconciled(log: Path, offset: int, bucket_id: str) -> tuple[float, str] | None:
    """Seconds from the API taking the reconciler's lease to its "reconciled" line for
    ``bucket_id``, from its JSON log after ``offset`` (None: not yet)."""
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    took = None
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = str(entry.get("msg", ""))
        ts = datetime_ts(str(entry.get("ts", "")))
        if msg.startswith("holding the lease on reconciler"):
            took = ts
        elif took is not None and msg.startswith(f"bucket={bucket_id} reconciled"):
            return ts - took, msg
    return None


def datetime_ts(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def run_size(
    root: Path,
    files: int,
    built: dict[str, Any],
    url: str | None,
    db_url: str,
    repeat: int,
    slow_repeat: int,
    plan_timeout: float,
    log_level: str,
    skip: frozenset[str] = frozenset(),
) -> Result:
    """Everything measured on the registry of ``files`` files built under ``root``."""
    result = Result(files)
    result.info.update(built)
    result.add("build_s", float(built["build_s"]))
    result.add("build_files_per_s", files / float(built["build_s"]))
    result.add("bytes_per_file", int(built["registry_bytes"]) / files)
    # Bucket 0 scans its fragment files at start: give it time.
    chaos_stack.START_TIMEOUT = max(chaos_stack.START_TIMEOUT, 60 + files / 5000)
    await trio.to_thread.run_sync(hold_leases, db_url)
    run = Run(root, files, url, db_url, log_level)
    work = root / "work"
    work.mkdir(exist_ok=True)
    try:
        note(f"{files:,} files: starting the stack")
        result.info["first_start_s"] = await run.start()
        small = await run.upload_small(work)
        note(f"{files:,} files: requests")
        await run.quick(result, repeat, small, work)
        for i in range(0 if "walk" in skip else slow_repeat):
            note(f"{files:,} files: ls -r ({i + 1} of {slow_repeat})")
            await run.walk(result, files + len(small))
        note(f"{files:,} files: API restarts")
        for _ in range(repeat):
            await run.restart_api(result)
        if "plan" not in skip:
            note(f"{files:,} files: 2 buckets join; the rebalancer's plan")
            await run.plan(result, slow_repeat, plan_timeout)
        if "reconcile" not in skip:
            note(f"{files:,} files: reconciliation of bucket 0")
            await run.reconcile(result, str(built["buckets"][0]))
    finally:
        await run.stack.aclose()
    return result
