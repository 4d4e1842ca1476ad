"""The rebalancer: moves fragments from the fullest buckets to the emptiest.

A run asks the registry for one move at a time (:meth:`Registry.start_move`, which plans
with :func:`karma8.core.balance.plan` and records the move in the same transaction) and
keeps up to ``rebalance_concurrency`` moves under way. A move:

1. streams the fragment from its bucket (``Get``, which checks the fragment's footer) to
   the destination (``Put``: temp file, fsync, rename), throttled to
   ``rebalance_bandwidth`` bytes per second for all moves together;
2. checks the copy's sha256 against the one recorded when the file was committed;
3. switches the fragment's row to the destination in one transaction, and only if the
   file is still the same committed version; the source copy becomes *stale*;
4. leaves the stale copy to the janitor, which deletes it once no download holds a
   lease on the file (downloads that started before the switch still read it).

A failed or cancelled move is abandoned: its destination copy becomes stale and the
janitor deletes it. A crash leaves the move's row in the registry; the next start turns
it into a stale copy the same way. Nothing a client reads ever changes under it.

Runs start when a bucket joins (after ``rebalance_delay``, so buckets added together are
balanced at once), when the spread exceeds ``rebalance_threshold`` (checked every
``rebalance_interval``), and by hand (``karma8 rebalance``). A run evens the buckets out
to half the threshold.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio
from prometheus_client import CollectorRegistry

from karma8.api.cluster import Cluster
from karma8.api.errors import registry_away
from karma8.api.janitor import Janitor
from karma8.api.metrics import ApiMetrics
from karma8.api.streams import bucket_step, open_bucket_stream
from karma8.config import ApiConfig
from karma8.core import balance
from karma8.errors import BucketUnavailable, ChecksumMismatch, Karma8Error
from karma8.registry import MoveRow, Registry
from karma8.registry.leases import Fence, LeaseLost
from karma8.registry.planning import Plan

log = logging.getLogger(__name__)

#: Runs in a row while moves keep failing but others succeed (then wait for the next trigger).
MAX_ROUNDS = 3


class Throttle:
    """Paces byte transfers to ``rate`` bytes per second overall (0: no limit)."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._next = -math.inf

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may go."""
        if not self._rate:
            return
        start = max(trio.current_time(), self._next)
        self._next = start + nbytes / self._rate
        await trio.sleep_until(start)


@dataclass
class Progress:
    """What the rebalancer is doing (``status`` shows it)."""

    state: str = "idle"
    reason: str = ""
    #: Bytes the plan expected to move when the run started.
    planned: int = 0
    moved: int = 0
    moves: int = 0
    failed: int = 0
    started: float | None = None
    finished: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Rebalancer:
    """Keeps the buckets evenly filled by moving fragments between them."""

    def __init__(
        self,
        registry: Registry,
        cluster: Cluster,
        janitor: Janitor,
        config: ApiConfig,
        *,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self._registry = registry
        # Without one (tests of the schedule alone) it counts into a registry of its own.
        self._metrics = metrics if metrics is not None else ApiMetrics(CollectorRegistry())
        #: Moves the current run's plan made, and moves of the run that ended (any result).
        self._planned_moves = 0
        self._ended_moves = 0
        self._cluster = cluster
        self._janitor = janitor
        self._config = config
        self._throttle = Throttle(config.rebalance_bandwidth)
        self._wake = trio.Event()
        self._due = math.inf
        self._reason = ""
        #: The run due was scheduled by a join (another join postpones it).
        self._joins_pending = False
        self.progress = Progress()
        #: The last finished run.
        self.last: Progress | None = None
        #: Whether to run now (this server holds the rebalancer's lease), and the lease
        #: to fence the moves with (karma8/api/coordination.py).
        self.active: Callable[[], bool] = lambda: True
        self.fence: Callable[[], Fence | None] = lambda: None
        self._fence: Fence | None = None

    @property
    def tolerance(self) -> float:
        """Where a run stops: half the threshold that starts one."""
        return self._config.rebalance_threshold / 2

    def wake(self) -> None:
        """Look at the schedule now (this server took the rebalancer's lease)."""
        self._wake.set()

    def request(self, reason: str) -> None:
        """Start a run now."""
        self._due, self._reason, self._joins_pending = trio.current_time(), reason, False
        self._wake.set()

    def joined(self, bucket_id: str) -> None:
        """A bucket (re-)registered: rebalance ``rebalance_delay`` after the last join.

        Each join postpones a run that a join scheduled, so buckets added together are
        balanced by one run (a run asked for by hand is not postponed).
        """
        if not self._config.rebalance_auto:
            return
        due = trio.current_time() + self._config.rebalance_delay
        if self._joins_pending:
            self._due = max(self._due, due)
        elif due < self._due:
            self._due, self._reason = due, f"bucket {bucket_id} joined"
            self._joins_pending = True
        self._wake.set()

    async def fills(self) -> list[balance.Fill]:
        """The live buckets' fills as the registry counts them (moves under way as done)."""
        return await self._registry.fills(self._cluster.capacities())

    def spread_parts(self, live: int) -> int:
        """Fragments per file, as balancing counts them: a bucket holds at most one of each
        file's ``parts + parity`` fragments, and with fewer live buckets than that, each
        holds one of every file."""
        return min(self._config.parts + self._config.parity, max(self._config.parts, live))

    async def plan(self) -> Plan:
        """What a run would do now (recorded nowhere): totals, each bucket's change, the
        first moves; bounded (karma8/registry/planning.py)."""
        live = self._cluster.capacities()
        return await self._registry.rebalance_plan(live, self.tolerance, self.spread_parts(len(live)))

    async def run(self) -> None:
        """Forever: runs when requested, and when a periodic check finds the spread too wide."""
        next_check = trio.current_time() + self._config.rebalance_interval
        while True:
            # Without the lease another server runs; a run asked of this one waits for it.
            with trio.move_on_at(min(next_check, self._due) if self.active() else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            if not self.active():
                continue
            if now >= self._due:
                reason, self._due, self._joins_pending = self._reason, math.inf, False
                with registry_away(log, "rebalance"):
                    await self.rebalance(reason)
            elif now >= next_check:
                next_check = now + self._config.rebalance_interval
                if self._config.rebalance_auto:
                    with registry_away(log, "rebalance check"):
                        await self._check()

    async def _check(self) -> None:
        """Rebalance if the spread is too wide."""
        fills = await self.fills()
        spread = balance.imbalance(fills, self.spread_parts(len(fills)))
        if spread > 1 + self._config.rebalance_threshold:
            await self.rebalance(f"spread {spread:.3f} above 1 + {self._config.rebalance_threshold:g}")

    async def rebalance(self, reason: str) -> Progress:
        """One run: move fragments until the buckets are even (or nothing more can move)."""
        # Runs do not overlap: a move this server still has recorded is one whose end
        # could not reach the registry (it was away), and nothing will finish it.
        if left := await self._registry.abandon_own_moves():
            log.warning("%d move(s) an earlier run could not finish are abandoned; their copies go", left)
            self._janitor.poke()
        plan = await self.plan()
        planned, count = plan.bytes, plan.count
        if not planned:
            log.debug("rebalance (%s): nothing can move closer to balance", reason)
            return Progress(reason=reason, finished=time.time())
        log.info(
            "rebalance (%s): %d bytes to move in %d move(s)%s",
            reason,
            planned,
            count,
            "" if plan.complete else " at least (the plan stops there; the run goes on until even)",
        )
        self.progress = progress = Progress("moving", reason, planned, started=time.time())
        self._planned_moves, self._ended_moves = count, 0
        self._metrics.rebalance_runs.inc()
        self._metrics.rebalance_running.set(1)
        self._metrics.rebalance_pending_moves.set(count)
        skip: set[tuple[str, int]] = set()
        broken: set[str] = set()
        self._fence = self.fence()  # the run's moves are made under this lease, or dropped
        try:
            for _ in range(MAX_ROUNDS):
                failed = progress.failed
                moved = progress.moves
                await self._round(progress, skip, broken)
                if progress.failed == failed or progress.moves == moved:
                    break
        finally:
            progress.state = "idle"
            progress.finished = time.time()
            self.progress = Progress()
            self.last = progress
            self._metrics.rebalance_running.set(0)
            self._metrics.rebalance_pending_moves.set(0)
        log.info(
            "rebalance (%s) done: moved %d bytes in %d move(s), %d failed, in %.1f s",
            reason,
            progress.moved,
            progress.moves,
            progress.failed,
            progress.finished - (progress.started or progress.finished),
        )
        return progress

    async def _round(self, progress: Progress, skip: set[tuple[str, int]], broken: set[str]) -> None:
        slots = trio.Semaphore(self._config.rebalance_concurrency)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                live = {b: c for b, c in self._cluster.capacities().items() if b not in broken}
                try:
                    move = await self._registry.start_move(
                        live, self.tolerance, self.spread_parts(len(live)), skip, self._fence
                    )
                except LeaseLost as exc:
                    log.warning("rebalance stopped: %s", exc)
                    move = None
                if move is None:
                    slots.release()
                    return
                nursery.start_soon(self._move, move, progress, skip, broken, slots)

    async def _move(
        self,
        move: MoveRow,
        progress: Progress,
        skip: set[tuple[str, int]],
        broken: set[str],
        slots: trio.Semaphore,
    ) -> None:
        try:
            await self._copy(move)
        except (Karma8Error, trio.TooSlowError) as exc:
            progress.failed += 1
            self._moved("failed")
            skip.add((move.upload_id, move.part))
            if isinstance(exc, BucketUnavailable):
                broken.add(exc.bucket_id)
            log.warning(
                "move upload=%s part %d from bucket=%s to %s failed: %s",
                move.upload_id,
                move.part,
                move.src,
                move.dst,
                exc,
            )
            await self._abandon(move)
            return
        except BaseException:
            await self._abandon(move)
            raise
        finally:
            slots.release()
        # A fragment moves at most once per run (a dry run plans it that way too).
        skip.add((move.upload_id, move.part))
        try:
            switched = await self._registry.finish_move(move, self._fence)
        except LeaseLost as exc:
            switched = False
            log.warning("move upload=%s part %d dropped: %s", move.upload_id, move.part, exc)
        if switched:
            progress.moved += move.size
            progress.moves += 1
            progress.planned = max(progress.planned, progress.moved)
            self._metrics.rebalance_moved_bytes.inc(move.size)
            self._moved("done")
            log.debug(
                "moved upload=%s part %d (%d bytes) from bucket=%s to %s",
                move.upload_id,
                move.part,
                move.size,
                move.src,
                move.dst,
            )
        else:
            self._moved("discarded")
            log.info(
                "move upload=%s part %d: the file changed meanwhile; the copy is discarded",
                move.upload_id,
                move.part,
            )
        self._janitor.poke()

    def _moved(self, result: str) -> None:
        self._ended_moves += 1
        self._metrics.rebalance_moves.labels(result).inc()
        # An estimate: a later round of the run may plan a few more moves.
        self._metrics.rebalance_pending_moves.set(max(0, self._planned_moves - self._ended_moves))

    async def _abandon(self, move: MoveRow) -> None:
        with trio.move_on_after(self._config.cleanup_timeout, shield=True):
            await self._registry.abandon_move(move)
            self._janitor.poke()

    async def _copy(self, move: MoveRow) -> None:
        """Copy the fragment to its destination; its checksum must be the committed one."""
        config = self._config
        src = self._cluster.client(move.src)
        dst = self._cluster.client(move.dst)
        async with contextlib.AsyncExitStack() as stack:
            reader = await open_bucket_stream(
                stack, src, src.open_get(move.fragment_id, config.stripe_unit), config.connect_timeout
            )
            writer = await open_bucket_stream(
                stack, dst, dst.open_put(move.fragment_id, move.size, move.unit), config.connect_timeout
            )
            copied = 0
            while (chunk := await bucket_step(src, reader.receive(), config.idle_timeout)) is not None:
                copied += len(chunk.data)
                if copied > move.size:
                    raise BucketUnavailable(move.src, f"{move.fragment_id} is longer than recorded")
                await self._throttle.take(len(chunk.data))
                # Units and their checksums pass through: the destination checks them.
                await bucket_step(dst, writer.send(chunk.data, chunk.crcs), config.idle_timeout)
            stored = await bucket_step(dst, writer.finish(), config.idle_timeout)
        if stored.sha256 != move.sha256:
            raise ChecksumMismatch(
                f"copy of {move.fragment_id} on {move.dst} has sha256 {stored.sha256}, expected {move.sha256}"
            )
