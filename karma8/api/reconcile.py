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
"""

from __future__ import annotations

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
from karma8.errors import BucketUnavailable
from karma8.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inventory:
    """The outcome of one reconciliation of one bucket."""

    listed: int
    unknown: int
    orphans_deleted: int
    missing: frozenset[str]


@dataclass
class Reconciler:
    """Compares bucket listings with the registry; deletes orphans, reports missing data."""

    registry: Registry
    cluster: Cluster
    config: ApiConfig
    metrics: ApiMetrics
    inventories: dict[str, Inventory] = field(default_factory=dict)
    #: Fragments a scrub (``verify``) found corrupt, until they read back intact.
    corrupt: set[str] = field(default_factory=set)
    #: Called when missing fragments were queued for repair (the repairer listens).
    on_damage: Callable[[], None] = lambda: None
    #: Whether to reconcile now (this server holds the reconciler's lease).
    active: Callable[[], bool] = lambda: True
    _due: set[str] = field(default_factory=set)
    _wake: trio.Event = field(default_factory=trio.Event)

    def request(self, bucket_id: str) -> None:
        """Reconcile ``bucket_id`` soon (it has just registered)."""
        self._due.add(bucket_id)
        self._wake.set()

    def missing(self) -> set[str]:
        """Fragment ids of committed files that their bucket lacks, per the last reports."""
        return set().union(*(inv.missing for inv in self.inventories.values()))

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
        try:
            client = self.cluster.client(bucket_id)
            before = await self.registry.expected_on(bucket_id)
            with trio.fail_after(self.config.rpc_timeout):
                listed = await client.list_fragments()
        except (BucketUnavailable, trio.TooSlowError) as exc:
            log.warning("bucket=%s reconciliation skipped: cannot list it (%s)", bucket_id, exc)
            self.metrics.reconciliations.labels("skipped").inc()
            return None
        after = await self.registry.expected_on(bucket_id)
        on_disk = {f.fragment_id for f in listed}
        unknown = [f for f in listed if f.fragment_id not in after]
        orphans = [f.fragment_id for f in unknown if f.age >= self.config.orphan_grace]
        missing = frozenset(
            fid
            for fid, state in before.items()
            if state == "committed" and after.get(fid) == "committed" and fid not in on_disk
        )
        if missing:
            await self.registry.queue_bad_fragments((parse_fragment_id(f) for f in missing), "missing")
            self.on_damage()
        deleted = await self._delete_orphans(bucket_id, orphans)
        inventory = Inventory(len(listed), len(unknown), deleted, missing)
        self.inventories[bucket_id] = inventory
        self.metrics.reconciliations.labels("ok").inc()
        self.metrics.missing_fragments.set(len(self.missing()))
        level = logging.WARNING if unknown or missing else logging.INFO
        log.log(
            level,
            "bucket=%s reconciled: %d fragment(s), %d unknown to the registry (%d deleted as "
            "orphans older than %g s), %d of committed files missing",
            bucket_id,
            len(listed),
            len(unknown),
            deleted,
            self.config.orphan_grace,
            len(missing),
        )
        return inventory

    async def _delete_orphans(self, bucket_id: str, orphans: list[str]) -> int:
        by_upload: dict[str, list[str]] = defaultdict(list)
        for fid in orphans:
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
