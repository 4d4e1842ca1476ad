"""The repairer: rebuilds lost, damaged and owed fragments from the queue in the registry.

The queue (karma8/registry/repairs.py) is fed by uploads that met their quorum without
every fragment, downloads that had to read around one, reconciliation and scrub, and
buckets not live for ``repair_after`` (a bucket down for less triggers nothing). The
repairer takes the files most at risk first, up to ``repair_concurrency`` at once.

Repairing one file:

1. decide which parts to rebuild: owed, never placed (the file was written on too few
   buckets), known bad, or on a bucket lost for ``repair_after``. Parts on a bucket that
   is down for less are neither read nor rebuilt;
2. choose a live bucket for each, holding no fragment (and no stale copy) of the file,
   by the placement rule (least filled relative to capacity);
3. record the new copies as moves (a crash leaves them to the janitor);
4. read the file stripe by stripe from the other fragments (any ``k`` serve; see
   karma8/api/reading.py), re-encode it and write just the parts being rebuilt
   (karma8/api/writing.py); the whole file's sha256 must match the committed one;
5. switch each rebuilt part's row to its new copy in one transaction, and only if the
   file is still the same committed version; old copies become stale.

Reads are throttled to ``repair_bandwidth`` bytes per second for all repairs together,
except for files with no fragment to spare, which go unthrottled. A file that cannot be
finished now (too few buckets, too few readable fragments) is tried again later, with
backoff; the queue row stays until the file has every fragment of its scheme.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import trio

from karma8.api.cluster import Cluster
from karma8.api.errors import first_error, registry_away
from karma8.api.janitor import Janitor, ReadLeases
from karma8.api.metrics import ApiMetrics
from karma8.api.pool import Bucket, Limits
from karma8.api.reading import damaged, read_fragments
from karma8.api.rebalance import Throttle
from karma8.api.writing import Written, write_fragments
from karma8.config import ApiConfig
from karma8.core.coding import Scheme
from karma8.core.fragments import new_upload_id
from karma8.core.layout import Layout
from karma8.core.placement import Candidate, choose_buckets
from karma8.errors import ChecksumMismatch, Karma8Error, NotEnoughBuckets, RegistryUnavailable
from karma8.registry import FragmentRow, Registry, RepairRow, UploadRow
from karma8.registry.leases import Fence, LeaseLost

log = logging.getLogger(__name__)

#: Longest wait before a file that could not be repaired is tried again.
MAX_BACKOFF = 300.0


@dataclass
class RepairProgress:
    """What the repairer has done since this process started (``status`` shows it)."""

    running: int = 0
    files: int = 0
    fragments: int = 0
    bytes: int = 0
    failed: int = 0
    started: float | None = None

    @property
    def rate(self) -> float:
        """Bytes read per second since the first repair began (0 before)."""
        if self.started is None:
            return 0.0
        return self.bytes / max(time.time() - self.started, 1e-3)

    def eta(self, queued_bytes: int) -> float | None:
        """Seconds to repair ``queued_bytes`` at the rate so far (None: no rate yet)."""
        rate = self.rate
        return round(queued_bytes / rate, 1) if rate > 0 else None

    def as_dict(self) -> dict[str, object]:
        return {
            "running": self.running,
            "repaired_files": self.files,
            "repaired_fragments": self.fragments,
            "read_bytes": self.bytes,
            "failed": self.failed,
            "rate": round(self.rate),
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one repair of one file will do."""

    rebuild: frozenset[int]
    #: part -> bucket to read from.
    sources: dict[int, Bucket]
    #: part -> bucket the rebuilt fragment goes to.
    targets: dict[int, str]
    #: part -> the bucket its row names now (None: no row).
    replaced: dict[int, str | None]
    #: Parts on buckets briefly down: neither read nor rebuilt now.
    waiting: frozenset[int]


