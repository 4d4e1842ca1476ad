"""The real-stack mode of the balance benchmark: its phases, on a local stack.

1. Start the API and ``initial`` buckets; upload the first corpus.
2. Start ``added`` buckets.
3. Let the automatic rebalancer run (started by the buckets joining), wait until it is
   idle, its stale copies are deleted and every bucket's own figures have caught up.
4. Upload the second corpus.
5. Download a sample (half of it files whose fragments were moved) and compare them with
   the originals.

After each phase the table shows every bucket's own ``used`` (bytes on its disk, from
its heartbeats), once it equals what the registry places there: nothing is pending.
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from balance_model import BalanceError, Corpus, Options, Phase, Report, format_phase, minimum_to_move
from balance_stack import Stack

from karma8.core import balance
from karma8.errors import Karma8Error

POLL = 0.2
#: Free disk needed beyond the two corpora: temporary copies, downloads, stale copies.
DISK_MARGIN = 1.25


def note(message: str) -> None:
    """Progress on stderr; stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def check_disk(options: Options, root: Path) -> None:
    """Refuse to start without room for both corpora (and what moves in between)."""
    need = sum(sum(c.sizes()) for c in options.corpora())
    need = math.ceil(need * DISK_MARGIN) + options.concurrency * options.high + 256 * 2**20
    free = shutil.disk_usage(root).free
    if free < need:
        raise BalanceError(f"{root} has {free / 2**30:.1f} GiB free; the run needs {need / 2**30:.1f} GiB")


