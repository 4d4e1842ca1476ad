"""The rebalancer on real processes: downloads during moves, and crashes in the middle of one.

Every test ends with the same check: each bucket's disk holds exactly the fragments the
registry places there (no copy left behind, none lost), and every file reads back intact.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.core.fragments import fragment_id
from karma8.registry.db import RegistryDB
from tests.integration.harness import (
    BucketProcess,
    free_port,
    make_file,
    open_api_process,
    open_cluster,
    open_raw,
    sha256_of,
    start_bucket,
    start_buckets,
    stop_process,
    wait_live,
    wait_until,
)
from tests.integration.test_crash import kill_api

#: Settings of these tests: no automatic runs (each test starts its own), unlimited speed.
#: Without parity: these tests are about moves, and repairs raising files written on 6
#: buckets to 6+2 would also write to the buckets that join.
MANUAL = {"rebalance_auto": False, "rebalance_bandwidth": 0, "parity": 0}


async def _call(url: str, path: str) -> dict[str, Any]:
    async with open_raw(url, path) as ws:
        reply: dict[str, Any] = json.loads(await ws.get_message())
    assert reply["ok"] is True, reply
    return reply


async def _upload_files(client: Client, root: Path, count: int, size: int) -> dict[str, str]:
    """Upload ``count`` files of ``size`` bytes; name -> sha256."""
    digests = {}
    for i in range(count):
        src = root / f"src-{i}"
        digests[f"f{i}"] = make_file(src, size, seed=i)
        await client.upload(src, f"f{i}")
    return digests


def _registry(root: Path) -> RegistryDB:
    return RegistryDB(root / "api" / "registry.sqlite3")


def _homes(db: RegistryDB) -> dict[str, set[str]]:
    """bucket id -> fragment ids of committed files the registry places there."""
    homes: dict[str, set[str]] = {}
    for upload_id, part, bucket_id in db._query(
        "SELECT f.upload_id, f.part, f.bucket_id FROM fragments f JOIN uploads u ON u.id = f.upload_id"
        " WHERE u.state = 'committed'"
    ):
        homes.setdefault(str(bucket_id), set()).add(fragment_id(str(upload_id), int(part)))
    return homes


def _disks_match_registry(root: Path, buckets: list[BucketProcess]) -> bool:
    """Every disk holds exactly its fragments; no move or stale copy is pending."""
    db = _registry(root)
    try:
        if db._query("SELECT (SELECT COUNT(*) FROM moves) + (SELECT COUNT(*) FROM stale)") != [(0,)]:
            return False
        homes = _homes(db)
    finally:
        db.close()
    return all(set(b.fragment_ids()) == homes.get(b.bucket_id, set()) and not b.tmp_files() for b in buckets)


async def _all_intact(client: Client, digests: dict[str, str], root: Path) -> None:
    for name, digest in digests.items():
        dst = root / f"back-{name}"
        await client.download(name, dst)
        assert sha256_of(dst) == digest, name


async def _rebalanced(client: Client, since: float) -> bool:
    status = await client.status()
    last = status["rebalancer"]["last"]
    return status["rebalancer"]["state"] == "idle" and last is not None and last["finished"] > since


async def test_a_download_succeeds_while_its_fragments_move(tmp_path: Path) -> None:
    # Small windows and queues, so the download's bucket streams stay open mid-fragment
    # while its client pauses, instead of the whole file sitting in buffers.
    async with open_cluster(
        tmp_path,
        **MANUAL,
        stripe_unit=256 * 1024,
        queue_depth=1,
        grpc_stream_window=256 * 1024,
        grpc_connection_window=MiB,
    ) as cluster:
        client = cluster.client
        digests = await _upload_files(client, tmp_path, 6, 24 * MiB)
        for _ in range(2):
            await cluster.add_bucket()
        await cluster.wait_live(8)
        new = {b.bucket_id for b in cluster.buckets[6:]}

        plan = await _call(cluster.url, "/rebalance?dry_run=1")
        assert {m["to"] for m in plan["moves"]} <= new
        assert {m["from"] for m in plan["moves"]}.isdisjoint(new)
        name, _ = Counter(m["name"] for m in plan["moves"]).most_common(1)[0]
        moving = {m["part"]: (m["from"], m["to"]) for m in plan["moves"] if m["name"] == name}

        def where() -> dict[int, str]:
            db = cluster.registry()
            try:
                found = db.lookup(name)
                assert found is not None
                return {f.part: f.bucket_id for f in found.fragments}
            finally:
                db.close()

        upload_id = ""
        async with open_raw(cluster.url, f"/download/{name}") as ws:
            header = json.loads(await ws.get_message())
            assert header["ok"] is True
            hasher = hashlib.sha256()
            for _ in range(3):
                data = await ws.get_message()
                assert isinstance(data, bytes)
                hasher.update(data)

            # The client pauses; the rebalancer moves this very file's fragments.
            started = (await _call(cluster.url, "/rebalance"))["started"]
            assert started is True
            await wait_until(
                lambda: all(where()[p] == to for p, (_, to) in moving.items()), f"the parts of {name} to move"
            )
            db = cluster.registry()
            try:
                found = db.lookup(name)
                assert found is not None
                upload_id = found.upload.upload_id
            finally:
                db.close()
            # The sources are still on disk: this download may still be reading them.
            for part, (src, _) in moving.items():
                assert fragment_id(upload_id, part) in cluster.bucket(src).fragment_ids()

            while (data := await ws.get_message()) != b"":
                assert isinstance(data, bytes)
                hasher.update(data)
        assert hasher.hexdigest() == digests[name]

        # Once the download is done, the source copies go.
        await wait_until(lambda: _disks_match_registry(tmp_path, cluster.buckets), "stale copies to go")
        for part, (src, _) in moving.items():
            assert fragment_id(upload_id, part) not in cluster.bucket(src).fragment_ids()
        await _all_intact(client, digests, tmp_path)
        status = await client.status()
        assert all(b["fragments"] for b in status["buckets"])


async def test_api_killed_mid_move_loses_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    membership = free_port()
    buckets = await start_buckets(tmp_path, membership)
    # 1 MiB/s: a 2 MiB fragment takes two seconds to copy, time enough to kill the API.
    slow = {**MANUAL, "rebalance_bandwidth": MiB}
    try:
        async with open_api_process(tmp_path, membership, slow) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 6)
            digests = await _upload_files(client, tmp_path, 6, 12 * MiB)
            for i in range(2):
                buckets.append(await start_bucket(tmp_path / f"new-{i}", membership))
            await wait_live(client, 8)
            assert (await _call(url, "/rebalance"))["started"] is True
            await wait_until(lambda: any(b.tmp_files() for b in buckets[6:]), "a move to be copying")
            kill_api(tmp_path)

        db = _registry(tmp_path)
        try:
            assert db._query("SELECT COUNT(*) FROM moves")[0][0] >= 1
        finally:
            db.close()

        async with open_api_process(tmp_path, membership, MANUAL) as url:
            client = Client(ClientConfig(api=url))
            await wait_live(client, 8)
            # The interrupted moves' copies are deleted; every file is still whole.
            await wait_until(
                lambda: _disks_match_registry(tmp_path, buckets), "the interrupted moves to clear"
            )
            await _all_intact(client, digests, tmp_path)
            # And a new run finishes the job.
            since = (await client.status())["rebalancer"]["last"]
            assert since is None
            assert (await _call(url, "/rebalance"))["started"] is True
            await wait_until(lambda: _rebalanced(client, 0.0), "the rebalance to finish")
            await wait_until(lambda: _disks_match_registry(tmp_path, buckets), "stale copies to go")
            assert all(b.fragment_ids() for b in buckets[6:])
            await _all_intact(client, digests, tmp_path)
    finally:
        for b in buckets:
            await stop_process(b.proc)


@pytest.mark.parametrize("role", ["src", "dst"])
async def test_bucket_killed_mid_move(tmp_path: Path, role: str) -> None:
    async with open_cluster(tmp_path, **{**MANUAL, "rebalance_bandwidth": MiB}) as cluster:
        client = cluster.client
        digests = await _upload_files(client, tmp_path, 6, 12 * MiB)
        for _ in range(2):
            await cluster.add_bucket()
        await cluster.wait_live(8)
        assert (await _call(cluster.url, "/rebalance"))["started"] is True
        await wait_until(lambda: any(b.tmp_files() for b in cluster.buckets[6:]), "a move to be copying")
        db = cluster.registry()
        try:
            (victim_id,) = db._query(f"SELECT {role} FROM moves LIMIT 1")[0]
        finally:
            db.close()
        victim = cluster.bucket(str(victim_id))
        victim.kill()
        await victim.proc.wait()

        # The run goes on without it; its moves from or to the victim are abandoned.
        await wait_until(lambda: _rebalanced(client, 0.0), "the rebalance to finish")
        last = (await client.status())["rebalancer"]["last"]
        assert last["failed"] >= 1
        if role == "dst":
            await _all_intact(client, digests, tmp_path)

        # Back with the same disk: the half-written copy is gone and nothing else is there.
        cluster.buckets.remove(victim)
        cluster.buckets.append(await start_bucket(victim.data_dir, cluster.membership_port))
        await cluster.wait_live(8)
        await wait_until(
            lambda: _disks_match_registry(tmp_path, cluster.buckets), "the abandoned copy to clear"
        )
        await _all_intact(client, digests, tmp_path)
