"""Reconciliation of bucket listings with the registry (block reports)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from karma8.core.fragments import new_upload_id
from karma8.rpc.bridge import open_portal
from tests.integration.harness import (
    BucketProcess,
    Cluster,
    connect_test_bucket,
    make_file,
    open_cluster,
    wait_until,
)

FAST: dict[str, object] = {"reconcile_interval": 0.3, "orphan_grace": 60.0}


def plant(bucket: BucketProcess, age: float) -> Path:
    """A fragment file the registry has never heard of, ``age`` seconds old."""
    upload_id = new_upload_id()
    path = bucket.data_dir / "fragments" / upload_id[:2] / f"{upload_id}.2"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"left over from who knows what")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


async def bucket_row(cluster: Cluster, bucket_id: str) -> dict[str, object]:
    status = await cluster.client.status()
    (row,) = [b for b in status["buckets"] if b["id"] == bucket_id]
    return dict(row)


async def test_orphans_go_after_the_grace_period_and_missing_data_is_reported(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=6, **FAST) as cluster:
        src = tmp_path / "f"
        # Every part is 2 stripe units (512 KiB each): bigger than a fragment sent whole, so
        # streamed, a file of its own (a needle in a volume cannot be lost alone behind the
        # bucket's back).
        make_file(src, 12 * 512 * 1024)
        await cluster.client.upload(src, "kept")
        bucket = cluster.buckets[0]
        (ours,) = bucket.fragment_files()
        assert bucket.fragment_ids() == [ours.name]
        ours.unlink()  # a committed fragment is lost
        old = plant(bucket, age=3600)
        young = plant(bucket, age=0)

        # The status shows the last reconciliation only (one every 0.3 s here), so wait for
        # what lasts: the old orphan gone from disk and the loss reported.
        async def reconciled() -> bool:
            row = await bucket_row(cluster, bucket.bucket_id)
            return not old.exists() and row["missing_fragments"] == 1

        await wait_until(reconciled, "reconciliation to delete the old orphan and see the loss")

        async def young_one_kept() -> bool:
            # A listing taken after the deletion: the young orphan is still there, still
            # unknown, and still not deleted.
            row = await bucket_row(cluster, bucket.bucket_id)
            return (row["unknown_fragments"], row["orphans_deleted"]) == (1, 0)

        await wait_until(young_one_kept, "a reconciliation after the orphan was deleted")
        assert young.exists(), "a fragment younger than the grace period was deleted"

        stat = await cluster.client.stat("kept")
        assert stat["damaged"] is True
        problems = {p["bucket"]: p["problem"] for p in stat["parts"]}
        assert problems.pop(bucket.bucket_id) == "missing"
        assert set(problems.values()) == {None}

        # Other buckets: everything accounted for, nothing deleted.
        for other in cluster.buckets[1:]:
            row = await bucket_row(cluster, other.bucket_id)
            assert (row["unknown_fragments"], row["missing_fragments"], row["orphans_deleted"]) == (0, 0, 0)
            assert len(other.fragment_ids()) == 1


async def test_an_incomplete_listing_deletes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="karma8.api.reconcile")
    async with open_cluster(tmp_path, buckets=6, **FAST) as cluster:
        bucket = cluster.buckets[0]
        orphan = plant(bucket, age=3600)
        # A directory where a fragment file should be makes the bucket's listing fail.
        blocker = bucket.data_dir / "fragments" / "ff" / ("f" * 32 + ".0")
        blocker.mkdir(parents=True)

        def attempts() -> int:
            return sum(
                "reconciliation skipped" in r.getMessage() and bucket.bucket_id in r.getMessage()
                for r in caplog.records
            )

        await wait_until(lambda: attempts() >= 2, "two reconciliation attempts with a failing listing")
        assert orphan.exists(), "an orphan was deleted on the strength of an incomplete listing"

        blocker.rmdir()
        await wait_until(lambda: not orphan.exists(), "the orphan to go once the listing is complete")


async def test_a_bucket_lists_in_order_page_by_page(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=6, **FAST) as cluster:
        bucket = cluster.buckets[0]
        planted = sorted(plant(bucket, age=0).name for _ in range(9))  # young: never deleted
        async with open_portal() as portal:
            client = await connect_test_bucket(portal, bucket)
            try:
                seen: list[str] = []
                after, pages = "", 0
                while True:
                    page, paged = await client.list_page(after, 2)
                    assert paged
                    pages += 1
                    seen += [f.fragment_id for f in page]
                    if len(page) < 2:
                        break
                    after = page[-1].fragment_id.partition(".")[0]
                assert seen == planted
                assert pages >= 5
                # The whole listing of the release before (no page asked for) still works.
                assert sorted(f.fragment_id for f in await client.list_fragments()) == planted
            finally:
                await client.aclose()