class Repairer:
    """Works through the repair queue; one instance per API server."""

    def __init__(
        self,
        registry: Registry,
        cluster: Cluster,
        janitor: Janitor,
        leases: ReadLeases,
        config: ApiConfig,
        metrics: ApiMetrics,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._cluster = cluster
        self._janitor = janitor
        self._leases = leases
        self._config = config
        self._throttle = Throttle(config.repair_bandwidth)
        self._wake = trio.Event()
        self._running: set[str] = set()
        self._retry_all = False
        self.progress = RepairProgress()
        #: Whether to repair now (this server holds the repair lease), and the lease to
        #: fence the repair's writes with (karma8/api/coordination.py).
        self.active: Callable[[], bool] = lambda: True
        self.fence: Callable[[], Fence | None] = lambda: None

    def poke(self) -> None:
        """Look at the queue now (a repair was queued)."""
        self._wake.set()

    def joined(self) -> None:
        """A bucket (re-)joined: files waiting for a target may find one now."""
        self._retry_all = True
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run forever: check lost buckets and the queue every ``repair_interval`` or when poked.

        Started at once: the files stored with less protection than today's are queued
        first, but after the server is ready (on a registry of an earlier release that is
        a walk of every upload: 14 s at 10M files)."""
        task_status.started()
        with registry_away(log, "queueing files to upgrade"):
            queued = await self._registry.queue_upgrades(self._config.parity)
            if queued:
                log.info(
                    "repair: %d file(s) stored with less protection than %d parity queued",
                    queued,
                    self._config.parity,
                )
        async with trio.open_nursery() as nursery:
            while True:
                with registry_away(log, "repair round"):
                    await self._round(nursery)
                with trio.move_on_after(self._config.repair_interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def run_once(self) -> None:
        """One round, waiting for every repair it starts (tests and ``karma8 repair``)."""
        async with trio.open_nursery() as nursery:
            await self._round(nursery)

    async def _round(self, nursery: trio.Nursery) -> None:
        if not self.active():
            return
        if self._retry_all:
            self._retry_all = False
            await self._registry.retry_repairs_now()
        lost = self._cluster.lost(self._config.repair_after)
        if lost:
            n = await self._registry.queue_lost_buckets(lost)
            if n:
                log.warning("repair: bucket(s) %s lost; %d file(s) queued", ",".join(lost), n)
        # Not repair_summary(): that one also sums the files table, which grows with the store.
        queued, at_risk = await self._registry.repair_counts()
        self._metrics.repair_queue.set(queued)
        self._metrics.repair_at_risk.set(at_risk)
        free = self._config.repair_concurrency - len(self._running)
        if free <= 0:
            return
        for row in await self._registry.due_repairs(free, skip=self._running):
            self._running.add(row.upload_id)
            nursery.start_soon(self._repair_one, row)

    async def _repair_one(self, row: RepairRow) -> None:
        self.progress.running += 1
        if self.progress.started is None:
            self.progress.started = time.time()
        # The fragments a repair's read went around, also when the read then failed.
        failed_reads: dict[int, Karma8Error] = {}
        try:
            with self._leases.hold(row.upload_id):
                await self._repair(row, failed_reads)
        except LeaseLost as exc:
            log.warning("upload=%s repair dropped: %s", row.upload_id, exc)
        except RegistryUnavailable as exc:  # it stays queued; tried again once the registry is back
            log.warning("upload=%s repair stopped: %s", row.upload_id, exc.message)
        except Karma8Error as exc:
            self.progress.failed += 1
            self._metrics.repairs.labels("failed").inc()
            log.warning("upload=%s repair failed: %s", row.upload_id, exc.message)
            # A damaged fragment the read ran into is rebuilt next time, not read again,
            # and soon: the file is one fault closer to loss.
            found = damaged(failed_reads) - row.bad
            delay = self._config.repair_interval if found else _backoff(row.attempts)
            await self._registry.repair_later(row.upload_id, row.spare, row.bad | found, delay)
        finally:
            self.progress.running -= 1
            self._running.discard(row.upload_id)

    async def _repair(self, row: RepairRow, failed_reads: dict[int, Karma8Error]) -> None:
        upload = await self._registry.upload(row.upload_id)
        if upload is None or upload.state != "committed":
            await self._registry.repair_done(row.upload_id)
            return
        if upload.format < 2 or upload.parity < self._config.parity:
            # Stored before erasure coding, or with less parity than configured now.
            await self._upgrade(upload, row)
            return
        fragments = await self._registry.fragments(row.upload_id)
        plan = await self._plan(upload, fragments, row)
        scheme = upload.scheme
        spare = len(plan.sources) - scheme.data
        if not plan.rebuild:
            if plan.waiting:
                await self._registry.repair_later(row.upload_id, spare, row.bad, self._config.repair_interval)
            else:
                await self._registry.repair_done(row.upload_id)
            return
        if spare < 0:
            if len(plan.sources) + len(plan.waiting) >= scheme.data:
                # Enough fragments sit on buckets that are only down for now (or have not
                # heartbeated since this process started): wait for them.
                await self._registry.repair_later(row.upload_id, spare, row.bad, self._config.repair_interval)
                return
            log.error(
                "upload=%s name=%r: only %d of the %d fragments needed are readable now",
                upload.upload_id,
                upload.name,
                len(plan.sources),
                scheme.data,
            )
            await self._registry.repair_later(row.upload_id, spare, plan.rebuild, _backoff(row.attempts))
            return
        layout = Layout(upload.size, scheme.data, upload.unit, scheme.parity)
        sizes = {p: layout.part_size(p) for p in plan.targets}
        fence = self.fence()
        accepted = await self._registry.start_repair_copies(row.upload_id, plan.targets, sizes, fence)
        targets = {p: b for p, b in plan.targets.items() if p in accepted}
        stored: dict[int, str] = {}
        try:
            if targets:
                stored = await self._copy(upload, layout, plan, targets, failed_reads, throttled=spare > 0)
        finally:
            with trio.CancelScope(shield=True):
                switched = await self._registry.finish_repair_copies(
                    row.upload_id, targets, stored, plan.replaced, sizes, fence
                )
                self._janitor.poke()
        self.progress.fragments += len(switched)
        self._metrics.repaired_fragments.inc(len(switched))
        still = (plan.rebuild - switched) | damaged(failed_reads)
        log.info(
            "upload=%s name=%r repaired part(s) %s%s",
            upload.upload_id,
            upload.name,
            ",".join(map(str, sorted(switched))) or "none",
            f"; still to do: {','.join(map(str, sorted(still)))}" if still else "",
        )
        good = len(plan.sources) - len(failed_reads) + len(switched)
        if still or plan.waiting:
            delay = _backoff(row.attempts) if still else self._config.repair_interval
            await self._registry.repair_later(row.upload_id, good - scheme.data, still, delay)
            self._metrics.repairs.labels("later").inc()
        else:
            self.progress.files += 1
            self._metrics.repairs.labels("done").inc()
            await self._registry.repair_done(row.upload_id)

    async def _plan(self, upload: UploadRow, fragments: list[FragmentRow], row: RepairRow) -> _Plan:
        scheme = upload.scheme
        by_part = {f.part: f for f in fragments}
        rebuild: set[int] = set()
        waiting: set[int] = set()
        sources: dict[int, Bucket] = {}
        for part in range(scheme.width):
            f = by_part.get(part)
            if f is None or f.state != "ok" or part in row.bad:
                rebuild.add(part)
            elif self._cluster.is_live(f.bucket_id):
                sources[part] = self._cluster.client(f.bucket_id)
            elif self._cluster.down_for(f.bucket_id) >= self._config.repair_after:
                rebuild.add(part)
            else:
                waiting.add(part)
        # Never two fragments of a file on one bucket. An owed part's bucket holds nothing
        # of the file (its write failed), so it may take a part.
        taken = {f.bucket_id for f in fragments if f.state != "owed"}
        taken |= await self._registry.stale_buckets(upload.upload_id)
        targets = await self._targets(upload, sorted(rebuild), taken)
        return _Plan(
            frozenset(rebuild),
            sources,
            targets,
            {p: by_part[p].bucket_id if p in by_part else None for p in rebuild},
            frozenset(waiting),
        )

    async def _targets(self, upload: UploadRow, parts: list[int], taken: set[str]) -> dict[int, str]:
        if not parts:
            return {}
        layout = Layout(upload.size, upload.parts, upload.unit, upload.parity)
        placed = await self._registry.placed()
        candidates = [
            Candidate(b.bucket_id, placed.get(b.bucket_id, (0, 0))[0], b.capacity, b.free)
            for b in self._cluster.live()
            if b.bucket_id not in taken
        ]
        try:
            chosen = choose_buckets(
                upload.upload_id, candidates, [layout.part_size(p) for p in parts], required=1
            )
        except NotEnoughBuckets:
            return {}
        return dict(zip(parts, chosen, strict=False))

    async def _pipe(
        self,
        source: UploadRow,
        sources: dict[int, Bucket],
        target: _Target,
        failed: dict[int, Karma8Error],
        *,
        throttled: bool,
    ) -> Written:
        """Read ``source`` from ``sources`` and write ``target``'s fragments from its bytes.

        Returns what was written (with the sha256 of the bytes read); the fragments that
        had to be read around go into ``failed`` as they fail (also when the read fails).
        """
        limits = Limits.of(self._config)
        scheme = source.scheme
        layout = Layout(source.size, scheme.data, source.unit, scheme.parity)
        send, receive = trio.open_memory_channel[bytes](self._config.queue_depth)

        async def deliver(unit: bytes) -> None:
            if throttled:
                await self._throttle.take(len(unit))
            self.progress.bytes += len(unit)
            self._metrics.repair_read_bytes.inc(len(unit))
            await send.send(unit)

        async def read() -> None:
            async with send:
                upload_id, checked = source.upload_id, source.format >= 2
                await read_fragments(deliver, layout, scheme, upload_id, sources, limits, checked, failed)

        async def next_unit() -> bytes:
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                return b""

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                written = await write_fragments(
                    next_unit,
                    target.layout,
                    target.scheme,
                    target.upload_id,
                    target.buckets,
                    target.quorum,
                    limits,
                )
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        for part, exc in written.failed.items():
            log.warning("upload=%s writing part %d failed: %s", target.upload_id, part, exc.message)
        return written

    async def _copy(
        self,
        upload: UploadRow,
        layout: Layout,
        plan: _Plan,
        targets: dict[int, str],
        failed: dict[int, Karma8Error],
        *,
        throttled: bool,
    ) -> dict[int, str]:
        """Read the file from the sources and write the parts in ``targets``; the fragments
        read around go into ``failed``."""
        writers = {p: self._cluster.client(b) for p, b in targets.items()}
        target = _Target(upload.upload_id, layout, upload.scheme, writers, 1)
        written = await self._pipe(upload, dict(plan.sources), target, failed, throttled=throttled)
        if written.sha256 != upload.sha256:
            log.error(
                "upload=%s: the file read for repair has sha256 %s, not the committed %s; nothing switched",
                upload.upload_id,
                written.sha256,
                upload.sha256,
            )
            return {}
        return written.stored

    async def _upgrade(self, upload: UploadRow, row: RepairRow) -> None:
        """Rewrite a file stored with less protection than configured (or before erasure
        coding) as a new version with the configured scheme, if it is still current."""
        config = self._config
        scheme = Scheme.of(config.parts, config.parity)
        live = self._cluster.live()
        if len(live) < scheme.width:
            await self._registry.repair_later(upload.upload_id, row.spare, row.bad, MAX_BACKOFF)
            return
        fragments = await self._registry.fragments(upload.upload_id)
        sources: dict[int, Bucket] = {}
        for f in fragments:
            if f.state == "ok" and self._cluster.is_live(f.bucket_id):
                sources[f.part] = self._cluster.client(f.bucket_id)
        layout = Layout.for_size(upload.size, scheme.data, config.stripe_unit, scheme.parity)
        new_id = new_upload_id()
        bucket_ids = await self._registry.place_upload(
            replace(
                UploadRow.new(new_id, upload.name, upload.size, scheme, layout.unit, time.time()),
                rewrites=upload.upload_id,
            ),
            layout.part_sizes(),
            live,
        )
        try:
            writers = {p: self._cluster.client(b) for p, b in enumerate(bucket_ids)}
            target = _Target(new_id, layout, scheme, writers, scheme.width)
            written = await self._pipe(upload, sources, target, {}, throttled=True)
            if written.sha256 != upload.sha256:
                raise ChecksumMismatch(f"read back sha256 {written.sha256}, committed {upload.sha256}")
            await self._registry.commit_upload(
                new_id, written.sha256, written.stored, replacing=upload.upload_id
            )
        except BaseException:
            with trio.move_on_after(config.cleanup_timeout, shield=True):
                await self._registry.fail_upload(new_id)
                await self._janitor.delete(new_id, bucket_ids)
            raise
        self._janitor.poke()
        self.progress.files += 1
        self.progress.fragments += len(written.stored)
        self._metrics.repairs.labels("done").inc()
        self._metrics.repaired_fragments.inc(len(written.stored))
        log.info(
            "upload=%s name=%r rewritten as upload=%s with %s", upload.upload_id, upload.name, new_id, scheme
        )
        await self._registry.repair_done(upload.upload_id)


@dataclass(frozen=True, slots=True)
class _Target:
    """Fragments to write from a file's bytes."""

    upload_id: str
    layout: Layout
    scheme: Scheme
    buckets: Mapping[int, Bucket]
    quorum: int


def _backoff(attempts: int) -> float:
    return min(MAX_BACKOFF, 2.0 ** min(attempts, 10))
