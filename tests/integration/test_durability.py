"""Erasure coding on real processes: 8 buckets, 6+2, buckets killed and bytes flipped."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from karma8.client import FileInfo
from karma8.config import MiB
from karma8.errors import RemoteError
from karma8.registry.db import RegistryDB
from tests.integration.harness import Cluster, make_file, open_cluster, sha256_of, wait_until
from tests.integration.up_harness import karma8_up, stop_with_ctrl_c

SIZES = {"empty": 0, "one": 1, "small": 1000, "stripes": 3 * MiB + 17, "big": 20 * MiB + 5}
LEGACY = Path(__file__).parents[1] / "data" / "release-0.1.tar.gz"


@pytest.fixture
async def cluster8(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An in-process API server (6+2) with 8 live bucket processes."""
    async with open_cluster(tmp_path, buckets=8) as c:
        yield c


async def _upload_all(cluster: Cluster, root: Path) -> dict[str, str]:
    digests = {}
    for name, size in SIZES.items():
        digests[name] = make_file(root / name, size, seed=size)
        info = await cluster.client.upload(root / name, name)
        assert info.spare == 2
    return digests


async def _download_equal(cluster: Cluster, name: str, digest: str, root: Path) -> None:
    dst = root / f"back-{name.replace('/', '_')}"
    await cluster.client.download(name, dst)
    assert sha256_of(dst) == digest
    dst.unlink()


def _repairs(cluster: Cluster) -> dict[str, str]:
    db = cluster.registry()
    try:
        return {r.upload_id: r.reason for r in db.repairs()}
    finally:
        db.close()


async def test_any_two_killed_buckets_lose_nothing_and_a_third_is_a_clear_error(
    cluster8: Cluster, tmp_path: Path
) -> None:
    digests = await _upload_all(cluster8, tmp_path)
    stat = await cluster8.client.stat("big")
    assert stat["scheme"] == "6+2 (isa_l_rs_cauchy)"
    assert [p["role"] for p in stat["parts"]] == ["data"] * 6 + ["parity"] * 2
    assert {p["state"] for p in stat["parts"]} == {"ok"}
    by_part = {p["part"]: p["bucket"] for p in stat["parts"]}

    # Two data fragments of every multi-stripe file gone: everything must decode.
    for part in (1, 4):
        cluster8.bucket(by_part[part]).kill()
    for name, digest in digests.items():
        await _download_equal(cluster8, name, digest, tmp_path)

    cluster8.bucket(by_part[6]).kill()
    with pytest.raises(RemoteError, match="only 5 of the 6 fragments needed") as info:
        await cluster8.client.download("big", tmp_path / "never")
    assert info.value.code == "unreadable"
    assert not list(tmp_path.glob("*never*")), "a failed download left a file"


