"""Reconciliation: what a bucket holds against what the registry says it should hold.

When a bucket (re-)registers, and every ``reconcile_interval`` for every live bucket, the
API lists the bucket's fragments (its block report) and compares:

- *unknown* fragments, which the registry does not place on that bucket for any upload
  (committed, live, failed or being deleted), are garbage. They are deleted only from a
  complete listing (a listing that failed half-way deletes nothing) and only once older
  than ``orphan_grace`` by the bucket's own clock, so nothing still being written, or
  copied ahead of its registry row, can be taken for garbage.
- *missing* fragments belong to committed files but are not on the bucket. They are
  reported (``status``), the files show as damaged in ``stat``, and they are queued for
  repair. To avoid false alarms
  from races with the listing, a fragment counts as missing only if its upload was
  committed before the listing began and is still committed after it.

Fragments of failed or deleted uploads are not garbage here: they are pending deletions
that the janitor retries until the bucket confirms them.

A pass is a merge of two sorted streams, one page at a time, so its memory does not grow
with the bucket (issue 14). Both sides come in order of upload ids, a page holding whole
uploads: the registry's rows for the bucket (karma8/registry/passes.py, an index range
per page) and the bucket's listing (``List`` with ``after`` and ``limit``). For each
range of upload ids the registry is read before the bucket lists it and again after, so
the rules above hold range by range exactly as they held for a whole listing. Missing
fragments are queued for repair as their range is done; orphans are collected (at most
``ORPHANS_PER_PASS``; later passes take the rest), checked against the registry once
more, and deleted only when the whole listing went through. An inventory keeps exact
counts and at most ``MISSING_KEPT`` missing fragment ids (what ``stat`` shows; the repair
queue has them all). A bucket from before paged listings is reconciled the old way, whole
listing in memory, until it is upgraded.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from karma8.api.cluster import Cluster
from karma8.api.errors import registry_away
from karma8.api.metrics import ORPHAN, ApiMetrics
from karma8.config import ApiConfig
from karma8.core.fragments import parse_fragment_id
from karma8.core.records import StoredFragment
from karma8.errors import BucketUnavailable
from karma8.registry import Registry
from karma8.rpc.buckets import BucketClient

log = logging.getLogger(__name__)

#: Rows per page of a pass, on both sides (registry rows, fragments listed).
PAGE = 1000
#: Orphans one pass deletes at most; it counts the others, later passes delete them.
ORPHANS_PER_PASS = 10_000
#: Missing fragment ids an inventory keeps (``stat`` shows them); its count is exact.
MISSING_KEPT = 10_000
#: Corrupt fragment ids a scrub leaves for ``stat`` to show, at most (the repair queue
#: holds every damaged file; the ids beyond are forgotten oldest first).
CORRUPT_KEPT = 10_000


class _Unpaged(Exception):
    """The bucket lists everything at once (a release before paged listings)."""


class _OutOfOrder(Exception):
    """The bucket's listing is not in the order of upload ids: nothing can be concluded."""


@dataclass(frozen=True, slots=True)
class Inventory:
    """The outcome of one reconciliation of one bucket."""

    listed: int
    unknown: int
    orphans_deleted: int
    #: Missing fragment ids, at most ``MISSING_KEPT`` of them.
    missing: frozenset[str]
    #: How many fragments are missing.
    missing_count: int


