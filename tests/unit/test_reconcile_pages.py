"""Reconciliation as a merge of two sorted streams, in tiny pages (karma8/api/reconcile.py).

A real bucket store on disk and a real registry (SQLite and PostgreSQL); the bucket's
gRPC service is left out: :class:`StoreBucket` hands the store's pages to the reconciler
as the bucket's ``List`` does (tests/integration/test_reconcile.py goes through gRPC).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from karma8.api.metrics import ApiMetrics
from karma8.api.reconcile import Inventory, Reconciler
from karma8.bucket.store import FragmentStore, open_store
from karma8.bucket.volumes import scan
from karma8.config import ApiConfig
from karma8.core.fragments import fragment_id
from karma8.core.records import StoredFragment
from karma8.registry import Registry
from karma8.registry.db import FragmentRow, RegistryDB, UploadRow

PARTS = 3


class StoreBucket:
    """The reconciler's view of one bucket, over its real store."""

    def __init__(self, store: FragmentStore, paged: bool = True) -> None:
        self.store = store
        self.bucket_id = store.bucket_id
        self.paged = paged
        self.pages = 0

    async def list_page(self, after: str, limit: int) -> tuple[list[StoredFragment], bool]:
        self.pages += 1
        if not self.paged:  # a bucket of the release before: everything, unpaged
            return (await self.store.list_fragments())[:1000], False
        return [f async for chunk in self.store.iter_fragments(after, limit, 2) for f in chunk], True

    async def list_fragments(self) -> list[StoredFragment]:
        return await self.store.list_fragments()

    async def delete_upload(self, upload_id: str, fragment_ids: Sequence[str] = ()) -> int:
        return (await self.store.delete_upload(upload_id, fragment_ids))[0]


class OneBucket:
    def __init__(self, bucket: StoreBucket) -> None:
        self.bucket = bucket

    def client(self, bucket_id: str) -> StoreBucket:
        assert bucket_id == self.bucket.bucket_id
        return self.bucket


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[Registry]:
    db = RegistryDB(registry_url)
    yield Registry(db)
    db.close()


@pytest.fixture
async def store(tmp_path: Path) -> FragmentStore:
    return await open_store(tmp_path / "bucket", fsync=False)


def _uid(n: int) -> str:
    return f"{n * 2654435761 % (1 << 32):08x}{n:024x}"  # not in creation order


async def _write(store: FragmentStore, fid: str, age: float = 0.0) -> None:
    """A fragment of 4 bytes: a needle in a volume, or (``age``: one backdated) a file, so
    a listing merges both kinds."""
    if not age:
        await store.put_whole(fid, b"data")
        return
    async with store.open_writer(fid, 4) as writer:
        await writer.write(b"data")
        await writer.commit()
    then = time.time() - age
    os.utime(store.root / "fragments" / fid[:2] / fid, (then, then))


async def _setup(registry: Registry, store: FragmentStore) -> dict[str, set[str]]:
    """Committed files with a fragment here (a few lost), failed and deleted uploads,
    copies under way and stale ones, and orphans old and young."""
    db, here = registry.db, store.bucket_id
    out: dict[str, set[str]] = {k: set() for k in ("missing", "old", "young", "kept")}
    for n in range(30):
        upload_id = _uid(n)
        part = n % PARTS
        buckets = ["x1", "x2"]
        buckets.insert(part, here)
        db.begin_upload(
            UploadRow(upload_id, f"f{n}", 12, PARTS, 4, "in_progress", created=1.0),
            [FragmentRow(upload_id, p, b, 4, None) for p, b in enumerate(buckets)],
        )
        fid = fragment_id(upload_id, part)
        if n % 7 == 3:
            out["missing"].add(fid)  # committed, but its fragment here is gone
        else:
            await _write(store, fid, age=7200)
            out["kept"].add(fid)
        if n % 5 == 4:
            db.fail_upload(upload_id, 2.0)  # pending deletion: not garbage, not missing
            out["missing"].discard(fid)
        else:
            db.commit_upload(upload_id, "ab" * 32, {p: "cd" * 32 for p in range(PARTS)}, 2.0)
    with db.database.transaction() as tx:
        for n in range(30, 36):  # copies under way to this bucket, and stale ones on it
            upload_id = _uid(n)
            await _write(store, fragment_id(upload_id, 1), age=7200)
            out["kept"].add(fragment_id(upload_id, 1))
            if n % 2:
                tx.execute(
                    "INSERT INTO moves (upload_id, part, src, dst, size, sha256, started)"
                    " VALUES (?, 1, 'x1', ?, 4, '', 1)",
                    (upload_id, here),
                )
            else:
                tx.execute(
                    "INSERT INTO stale (bucket_id, upload_id, part, size, since) VALUES (?, ?, 1, 4, 1)",
                    (here, upload_id),
                )
    for n in range(40, 52):  # orphans: the registry has never heard of them
        fid = fragment_id(_uid(n), n % 11)
        old = n % 3 != 0
        await _write(store, fid, age=7200 if old else 0)
        out["old" if old else "young"].add(fid)
    return out


