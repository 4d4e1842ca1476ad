"""Deleting fragments that no longer belong to a live file.

Failed uploads, replaced versions and deleted files leave fragment rows whose upload is
``failed`` or ``deleting``; the rebalancer leaves *stale* copies (the source of a finished
move, the destination of an abandoned one). The janitor deletes both on their buckets and
forgets each row once its bucket confirmed. Deletion that cannot happen now (bucket not
live) stays pending and is retried every ``janitor_interval`` and whenever poked.
Uploads still being read by a download are held by a lease and left alone until the
last reader is done; its release pokes the janitor.

With several API servers on one registry, the janitor runs on the holder of its job
lease (karma8/api/coordination.py). Other servers' downloads are known from the leases
they publish every heartbeat interval, so the janitor deletes nothing it has not seen
pending for ``grace`` seconds (longer than that interval) while other servers are alive.

A sweep walks the registry a page at a time (issue 14): the uploads being deleted, then
the failed ones with fragments left (not those kept only as records), in id order, then
the stale copies, ``PAGE`` rows per read, each page's deletions done before the next
page is read. Its memory does not grow with what is
pending: the first-seen times of the grace are kept for at most ``SEEN_MAX`` deletions
(the others wait for a later sweep), and only while other servers are alive.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import trio

from karma8.api.cluster import Cluster
from karma8.api.errors import registry_away
from karma8.api.metrics import JANITOR, STALE, ApiMetrics
from karma8.core.fragments import fragment_id
from karma8.errors import BucketUnavailable
from karma8.registry import Registry

log = logging.getLogger(__name__)

#: Rows per registry read of a sweep.
PAGE = 1000
#: Pending deletions whose first sighting is remembered (for the grace), at most.
SEEN_MAX = 100_000


class ReadLeases:
    """Which uploads downloads are reading right now."""

    def __init__(self) -> None:
        self._readers: Counter[str] = Counter()
        #: Called with an upload id when its last reader is done.
        self.on_release: Callable[[str], None] = lambda upload_id: None

    @contextlib.contextmanager
    def hold(self, upload_id: str) -> Iterator[None]:
        """Keep ``upload_id``'s fragments from deletion for the block."""
        self._readers[upload_id] += 1
        try:
            yield
        finally:
            self._readers[upload_id] -= 1
            if not self._readers[upload_id]:
                del self._readers[upload_id]
                self.on_release(upload_id)

    def held(self, upload_id: str) -> bool:
        """True while some download reads ``upload_id``."""
        return upload_id in self._readers

    def reading(self) -> set[str]:
        """The uploads downloads read now (published for the other API servers)."""
        return set(self._readers)


