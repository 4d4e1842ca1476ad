"""Buckets join at any time, dead buckets leave placement, the registry survives restarts."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.errors import RemoteError
from tests.integration.harness import (
    Cluster,
    free_port,
    make_file,
    open_api_process,
    open_cluster,
    start_buckets,
    stop_process,
    wait_live,
)


async def test_a_bucket_that_joins_later_is_used(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    make_file(src, 60_000)
    await cluster.client.upload(src, "before")
    newcomer = await cluster.add_bucket()
    await cluster.wait_live(7)
    # With 7 live buckets each upload skips one; the chance that 12 uploads all skip
    # the newcomer is (1/7)**12 with equal free space.
    for i in range(12):
        await cluster.client.upload(src, f"after-{i}")
    assert newcomer.fragment_ids(), "the new bucket received no fragment"
    used_by = {p["bucket"] for i in range(12) for p in (await cluster.client.stat(f"after-{i}"))["parts"]}
    assert newcomer.bucket_id in used_by


async def test_fewer_than_six_buckets_is_not_enough(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=5) as cluster:
        src = tmp_path / "f"
        make_file(src, 10 * MiB)
        with pytest.raises(RemoteError) as info:
            await cluster.client.upload(src, "nope")
        assert info.value.code == "not_enough_buckets"
        assert "5 live" in info.value.message
        assert cluster.all_files() == []
        assert cluster.uploads_recorded() == 0


async def test_a_dead_bucket_leaves_placement_and_downloads_fail_clearly(
    cluster: Cluster, tmp_path: Path
) -> None:
    src = tmp_path / "f"
    make_file(src, 6 * MiB)
    await cluster.client.upload(src, "kept")
    victim = cluster.buckets[0]
    victim.kill()
    await victim.proc.wait()
    await cluster.wait_live(5)

    with pytest.raises(RemoteError) as info:
        await cluster.client.upload(src, "refused")
    assert info.value.code == "not_enough_buckets"

    # Every file has a part on every bucket when N == 6, so this one needs the dead one.
    dst = tmp_path / "out"
    with pytest.raises(RemoteError) as info:
        await cluster.client.download("kept", dst)
    assert info.value.code == "bucket_unavailable"
    assert not dst.exists()
    status = await cluster.client.status()
    assert [b["live"] for b in status["buckets"] if b["id"] == victim.bucket_id] == [False]


async def test_registry_survives_an_api_restart(tmp_path: Path) -> None:
    """Files uploaded before a SIGKILL of the API process download after its restart."""
    membership = free_port()
    src = tmp_path / "f"
    digest = make_file(src, 7 * MiB + 3)
    buckets = await start_buckets(tmp_path, membership)
    try:
        async with open_api_process(tmp_path, membership) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            await client.upload(src, "survivor")
        # The API process is SIGKILLed on leaving the block; start a new one.
        async with open_api_process(tmp_path, membership) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            assert [f["name"] for f in await client.list()] == ["survivor"]
            got = await client.download("survivor", tmp_path / "out")
            assert got.sha256 == digest
    finally:
        for b in buckets:
            await stop_process(b.proc, signal.SIGTERM)