@dataclass
class Run:
    """One real-stack run: its stack, its report, and what it learned on the way."""

    stack: Stack
    options: Options
    report: Report = field(default_factory=Report)
    #: Bucket key (``bucket-NN``) -> bucket id, in start order.
    ids: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    #: Rebalancer runs seen after the buckets were added, by start time.
    runs: dict[float, dict[str, Any]] = field(default_factory=dict)
    #: When the buckets were added (wall clock, as the API's rebalancer reports it).
    added_at: float = math.inf
    verified: int = 0
    moved_files_verified: int = 0
    problems: list[str] = field(default_factory=list)

    def labels(self) -> dict[str, str]:
        return {key: f"{key} {bucket_id[:8]}" for key, bucket_id in self.ids.items()}

    def show(self, phase: Phase) -> None:
        self.report.phases.append(phase)
        print(*format_phase(phase, self.labels()), sep="\n", flush=True)

    # -- phases ------------------------------------------------------------------------

    async def add_buckets(self, count: int, capacity: int) -> None:
        for child in await self.stack.add_buckets(count, capacity):
            self.ids[child.name] = str(child.info["bucket_id"])
        await self.stack.wait_live(len(self.ids))

    async def upload(self, corpus: Corpus, work: Path) -> None:
        """Upload every file of ``corpus``, ``concurrency`` at a time."""
        sizes = corpus.sizes()
        send, receive = trio.open_memory_channel[int](0)
        done = 0
        start = time.monotonic()

        async def worker(slot: int, receive: trio.MemoryReceiveChannel[int]) -> None:
            nonlocal done
            path = work / f"upload-{slot}"
            async with receive:
                async for index in receive:
                    name = corpus.name(index)
                    self.sha256[name] = await trio.to_thread.run_sync(
                        _write, path, corpus, index, sizes[index]
                    )
                    try:
                        info = await self.stack.client().upload(path, name)
                    except Karma8Error as exc:
                        self.stack.check_running()
                        raise BalanceError(f"upload of {name} failed: {exc}") from exc
                    if info.sha256 != self.sha256[name]:
                        raise BalanceError(f"{name}: stored sha256 {info.sha256}, sent {self.sha256[name]}")
                    done += 1
            await trio.Path(path).unlink(missing_ok=True)

        async with trio.open_nursery() as nursery:
            async with receive:
                for slot in range(self.options.concurrency):
                    nursery.start_soon(worker, slot, receive.clone())
            async with send:
                for index in range(len(sizes)):
                    await send.send(index)
        took = time.monotonic() - start
        total = sum(sizes)
        note(f"  {done} files, {total / 2**20:.1f} MiB in {took:.1f} s ({total / took / 1e6:.1f} MB/s)")

    async def settle(self, what: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll /status until ``done`` and every bucket's figures equal the registry's."""
        deadline = trio.current_time() + self.deadline()
        while True:
            status = await self.stack.status()
            self._record_runs(status["rebalancer"])
            if status["live"] == len(self.ids) and caught_up(status) and done(status):
                return status
            if trio.current_time() > deadline:
                raise BalanceError(
                    f"{what}: not settled within {self.deadline():.0f} s; last status:\n{status}"
                )
            await trio.sleep(POLL)

    def deadline(self) -> float:
        """Seconds a phase may take to settle: ``timeout``, plus moving the first corpus whole."""
        bandwidth = self.options.bandwidth
        first = sum(self.options.corpora()[0].sizes())
        return self.options.timeout + (first / bandwidth if bandwidth else 0)

    def _record_runs(self, rebalancer: dict[str, Any]) -> None:
        for progress in (rebalancer, rebalancer.get("last")):
            if progress and progress.get("started") and progress["started"] >= self.added_at:
                self.runs[progress["started"]] = progress

    def phase(
        self, name: str, status: dict[str, Any], seconds: float, moved: int = 0, minimum: int = 0
    ) -> Phase:
        by_id = {b["id"]: b for b in status["buckets"]}
        used = {key: int(by_id[bucket_id]["used"]) for key, bucket_id in self.ids.items()}
        capacity = {key: int(by_id[bucket_id]["capacity"]) for key, bucket_id in self.ids.items()}
        return Phase(name, used, capacity, moved, minimum, seconds, int(status["parts"]))

    async def verify(self, corpora: tuple[Corpus, Corpus], work: Path, moved_to: set[str]) -> None:
        """Download a sample and compare with the originals; half of it had fragments moved."""
        client = self.stack.client()
        listed = {f["name"] for f in await client.list("balance/")}
        expected = {c.name(i) for c in corpora for i in range(c.files)}
        if listed != expected:
            lost, extra = sorted(expected - listed), sorted(listed - expected)
            self.problems.append(f"listing: {len(lost)} file(s) missing {lost[:5]}, {len(extra)} unexpected")
        rng = random.Random(self.options.seed)
        first = [corpora[0].name(i) for i in range(corpora[0].files)]
        rng.shuffle(first)
        moved: list[str] = []
        for name in first:
            if len(moved) >= self.options.verify // 2:
                break
            stat = await client.stat(name)
            if any(p["bucket"] in moved_to for p in stat["parts"]):
                moved.append(name)
        rest = sorted(expected - set(moved))
        sample = moved + rng.sample(rest, min(len(rest), self.options.verify - len(moved)))
        path = work / "download"
        for name in sample:
            try:
                info = await client.download(name, path)
            except Karma8Error as exc:
                self.problems.append(f"download of {name} failed: {exc}")
                continue
            digest = await trio.to_thread.run_sync(_sha256_file, path)
            if digest != self.sha256[name] or info.sha256 != digest:
                self.problems.append(f"{name}: downloaded sha256 {digest}, uploaded {self.sha256[name]}")
            else:
                self.verified += 1
                self.moved_files_verified += name in moved
        await trio.Path(path).unlink(missing_ok=True)


def caught_up(status: dict[str, Any]) -> bool:
    """Every live bucket holds exactly what the registry places there (nothing pending)."""
    return all(
        b["used"] == b["placed"] and b["fragments"] == b["placed_fragments"]
        for b in status["buckets"]
        if b["live"]
    )


def idle(status: dict[str, Any]) -> bool:
    return bool(status["rebalancer"]["state"] == "idle")


def _write(path: Path, corpus: Corpus, index: int, size: int) -> str:
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        for block in corpus.blocks(index, size):
            hasher.update(block)
            f.write(block)
    return hasher.hexdigest()


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            hasher.update(block)
    return hasher.hexdigest()


async def run_phases(stack: Stack, options: Options, work: Path) -> Run:
    """Every phase of the benchmark on ``stack`` (its API not started yet)."""
    run = Run(stack, options)
    first, second = options.corpora()

    start = time.monotonic()
    await stack.start_api()
    await run.add_buckets(options.initial, options.capacity)
    live_at = trio.current_time()
    note(f"stack up at {stack.url} with {options.initial} buckets in {time.monotonic() - start:.1f} s")

    note(f"uploading the first corpus (seed {first.seed})")
    start = time.monotonic()
    await run.upload(first, work)
    status = await run.settle("first corpus", idle)
    run.show(run.phase("first corpus", status, time.monotonic() - start))
    placed = {key: int(b["placed"]) for key, b in _by_key(run, status).items()}

    # The initial buckets' joining requested a run (which finds nothing to move) due
    # ``delay`` after they joined. Were it still pending, it would start as soon as the
    # first added bucket is live, maybe before the others: the run would not be the one
    # the buckets added together get. A fixed wait, because the timer is the API's.
    await trio.sleep_until(live_at + options.delay + 1.0)
    note(f"adding {options.added} bucket(s)")
    start = time.monotonic()
    run.added_at = time.time()
    old = set(run.ids)
    await run.add_buckets(options.added, options.new_capacity)
    new = {key: bucket_id for key, bucket_id in run.ids.items() if key not in old}
    status = await stack.status()
    run.show(run.phase(f"{options.added} buckets added", status, time.monotonic() - start))
    # The fills just before the rebalance: the first corpus, and nothing on the new buckets.
    capacity = {key: int(b["capacity"]) for key, b in _by_key(run, status).items()}
    parts = int(status["parts"])
    minimum = minimum_to_move({k: placed.get(k, 0) for k in run.ids}, capacity, parts)

    note("waiting for the rebalancer (started by the buckets joining)")
    start = time.monotonic()

    def rebalanced(status: dict[str, Any]) -> bool:
        fills = [
            balance.Fill(key, int(b["placed"]), int(b["capacity"])) for key, b in _by_key(run, status).items()
        ]
        finished = any(r.get("finished") for r in run.runs.values())
        return idle(status) and finished and balance.imbalance(fills, parts) <= 1 + options.threshold

    status = await run.settle("rebalance", rebalanced)
    moved = sum(int(r["moved"]) for r in run.runs.values())
    run.show(run.phase("rebalanced", status, time.monotonic() - start, moved, minimum))
    for r in run.runs.values():
        took = (r["finished"] or 0) - r["started"]
        note(
            f"  rebalancer run ({r['reason']}): {r['moves']} moves, {r['moved'] / 2**20:.1f} MiB,"
            f" {r['failed']} failed, {took:.1f} s"
        )

    note(f"uploading the second corpus (seed {second.seed})")
    start = time.monotonic()
    await run.upload(second, work)
    status = await run.settle("second corpus", idle)
    run.show(run.phase("second corpus", status, time.monotonic() - start))

    note(f"verifying {options.verify} files")
    start = time.monotonic()
    await run.verify((first, second), work, set(new.values()))
    note(
        f"  {run.verified} byte-identical ({run.moved_files_verified} with moved fragments)"
        f" in {time.monotonic() - start:.1f} s"
    )
    return run


def _by_key(run: Run, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_id = {b["id"]: b for b in status["buckets"]}
    return {key: by_id[bucket_id] for key, bucket_id in run.ids.items()}
