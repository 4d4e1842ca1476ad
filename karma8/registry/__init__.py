"""The registry, as the trio side of the API server uses it.

:class:`Registry` forwards every call to :class:`~karma8.registry.db.RegistryDB` on a
worker thread (one at a time on SQLite, up to the pool's size on PostgreSQL), so the
database never blocks the trio event loop. A call that lost a race with another
server's transaction (deadlock, serialization failure, SQLite busy) is made again, a few
times, after a short random pause.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

from karma8.core.balance import Fill
from karma8.core.listing import MAX_PAGE, ListQuery, Page
from karma8.core.records import Heartbeat
from karma8.errors import RegistryUnavailable
from karma8.registry.database import Database, Retry
from karma8.registry.db import (
    BucketRow,
    BucketSpace,
    FileRow,
    FragmentRow,
    MoveRow,
    RegistryDB,
    StaleRow,
    UploadRow,
)
from karma8.registry.leases import Fence
from karma8.registry.planning import Plan
from karma8.registry.repairs import RepairRow

__all__ = [
    "BucketRow",
    "BucketSpace",
    "FileRow",
    "FragmentRow",
    "MoveRow",
    "Registry",
    "RepairRow",
    "StaleRow",
    "UploadRow",
    "open_registry",
]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)

#: Runs of a call that keeps losing races before the caller hears ``unavailable``.
ATTEMPTS = 8


def retrying(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` (one registry transaction), run again when it lost a race."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Retry as exc:
            if attempt == ATTEMPTS:
                raise RegistryUnavailable(f"registry busy: {exc}") from None
            log.debug("registry %s lost a race (%s); attempt %d", getattr(fn, "__name__", fn), exc, attempt)
            time.sleep(random.uniform(0, 0.005 * 2**attempt))  # a worker thread: trio runs on
    raise AssertionError("unreachable")


class Registry:
    """Async facade of the registry for trio code."""

    def __init__(self, db: RegistryDB) -> None:
        self.db = db
        self._limiter = trio.CapacityLimiter(db.database.concurrency)
        #: Uploads this server placed and has not yet committed or failed.
        self.active: set[str] = set()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await trio.to_thread.run_sync(lambda: retrying(fn, *args, **kwargs), limiter=self._limiter)

    async def upsert_bucket(self, beat: Heartbeat) -> None:
        await self._run(self.db.upsert_bucket, beat)

    async def buckets(self) -> list[BucketRow]:
        return await self._run(self.db.buckets)

    async def begin_upload(self, upload: UploadRow, fragments: list[FragmentRow]) -> None:
        await self._run(self.db.begin_upload, upload, fragments)

    async def place_upload(
        self,
        upload: UploadRow,
        part_sizes: Sequence[int],
        live: Sequence[BucketSpace],
        required: int | None = None,
    ) -> list[str]:
        self.active.add(upload.upload_id)  # before its row exists: see fail_abandoned
        try:
            return await self._run(self.db.place_upload, upload, part_sizes, live, required)
        except BaseException:
            self.active.discard(upload.upload_id)
            raise

    async def commit_upload(
        self,
        upload_id: str,
        sha256: str,
        checksums: Mapping[int, str],
        owed: Iterable[int] = (),
        replacing: str | None = None,
    ) -> str | None:
        try:
            return await self._run(
                self.db.commit_upload, upload_id, sha256, checksums, time.time(), tuple(owed), replacing
            )
        finally:
            self.active.discard(upload_id)

    # -- the repair queue (karma8/registry/repairs.py) --

    async def queue_repair(self, upload_id: str, reason: str, spare: int, bad: Iterable[int] = ()) -> None:
        await self._run(self.db.queue_repair, upload_id, reason, spare, time.time(), tuple(bad))

    async def queue_bad_fragments(self, fragments: Iterable[tuple[str, int]], reason: str) -> int:
        return await self._run(self.db.queue_bad_fragments, tuple(fragments), reason, time.time())

    async def queue_lost_buckets(self, bucket_ids: Iterable[str]) -> int:
        return await self._run(self.db.queue_lost_buckets, tuple(bucket_ids), time.time())

    async def queue_upgrades(self, parity: int) -> int:
        return await self._run(self.db.queue_upgrades, parity, time.time())

    async def repairs(self) -> list[RepairRow]:
        return await self._run(self.db.repairs)

    async def repair_counts(self) -> tuple[int, int]:
        return await self._run(self.db.repair_counts)

    async def repair_summary(self) -> dict[str, Any]:
        return await self._run(self.db.repair_summary)

    async def due_repairs(self, limit: int, skip: Iterable[str] = ()) -> list[RepairRow]:
        return await self._run(self.db.due_repairs, time.time(), limit, tuple(skip))

    async def repair_later(self, upload_id: str, spare: int, bad: Iterable[int], delay: float) -> None:
        await self._run(self.db.repair_later, upload_id, spare, tuple(bad), time.time() + delay)

    async def repair_done(self, upload_id: str) -> None:
        await self._run(self.db.repair_done, upload_id)

    async def retry_repairs_now(self) -> None:
        await self._run(self.db.retry_repairs_now, time.time())

    async def stale_buckets(self, upload_id: str) -> set[str]:
        return await self._run(self.db.stale_buckets, upload_id)

    async def start_repair_copies(
        self, upload_id: str, targets: Mapping[int, str], sizes: Mapping[int, int], fence: Fence | None = None
    ) -> set[int]:
        return await self._run(self.db.start_repair_copies, upload_id, targets, sizes, time.time(), fence)

    async def finish_repair_copies(
        self,
        upload_id: str,
        targets: Mapping[int, str],
        stored: Mapping[int, str],
        replaced: Mapping[int, str | None],
        sizes: Mapping[int, int],
        fence: Fence | None = None,
    ) -> set[int]:
        return await self._run(
            self.db.finish_repair_copies, upload_id, targets, stored, replaced, sizes, time.time(), fence
        )

    async def fail_upload(self, upload_id: str) -> None:
        try:
            await self._run(self.db.fail_upload, upload_id, time.time())
        finally:
            self.active.discard(upload_id)

    async def fail_abandoned(self, older_than: float) -> int:
        """Fail this server's uploads in progress that it no longer runs (their commit or
        cleanup could not reach the registry), placed more than ``older_than`` s ago."""
        return await self._run(self.db.fail_abandoned, tuple(self.active), time.time() - older_than)

    async def start_server(self, address: str) -> tuple[int, int]:
        return await self._run(self.db.start_server, address)

    async def server_alive(self, address: str) -> None:
        await self._run(self.db.server_alive, address)

    async def reap_servers(self, silent_for: float) -> list[tuple[str, int, int]]:
        return await self._run(self.db.reap_servers, silent_for)

    async def servers(self) -> list[tuple[str, str, float]]:
        return await self._run(self.db.servers)

    # -- leases (karma8/registry/leases.py) --

    async def hold_lease(self, job: str, ttl: float) -> int | None:
        return await self._run(self.db.hold_lease, job, ttl)

    async def release_lease(self, job: str) -> None:
        await self._run(self.db.release_lease, job)

    async def lease_holders(self) -> dict[str, tuple[str, int, float]]:
        return await self._run(self.db.lease_holders)

    async def publish_reads(self, upload_ids: Iterable[str]) -> None:
        await self._run(self.db.publish_reads, tuple(upload_ids))

    async def upload(self, upload_id: str) -> UploadRow | None:
        return await self._run(self.db.upload, upload_id)

    async def fragments(self, upload_id: str) -> list[FragmentRow]:
        return await self._run(self.db.fragments, upload_id)

    async def fragments_deleted(self, upload_id: str, bucket_id: str) -> None:
        await self._run(self.db.fragments_deleted, upload_id, bucket_id)

    async def expected_on(self, bucket_id: str) -> dict[str, str]:
        return await self._run(self.db.expected_on, bucket_id)

    # -- the background passes' pages (karma8/registry/passes.py) --

    async def expected_page(
        self, bucket_id: str, after: str, limit: int, upto: str | None = None
    ) -> tuple[dict[str, str], str | None]:
        return await self._run(self.db.expected_page, bucket_id, after, limit, upto)

    async def deletions_page(
        self, state: str, after: str, limit: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        return await self._run(self.db.deletions_page, state, after, limit)

    async def stale_page(self, after: tuple[str, str, int] | None, limit: int) -> list[tuple[str, str, int]]:
        return await self._run(self.db.stale_page, after, limit)

    async def known_on(self, bucket_id: str, fragment_ids: Sequence[str]) -> set[str]:
        return await self._run(self.db.known_on, bucket_id, fragment_ids)

    async def placed(self) -> dict[str, tuple[int, int]]:
        return await self._run(self.db.placed)

    async def fills(self, live: Mapping[str, int]) -> list[Fill]:
        return await self._run(self.db.fills, live)

    async def start_move(
        self,
        live: Mapping[str, int],
        tolerance: float,
        parts: int,
        skip: Set[tuple[str, int]] = frozenset(),
        fence: Fence | None = None,
    ) -> MoveRow | None:
        return await self._run(self.db.start_move, live, tolerance, parts, frozenset(skip), fence)

    async def rebalance_plan(self, live: Mapping[str, int], tolerance: float, parts: int) -> Plan:
        return await self._run(self.db.rebalance_plan, live, tolerance, parts)

    async def finish_move(self, move: MoveRow, fence: Fence | None = None) -> bool:
        return await self._run(self.db.finish_move, move, fence)

    async def abandon_move(self, move: MoveRow) -> None:
        await self._run(self.db.abandon_move, move)

    async def abandon_own_moves(self) -> int:
        return await self._run(self.db.abandon_own_moves)

    async def stale_deleted(self, bucket_id: str, upload_id: str, parts: Iterable[int]) -> None:
        await self._run(self.db.stale_deleted, bucket_id, upload_id, list(parts))

    async def lookup(self, name: str) -> FileRow | None:
        return await self._run(self.db.lookup, name)

    async def lookup_repairing(self, name: str) -> tuple[FileRow | None, set[int]]:
        """:meth:`lookup` and, for what it found, :meth:`repairing`, in one worker-thread
        call (a stat's two reads: the hand-off costs about what a read does)."""

        def both() -> tuple[FileRow | None, set[int]]:
            found = self.db.lookup(name)
            return found, self.db.repairing(found.upload.upload_id) if found is not None else set()

        return await self._run(both)

    async def list_page(self, query: ListQuery) -> Page:
        return await self._run(self.db.list_page, query)

    async def file_names(self, after: str = "", limit: int = MAX_PAGE) -> list[str]:
        return await self._run(self.db.file_names, after, limit)

    async def delete_file(self, name: str) -> str | None:
        return await self._run(self.db.delete_file, name, time.time())


@contextlib.asynccontextmanager
async def open_registry(where: Database | Path | str, server_id: str = "") -> AsyncIterator[Registry]:
    """Open (creating or migrating if needed) the registry at ``where`` (a registry URL or
    a SQLite path) for the API server ``server_id``."""
    db = await trio.to_thread.run_sync(retrying, RegistryDB, where, server_id)
    try:
        yield Registry(db)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(db.close)