def _reconciler(registry: Registry, bucket: StoreBucket, page: int) -> Reconciler:
    config = ApiConfig.model_validate({"orphan_grace": 600})
    return Reconciler(
        registry, cast(Any, OneBucket(bucket)), config, ApiMetrics(CollectorRegistry()), page=page
    )


def _on_disk(store: FragmentStore) -> set[str]:
    return {p.name for p in (store.root / "fragments").rglob("*.*")} | set(scan(store.root / "volumes"))


@pytest.mark.parametrize("page", [1, 3, 1000])
async def test_a_paged_pass_finds_what_a_whole_listing_does(
    registry: Registry, store: FragmentStore, page: int
) -> None:
    found = await _setup(registry, store)
    bucket = StoreBucket(store)
    inventory = await _reconciler(registry, bucket, page).reconcile(store.bucket_id)

    listed = len(found["kept"] | found["old"] | found["young"])
    assert inventory == Inventory(
        listed,
        len(found["old"] | found["young"]),
        len(found["old"]),
        frozenset(found["missing"]),
        len(found["missing"]),
    )
    assert _on_disk(store) == found["kept"] | found["young"]
    queued = {r.upload_id: r.bad for r in registry.db.repairs()}
    assert queued == {fid.partition(".")[0]: {int(fid.partition(".")[2])} for fid in found["missing"]}
    if page < 10:
        assert bucket.pages > listed // page // 2, "the pass went page by page"


async def test_a_bucket_of_the_release_before_is_reconciled_whole(
    registry: Registry, store: FragmentStore
) -> None:
    found = await _setup(registry, store)
    bucket = StoreBucket(store, paged=False)
    inventory = await _reconciler(registry, bucket, 3).reconcile(store.bucket_id)
    assert inventory is not None
    assert (inventory.unknown, inventory.orphans_deleted) == (
        len(found["old"] | found["young"]),
        len(found["old"]),
    )
    assert inventory.missing == found["missing"]
    assert _on_disk(store) == found["kept"] | found["young"]


async def test_an_orphan_recorded_during_the_pass_is_not_deleted(
    registry: Registry, store: FragmentStore
) -> None:
    found = await _setup(registry, store)
    orphan = min(found["old"])
    bucket = StoreBucket(store)
    reconciler = _reconciler(registry, bucket, 3)
    listed = bucket.list_page

    async def list_page(after: str, limit: int) -> tuple[list[StoredFragment], bool]:
        page = await listed(after, limit)
        if after > orphan:  # the orphan's range is done: a repair copy lands there now
            with registry.db.database.transaction() as tx:
                tx.execute(
                    "INSERT INTO moves (upload_id, part, src, dst, size, sha256, started)"
                    " VALUES (?, ?, '', ?, 4, '', 1) ON CONFLICT DO NOTHING",
                    (*orphan.split("."), store.bucket_id),
                )
        return page

    bucket.list_page = list_page  # type: ignore[method-assign]
    inventory = await reconciler.reconcile(store.bucket_id)
    assert inventory is not None
    assert inventory.orphans_deleted == len(found["old"]) - 1
    assert orphan in _on_disk(store)