async def test_a_bucket_killed_mid_upload_leaves_the_upload_acknowledged(
    cluster8: Cluster, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    digest = make_file(src, 96 * MiB, seed=3)
    result: list[FileInfo] = []
    killed: list[str] = []

    async def upload() -> None:
        result.append(await cluster8.client.upload(src, "victim"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload)

        def a_put_is_under_way() -> bool:
            for b in cluster8.buckets:
                if b.tmp_files():
                    b.kill()
                    killed.append(b.bucket_id)
                    return True
            return False

        await wait_until(a_put_is_under_way, "a Put under way", within=30)

    [info] = result
    assert (info.sha256, info.spare) == (digest, 1)
    stat = await cluster8.client.stat("victim")
    owed = [p for p in stat["parts"] if p["state"] == "owed"]
    assert [p["bucket"] for p in owed] == killed
    assert _repairs(cluster8) == {stat["upload_id"]: "owed"}
    await _download_equal(cluster8, "victim", digest, tmp_path)


async def test_a_flipped_byte_on_disk_is_read_around(cluster8: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    digest = make_file(src, 3 * MiB + 17, seed=9)
    await cluster8.client.upload(src, "fragile")
    stat = await cluster8.client.stat("fragile")
    part = next(p for p in stat["parts"] if p["part"] == 2)
    holder = cluster8.bucket(part["bucket"])
    [fid] = holder.files_of(stat["upload_id"])
    holder.flip(fid, 1234, 0x40)  # a byte of the data, in a volume's needle or in a file

    await _download_equal(cluster8, "fragile", digest, tmp_path)
    assert _repairs(cluster8) == {stat["upload_id"]: "degraded_read"}


async def test_six_buckets_still_take_uploads_and_owe_the_parity(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=6) as cluster:
        src = tmp_path / "src"
        digest = make_file(src, MiB, seed=1)
        info = await cluster.client.upload(src, "six")
        assert (info.scheme, info.spare) == ("6+2 (isa_l_rs_cauchy)", 0)
        stat = await cluster.client.stat("six")
        assert [p["state"] for p in stat["parts"]] == ["ok"] * 6 + ["owed"] * 2
        assert stat["health"] == "at risk"
        assert _repairs(cluster) == {stat["upload_id"]: "under_protected"}
        await _download_equal(cluster, "six", digest, tmp_path)


async def test_a_store_written_by_release_0_1_opens_and_serves(tmp_path: Path) -> None:
    """The data directory of `karma8 up` from release 0.1 (no parity, fragment format 1)."""
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "data"
    expected = {
        "legacy/empty.bin": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "legacy/tiny.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "legacy/small.bin": "4a45139524022c424302944caa2640c47d24da8e2bdfc5e0434836262b9dbd8c",
        "legacy/medium.bin": "fe2aaf82bfa2ffec207a0c6fa7ce7d4af268d67e2672fdaec675f3f9b65d0854",
        "legacy/replaced.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    async with karma8_up(data, tmp_path / "up.log") as stack:
        cluster = Cluster(data, 0, stack.url)
        assert sorted(f["name"] for f in await cluster.client.list()) == sorted(expected)
        for name, digest in expected.items():
            await _download_equal(cluster, name, digest, tmp_path)
            stat = await cluster.client.stat(name)
            assert (stat["scheme"], stat["format"]) == ("6+0", 1)
        # New files next to the old ones get the new scheme.
        src = tmp_path / "new"
        digest = make_file(src, MiB + 1, seed=4)
        await cluster.client.upload(src, "new")
        assert (await cluster.client.stat("new"))["format"] == 2
        await _download_equal(cluster, "new", digest, tmp_path)
        await stop_with_ctrl_c(stack)

    # With 8 buckets the old files are rewritten with the configured 6+2.
    expected["new"] = digest
    async with karma8_up(
        data, tmp_path / "up.log", "--buckets", "8", KARMA8_API_REPAIR_INTERVAL="0.3"
    ) as stack:
        cluster = Cluster(data, 0, stack.url)

        async def upgraded() -> bool:
            for name in expected:
                stat = await cluster.client.stat(name)
                if (stat["scheme"], stat["format"], len(stat["parts"])) != ("6+2 (isa_l_rs_cauchy)", 2, 8):
                    return False
            return True

        await wait_until(upgraded, "every file rewritten as 6+2")
        for name, digest in expected.items():
            await _download_equal(cluster, name, digest, tmp_path)

        def old_versions_gone() -> bool:
            # With several API workers the janitor waits a grace period (docs/scaling.md).
            db = RegistryDB(data / "api" / "registry.sqlite3")
            try:
                return bool(db._query("SELECT COUNT(*) FROM uploads WHERE format = 1") == [(0,)])
            finally:
                db.close()

        await wait_until(old_versions_gone, "the old versions to be deleted")
        await stop_with_ctrl_c(stack)
    db = RegistryDB(data / "api" / "registry.sqlite3")
    try:
        assert db.repairs() == []
        assert db._query("SELECT COUNT(*) FROM uploads WHERE format = 1") == [(0,)], "old versions left"
    finally:
        db.close()
    shutil.rmtree(data)


# -- repair ---------------------------------------------------------------------------

REPAIR_FAST = {"repair_interval": 0.3, "repair_after": 3.0}


async def _fully_protected(cluster: Cluster, names: list[str]) -> bool:
    """Every file has all 8 fragments, ok, on 8 distinct live buckets, and the queue is empty."""
    if _repairs(cluster):
        return False
    for name in names:
        stat = await cluster.client.stat(name)
        parts = stat["parts"]
        if len(parts) != 8 or {p["state"] for p in parts} != {"ok"} or not all(p["live"] for p in parts):
            return False
        if len({p["bucket"] for p in parts}) != 8:
            return False
    return True


async def test_an_owed_fragment_is_written_when_its_bucket_returns(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=8, **REPAIR_FAST) as cluster:
        src = tmp_path / "src"
        digest = make_file(src, 96 * MiB, seed=5)
        killed = []

        async def upload() -> None:
            await cluster.client.upload(src, "owed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)

            def kill_a_writer() -> bool:
                for b in cluster.buckets:
                    if b.tmp_files():
                        b.kill()
                        killed.append(b)
                        return True
                return False

            await wait_until(kill_a_writer, "a Put under way")
        assert list(_repairs(cluster).values()) == ["owed"]

        await cluster.restart_bucket(killed[0])
        await wait_until(lambda: _fully_protected(cluster, ["owed"]), "the owed fragment written")
        # Any two buckets may go now.
        stat = await cluster.client.stat("owed")
        for p in stat["parts"][:2]:
            cluster.bucket(p["bucket"]).kill()
        await _download_equal(cluster, "owed", digest, tmp_path)


async def test_files_written_on_six_buckets_are_raised_to_six_plus_two(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=6, **REPAIR_FAST) as cluster:
        digests = {}
        for name, size in (("a", 3 * MiB + 1), ("b", 1000), ("c", 0)):
            digests[name] = make_file(tmp_path / name, size, seed=size)
            await cluster.client.upload(tmp_path / name, name)
        assert set(_repairs(cluster).values()) == {"under_protected"}
        status = await cluster.client.status()
        assert "only 6 live bucket(s)" in status["protection"]["warning"]

        await cluster.add_bucket()
        await cluster.add_bucket()
        await wait_until(lambda: _fully_protected(cluster, list(digests)), "every file raised to 6+2")
        first_two = {p["bucket"] for p in (await cluster.client.stat("a"))["parts"][:2]}
        for bucket_id in first_two:
            cluster.bucket(bucket_id).kill()
        for name, digest in digests.items():
            await _download_equal(cluster, name, digest, tmp_path)


async def test_a_bucket_lost_for_good_is_rebuilt_elsewhere_and_its_copies_go(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=9, **REPAIR_FAST) as cluster:
        digests = {}
        for i in range(6):
            name = f"f{i}"
            digests[name] = make_file(tmp_path / name, 200_000 * (i + 1), seed=i)
            await cluster.client.upload(tmp_path / name, name)
        victim = cluster.bucket((await cluster.client.stat("f5"))["parts"][0]["bucket"])
        held = victim.fragment_ids()
        assert held
        victim.kill()

        async def declared_lost() -> bool:
            status = await cluster.client.status()
            return any(d["id"] == victim.bucket_id and d["lost_in"] == 0 for d in status["repair"]["down"])

        await wait_until(declared_lost, "the bucket declared lost")
        status = await cluster.client.status()
        await wait_until(
            lambda: _fully_protected(cluster, list(digests)), "the lost bucket's fragments rebuilt"
        )
        assert status["repair"]["lost_after"] == 3.0
        for name, digest in digests.items():
            await _download_equal(cluster, name, digest, tmp_path)

        back = await cluster.restart_bucket(victim)
        await wait_until(lambda: not back.fragment_ids(), "the janitor deleting the returned bucket's copies")


async def test_a_flipped_byte_is_repaired(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=9, **REPAIR_FAST) as cluster:
        src = tmp_path / "src"
        digest = make_file(src, 3 * MiB + 17, seed=9)
        await cluster.client.upload(src, "fragile")
        stat = await cluster.client.stat("fragile")
        part = stat["parts"][2]
        holder = cluster.bucket(part["bucket"])
        [fid] = holder.files_of(stat["upload_id"])
        holder.flip(fid, 1234, 0x40)

        await _download_equal(cluster, "fragile", digest, tmp_path)
        await wait_until(lambda: _fully_protected(cluster, ["fragile"]), "the damaged fragment rewritten")
        after = await cluster.client.stat("fragile")
        assert after["parts"][2]["bucket"] != part["bucket"]
        await wait_until(lambda: not holder.files_of(stat["upload_id"]), "the damaged copy deleted")
        await _download_equal(cluster, "fragile", digest, tmp_path)


async def test_eight_buckets_one_gone_tolerate_one_loss_fewer_until_a_bucket_joins(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=8, **REPAIR_FAST) as cluster:
        digests = {}
        for i in range(3):
            name = f"g{i}"
            digests[name] = make_file(tmp_path / name, 300_000 * (i + 1), seed=10 + i)
            await cluster.client.upload(tmp_path / name, name)
        victim = cluster.buckets[0]
        victim.kill()

        async def one_loss_fewer() -> bool:
            status = await cluster.client.status()
            rep = status["repair"]
            lost = any(d["id"] == victim.bucket_id and d["lost_in"] == 0 for d in rep["down"])
            return lost and rep["by_spare"] == {"1": 3} and rep["running"] == 0

        await wait_until(one_loss_fewer, "3 files tolerating one loss, nowhere to rebuild")
        for name, digest in digests.items():
            await _download_equal(cluster, name, digest, tmp_path)
            assert (await cluster.client.stat(name))["health"] == "degraded"

        await cluster.add_bucket()
        await wait_until(
            lambda: _fully_protected(cluster, list(digests)), "full protection on the new bucket"
        )
        for name, digest in digests.items():
            await _download_equal(cluster, name, digest, tmp_path)


async def test_without_degraded_writes_too_few_buckets_refuse_uploads(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, buckets=6, degraded_writes=False, repair_interval=0.3) as cluster:
        src = tmp_path / "src"
        make_file(src, 1000, seed=2)
        with pytest.raises(RemoteError, match="6 live bucket\\(s\\), 7 needed") as info:
            await cluster.client.upload(src, "refused")
        assert info.value.code == "not_enough_buckets"
        assert cluster.all_files() == []
        await cluster.add_bucket()
        await cluster.wait_live(7)
        assert (await cluster.client.upload(src, "taken")).spare == 1
        db = cluster.registry()
        try:
            assert db.repair_counts() == (1, 0)  # owed its second parity fragment, 1 to spare
        finally:
            db.close()
