"""The janitor's sweep, a page of the registry at a time (tiny pages, both backends)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from karma8.api.janitor import Janitor, ReadLeases
from karma8.api.metrics import ApiMetrics
from karma8.registry import Registry
from karma8.registry.db import RegistryDB
from tests.unit.test_registry_passes import _fill


class Buckets:
    """Every bucket live; each delete is counted (what the bucket would delete)."""

    def __init__(self) -> None:
        self.deletes: Counter[tuple[str, str, tuple[str, ...]]] = Counter()

    def is_live(self, bucket_id: str) -> bool:
        return True

    def client(self, bucket_id: str) -> Buckets._Client:
        return Buckets._Client(self, bucket_id)

    class _Client:
        def __init__(self, buckets: Buckets, bucket_id: str) -> None:
            self._buckets = buckets
            self._bucket_id = bucket_id

        async def delete_upload(self, upload_id: str, fragment_ids: Sequence[str] = ()) -> int:
            self._buckets.deletes[(self._bucket_id, upload_id, tuple(fragment_ids))] += 1
            return max(1, len(fragment_ids))


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[Registry]:
    db = RegistryDB(registry_url)
    yield Registry(db)
    db.close()


async def test_a_sweep_in_tiny_pages_deletes_everything_pending_once(registry: Registry) -> None:
    db = registry.db
    _fill(db)
    pending = db.pending_deletions()
    stale = db.pending_stale()
    assert len(pending) > 9
    assert len(stale) > 3
    buckets = Buckets()
    metrics = ApiMetrics(CollectorRegistry())
    janitor = Janitor(registry, cast(Any, buckets), ReadLeases(), 5.0, 5.0, 4, metrics, page=3)

    await janitor.sweep()

    assert db.pending_deletions() == []
    assert db.pending_stale() == []
    whole = {(b, u) for (b, u, fids), n in buckets.deletes.items() if not fids}
    assert whole == {(b, u) for u, b in pending}
    copies = {(b, u, fid) for (b, u, fids) in buckets.deletes for fid in fids}
    # A stale copy of an upload deleted whole on its bucket went with it.
    assert copies == {
        (s.bucket_id, s.upload_id, f"{s.upload_id}.{s.part}")
        for s in stale
        if (s.bucket_id, s.upload_id) not in whole
    }
    assert set(buckets.deletes.values()) == {1}
    assert metrics.janitor_pending._value.get() == len(pending) + len(copies)