class Janitor:
    """Deletes the fragments of failed, replaced and deleted uploads."""

    def __init__(
        self,
        registry: Registry,
        cluster: Cluster,
        leases: ReadLeases,
        interval: float,
        rpc_timeout: float,
        concurrency: int,
        metrics: ApiMetrics,
        grace: float = 0.0,
        page: int = PAGE,
    ) -> None:
        self._registry = registry
        self._page = page
        self._grace = grace
        #: Whether to run sweeps now (this server holds the janitor's lease).
        self.active: Callable[[], bool] = lambda: True
        #: Whether other API servers are alive (then deletions wait ``grace``).
        self.shared: Callable[[], bool] = lambda: False
        #: When each pending deletion was first seen (trio clock).
        self._seen: dict[tuple[str, ...], float] = {}
        self._metrics = metrics
        self._cluster = cluster
        self._leases = leases
        self._interval = interval
        self._rpc_timeout = rpc_timeout
        self._concurrency = concurrency
        self._wake = trio.Event()
        #: Uploads a sweep skipped because they were leased.
        self._waiting: set[str] = set()
        leases.on_release = self._released

    def poke(self) -> None:
        """Sweep soon (something became garbage)."""
        self._wake.set()

    def _released(self, upload_id: str) -> None:
        if upload_id in self._waiting:
            self._waiting.discard(upload_id)
            self.poke()

    def _deletable(
        self, upload_id: str, bucket_id: str, key: tuple[str, ...], seen: dict[tuple[str, ...], float]
    ) -> bool:
        if self._leases.held(upload_id):
            self._waiting.add(upload_id)
            return False
        if self.shared():
            if key not in self._seen and len(seen) >= SEEN_MAX:
                return False  # remembered next time, once fewer are pending
            seen[key] = self._seen.get(key, trio.current_time())
            if trio.current_time() - seen[key] < self._grace:
                return False  # another server's download may have begun just before (see above)
        return self._cluster.is_live(bucket_id)

    async def delete(self, upload_id: str, bucket_ids: Iterable[str], *, reason: str = JANITOR) -> bool:
        """Delete ``upload_id``'s fragments on the given buckets, concurrently.

        Returns True when every bucket confirmed; what failed stays pending. The deleted
        fragments are counted under ``reason`` (karma8_api_deleted_fragments_total).
        """
        failures: list[str] = []

        async def one(bucket_id: str) -> None:
            try:
                with trio.fail_after(self._rpc_timeout):
                    count = await self._cluster.client(bucket_id).delete_upload(upload_id)
            except (BucketUnavailable, trio.TooSlowError) as exc:
                detail = exc.detail if isinstance(exc, BucketUnavailable) else "timed out"
                log.warning("upload=%s bucket=%s delete postponed: %s", upload_id, bucket_id, detail)
                failures.append(bucket_id)
                return
            await self._registry.fragments_deleted(upload_id, bucket_id)
            self._metrics.deleted_fragments.labels(reason).inc(count)
            log.debug("upload=%s bucket=%s deleted %d fragment(s)", upload_id, bucket_id, count)

        async with trio.open_nursery() as nursery:
            for bucket_id in sorted(set(bucket_ids)):
                nursery.start_soon(one, bucket_id)
        return not failures

    async def delete_stale(self, bucket_id: str, upload_id: str, parts: list[int]) -> None:
        """Delete stale copies of parts of ``upload_id`` on one bucket."""
        fids = [fragment_id(upload_id, p) for p in parts]
        try:
            with trio.fail_after(self._rpc_timeout):
                count = await self._cluster.client(bucket_id).delete_upload(upload_id, fids)
        except (BucketUnavailable, trio.TooSlowError) as exc:
            log.warning("upload=%s bucket=%s stale copy delete postponed: %s", upload_id, bucket_id, exc)
            return
        await self._registry.stale_deleted(bucket_id, upload_id, parts)
        self._metrics.deleted_fragments.labels(STALE).inc(count)
        log.debug("upload=%s bucket=%s deleted stale copies %s", upload_id, bucket_id, parts)

    async def sweep(self) -> None:
        """One pass over every pending deletion that can be done now, a page at a time."""
        seen: dict[tuple[str, ...], float] = {}
        pending = 0
        # Many uploads at once: after heavy traffic thousands of deletions can be pending.
        limiter = trio.CapacityLimiter(self._concurrency)

        async def one(upload_id: str, bucket_ids: list[str]) -> None:
            async with limiter:
                await self.delete(upload_id, bucket_ids)

        async def copies(bucket_id: str, upload_id: str, parts: list[int]) -> None:
            async with limiter:
                await self.delete_stale(bucket_id, upload_id, parts)

        for state in ("deleting", "failed"):
            after: str | None = ""
            while after is not None:
                pairs, after = await self._registry.deletions_page(state, after, self._page)
                pending += len(pairs)
                by_upload: dict[str, list[str]] = {}
                for upload_id, bucket_id in pairs:
                    if self._deletable(upload_id, bucket_id, (upload_id, bucket_id), seen):
                        by_upload.setdefault(upload_id, []).append(bucket_id)
                async with trio.open_nursery() as nursery:
                    for upload_id, bucket_ids in by_upload.items():
                        nursery.start_soon(one, upload_id, bucket_ids)
        last: tuple[str, str, int] | None = None
        while rows := await self._registry.stale_page(last, self._page):
            last = rows[-1]
            pending += len(rows)
            stale: dict[tuple[str, str], list[int]] = {}
            for bucket_id, upload_id, part in rows:
                if self._deletable(upload_id, bucket_id, (bucket_id, upload_id, str(part)), seen):
                    stale.setdefault((bucket_id, upload_id), []).append(part)
            async with trio.open_nursery() as nursery:
                for (bucket_id, upload_id), parts in stale.items():
                    nursery.start_soon(copies, bucket_id, upload_id, parts)
        self._seen = seen  # what is no longer pending is forgotten
        self._metrics.janitor_sweeps.inc()
        self._metrics.janitor_pending.set(pending)

    async def run(self) -> None:
        """Sweep forever: every ``interval`` seconds and when poked (while active)."""
        while True:
            if self.active():
                with registry_away(log, "janitor sweep"):
                    await self.sweep()
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = trio.Event()