class Capped:
    """A set of at most ``cap`` ids: adding one more forgets the oldest."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._ids: dict[str, None] = {}  # insertion order: oldest first

    def add(self, item: str) -> None:
        self._ids.pop(item, None)
        self._ids[item] = None
        if len(self._ids) > self._cap:
            del self._ids[next(iter(self._ids))]

    def discard(self, item: str) -> None:
        self._ids.pop(item, None)

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class _Tally:
    """What a pass found so far (bounded: counts, and capped lists of ids)."""

    listed: int = 0
    unknown: int = 0
    orphans: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)
    missing_count: int = 0


def _upload(fid: str) -> str:
    return fid.partition(".")[0]


def _first(a: str | None, b: str | None) -> str | None:
    """The smaller of two page ends (None: no end)."""
    return b if a is None else a if b is None else min(a, b)


@dataclass
class Reconciler:
    """Compares bucket listings with the registry; deletes orphans, reports missing data."""

    registry: Registry
    cluster: Cluster
    config: ApiConfig
    metrics: ApiMetrics
    inventories: dict[str, Inventory] = field(default_factory=dict)
    #: Fragments a scrub (``verify``) found corrupt, until they read back intact (the
    #: latest ``CORRUPT_KEPT``).
    corrupt: Capped = field(default_factory=lambda: Capped(CORRUPT_KEPT))
    #: Called when missing fragments were queued for repair (the repairer listens).
    on_damage: Callable[[], None] = lambda: None
    #: Whether to reconcile now (this server holds the reconciler's lease).
    active: Callable[[], bool] = lambda: True
    #: Rows per page (tests use tiny pages).
    page: int = PAGE
    _due: set[str] = field(default_factory=set)
    _wake: trio.Event = field(default_factory=trio.Event)

    def request(self, bucket_id: str) -> None:
        """Reconcile ``bucket_id`` soon (it has just registered)."""
        self._due.add(bucket_id)
        self._wake.set()

    def is_missing(self, bucket_id: str, fragment_id: str) -> bool:
        """Whether ``bucket_id``'s last report lacked ``fragment_id`` (of the at most
        ``MISSING_KEPT`` missing ids a report keeps)."""
        inventory = self.inventories.get(bucket_id)
        return inventory is not None and fragment_id in inventory.missing

    def missing_count(self) -> int:
        """How many fragments of committed files their buckets lack, per the last reports."""
        return sum(inv.missing_count for inv in self.inventories.values())

    async def run(self) -> None:
        """Forever: reconcile buckets that registered, and every live bucket periodically."""
        next_round = trio.current_time() + self.config.reconcile_interval
        while True:
            with trio.move_on_at(next_round):
                await self._wake.wait()
            self._wake = trio.Event()
            if trio.current_time() >= next_round:
                self._due.update(b.bucket_id for b in self.cluster.live())
                next_round = trio.current_time() + self.config.reconcile_interval
            if not self.active():
                self._due.clear()  # the holder reconciles them
                continue
            while self._due:
                with registry_away(log, "reconciliation"):
                    await self.reconcile(self._due.pop())

    async def reconcile(self, bucket_id: str) -> Inventory | None:
        """One reconciliation of one bucket; None if the bucket could not be listed."""
        tally = _Tally()
        try:
            client = self.cluster.client(bucket_id)
            try:
                await self._merge(bucket_id, client, tally)
            except _Unpaged:
                tally = _Tally()
                await self._whole(bucket_id, client, tally)
        except (BucketUnavailable, trio.TooSlowError, _OutOfOrder) as exc:
            log.warning("bucket=%s reconciliation skipped: cannot list it (%s)", bucket_id, exc)
            self.metrics.reconciliations.labels("skipped").inc()
            return None
        deleted = await self._delete_orphans(bucket_id, tally.orphans)
        inventory = Inventory(
            tally.listed, tally.unknown, deleted, frozenset(tally.missing), tally.missing_count
        )
        self.inventories[bucket_id] = inventory
        self.metrics.reconciliations.labels("ok").inc()
        self.metrics.missing_fragments.set(self.missing_count())
        level = logging.WARNING if tally.unknown or tally.missing_count else logging.INFO
        log.log(
            level,
            "bucket=%s reconciled: %d fragment(s), %d unknown to the registry (%d deleted as "
            "orphans older than %g s), %d of committed files missing",
            bucket_id,
            tally.listed,
            tally.unknown,
            deleted,
            self.config.orphan_grace,
            tally.missing_count,
        )
        return inventory

    async def _merge(self, bucket_id: str, client: BucketClient, tally: _Tally) -> None:
        """The pass, page by page: registry before, bucket listing, registry after."""
        after = ""
        while True:
            before, end = await self.registry.expected_page(bucket_id, after, self.page)
            with trio.fail_after(self.config.rpc_timeout):
                listed, paged = await client.list_page(after, self.page)
            if not paged:
                raise _Unpaged
            uploads = [_upload(f.fragment_id) for f in listed]
            if any(u <= after for u in uploads[:1]) or any(a > b for a, b in itertools.pairwise(uploads)):
                raise _OutOfOrder(f"listing out of order after upload {after!r}")
            if len(listed) >= self.page:
                end = _first(end, uploads[-1])
            now, end_after = await self.registry.expected_page(bucket_id, after, self.page, upto=end)
            end = _first(end, end_after)
            listed = [f for f, u in zip(listed, uploads, strict=True) if end is None or u <= end]
            before = {fid: state for fid, state in before.items() if end is None or _upload(fid) <= end}
            await self._compare(bucket_id, listed, before, now, tally)
            if end is None:
                return
            after = end

    async def _whole(self, bucket_id: str, client: BucketClient, tally: _Tally) -> None:
        """The pass against a bucket that lists everything at once (an older release)."""
        before = await self.registry.expected_on(bucket_id)
        with trio.fail_after(self.config.rpc_timeout):
            listed = await client.list_fragments()
        await self._compare(bucket_id, listed, before, await self.registry.expected_on(bucket_id), tally)

    async def _compare(
        self,
        bucket_id: str,
        listed: list[StoredFragment],
        before: dict[str, str],
        now: dict[str, str],
        tally: _Tally,
    ) -> None:
        """One range of uploads: listed on the bucket, and in the registry before and after."""
        on_disk = {f.fragment_id for f in listed}
        tally.listed += len(listed)
        for f in listed:
            if f.fragment_id not in now:
                tally.unknown += 1
                if f.age >= self.config.orphan_grace and len(tally.orphans) < ORPHANS_PER_PASS:
                    tally.orphans.append(f.fragment_id)
        missing = [
            fid
            for fid, state in before.items()
            if state == "committed" and now.get(fid) == "committed" and fid not in on_disk
        ]
        if missing:
            tally.missing_count += len(missing)
            tally.missing.update(missing[: MISSING_KEPT - len(tally.missing)])
            await self.registry.queue_bad_fragments((parse_fragment_id(f) for f in missing), "missing")
            self.on_damage()

    async def _delete_orphans(self, bucket_id: str, orphans: list[str]) -> int:
        # Collected over a whole pass: one more look at the registry, in case a copy was
        # recorded there meanwhile (a move or a repair writing to this bucket).
        known = await self.registry.known_on(bucket_id, orphans) if orphans else set()
        by_upload: dict[str, list[str]] = defaultdict(list)
        for fid in orphans:
            if fid in known:
                continue
            by_upload[parse_fragment_id(fid)[0]].append(fid)
        deleted = 0
        for upload_id, fids in by_upload.items():
            try:
                with trio.fail_after(self.config.rpc_timeout):
                    count = await self.cluster.client(bucket_id).delete_upload(upload_id, fids)
            except (BucketUnavailable, trio.TooSlowError) as exc:
                log.warning("bucket=%s upload=%s orphan delete postponed: %s", bucket_id, upload_id, exc)
                break
            deleted += count
            self.metrics.deleted_fragments.labels(ORPHAN).inc(count)
        return deleted
