"""``karma8 rebalance`` and the rebalancer in ``karma8 status``, run as a user runs them.

Six buckets hold some files, two empty ones join, automatic runs are off: the dry run
must plan moves onto the new buckets only and move nothing; the real run must end with
the new buckets holding fragments, every disk holding exactly what the registry places
there, and every file intact.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import trio

from karma8.config import KiB, MiB
from karma8.core.fragments import fragment_id
from tests.integration.harness import (
    Cluster,
    karma8_cmd,
    make_file,
    open_cluster,
    sha256_of,
    wait_until,
)
from tests.integration.test_cli import karma8
from tests.integration.up_harness import cli_env, signal_when

#: File sizes: a few MiB in all, large and small, some with parts of unequal sizes.
SIZES = (3 * MiB + 17, 2 * MiB, MiB + 5, 700_000, 300_001, 64 * KiB + 3, 1000, 5)
#: Slow enough for a run (about 700 KiB here) to outlast an interrupted watch and the next
#: command's start by seconds.
BANDWIDTH = 128 * KiB


def registry_homes(cluster: Cluster) -> dict[str, set[str]]:
    """bucket id -> the fragment ids the registry places there."""
    db = cluster.registry()
    try:
        rows = db._query("SELECT upload_id, part, bucket_id FROM fragments")
    finally:
        db.close()
    homes: dict[str, set[str]] = {b.bucket_id: set() for b in cluster.buckets}
    for upload_id, part, bucket_id in rows:
        homes[str(bucket_id)].add(fragment_id(str(upload_id), int(part)))
    return homes


def pending_copies(cluster: Cluster) -> int:
    """Moves under way plus stale copies waiting for deletion."""
    db = cluster.registry()
    try:
        return int(db._query("SELECT (SELECT COUNT(*) FROM moves) + (SELECT COUNT(*) FROM stale)")[0][0])
    finally:
        db.close()


def fragment_rows(cluster: Cluster) -> list[tuple[Any, ...]]:
    db = cluster.registry()
    try:
        return [tuple(r) for r in db._query("SELECT * FROM fragments ORDER BY upload_id, part")]
    finally:
        db.close()


def disks(cluster: Cluster) -> dict[str, set[str]]:
    """bucket id -> the fragment files on its disk (and any temporary file)."""
    return {b.bucket_id: {*b.fragment_ids(), *(p.name for p in b.tmp_files())} for b in cluster.buckets}


async def interrupt_a_watch(tmp_path: Path, env: dict[str, str]) -> None:
    """``karma8 rebalance``, Ctrl-C once it shows progress: it stops watching, exit 130."""
    out, err = tmp_path / "rebalance.out", tmp_path / "rebalance.err"
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = await trio.lowlevel.open_process(
            karma8_cmd("rebalance"), stdout=out_f, stderr=err_f, env=env, cwd=tmp_path
        )

    def watching() -> bool:
        assert proc.poll() is None, f"exited early ({proc.returncode}): {err.read_text()}"
        return err.read_text().startswith("rebalance: ")

    await signal_when(proc, watching, "karma8 rebalance to show progress", signal.SIGINT)
    assert proc.returncode == 130, err.read_text()
    assert out.read_text().startswith("rebalance started: ")
    assert err.read_text().splitlines()[-1] == (
        "karma8: stopped watching; the rebalance goes on in the server (karma8 status shows it)"
    )


async def test_rebalance_and_status_from_the_cli(tmp_path: Path) -> None:
    # Without parity: repairs would also fill the buckets that join (test_durability.py).
    async with open_cluster(
        tmp_path, rebalance_auto=False, rebalance_bandwidth=BANDWIDTH, parity=0
    ) as cluster:
        client = cluster.client
        digests = {}
        for i, size in enumerate(SIZES):
            src = tmp_path / f"src-{i}"
            digests[f"files/f{i}"] = make_file(src, size, seed=i)
            await client.upload(src, f"files/f{i}")
        await wait_until(lambda: disks(cluster) == registry_homes(cluster), "the uploads on disk")
        for _ in range(2):
            await cluster.add_bucket()
        await cluster.wait_live(8)
        new = {b.bucket_id for b in cluster.buckets[6:]}
        old = {b.bucket_id for b in cluster.buckets[:6]}
        env = cli_env(KARMA8_API=cluster.url)

        # -- the dry run: a plan onto the new buckets, nothing moved ----------------------
        rows_before, disks_before = fragment_rows(cluster), disks(cluster)
        dry = (await karma8("rebalance", "--dry-run", cwd=tmp_path, env=env)).ok()
        moves = [line.split() for line in dry.out.splitlines() if " -> " in line and line.startswith("  ")]
        assert moves, dry.out
        # Both new buckets receive; with few, large fragments some moves even out old ones too.
        assert new <= {m[2] for m in moves}, dry.out
        assert all(m[0] != m[2] for m in moves), dry.out
        assert dry.out.startswith("plan: "), dry.out
        assert "spread infinite -> " in dry.out, "the new buckets are empty"
        assert dry.out.rstrip().endswith("dry run: nothing moved"), dry.out
        plan = json.loads((await karma8("rebalance", "--dry-run", "--json", cwd=tmp_path, env=env)).ok().out)
        assert plan["count"] == len(moves) == len(plan["moves"])
        assert plan["truncated"] is False
        assert new <= {m["to"] for m in plan["moves"]}
        assert 0 < plan["bytes"] == sum(m["size"] for m in plan["moves"])
        assert plan["minimum"] > 0
        assert plan["spread"] is None
        assert plan["spread_after"] is not None
        assert fragment_rows(cluster) == rows_before, "a dry run changed the registry"
        assert pending_copies(cluster) == 0
        assert disks(cluster) == disks_before, "a dry run changed a bucket's disk"
        assert all(not disks_before[b] for b in new)

        # -- Ctrl-C stops watching; the run goes on ------------------------------------------
        await interrupt_a_watch(tmp_path, env)

        # -- a second command watches the run under way to its end ------------------------
        run = (await karma8("rebalance", cwd=tmp_path, env=env)).ok()
        lines = run.out.splitlines()
        assert lines[0].startswith(("rebalance started: ", "a rebalance is under way")), run.out
        assert len(lines) == 2, run.out
        assert lines[-1].startswith("moved "), run.out
        assert ", 0 failed," in lines[-1], run.out
        assert lines[-1].endswith(f"; spread now {plan['spread_after']:.3f}"), (run.out, plan)
        assert run.err.startswith("rebalance: "), "no progress shown"
        st = await client.status()
        assert st["rebalancer"]["state"] == "idle"
        last = st["rebalancer"]["last"]
        assert last is not None
        assert last["failed"] == 0, last
        assert (last["moves"], last["moved"]) == (plan["count"], plan["bytes"]), (last, plan)
        assert f"in {last['moves']} move(s)" in lines[-1]

        homes = registry_homes(cluster)
        assert all(homes[b] for b in new), homes
        assert all(disks(cluster)[b] for b in new), "the new buckets hold nothing on disk"

        def disks_match_registry() -> bool:
            return pending_copies(cluster) == 0 and disks(cluster) == registry_homes(cluster)

        await wait_until(disks_match_registry, "stale copies to go (disks = registry)")
        assert registry_homes(cluster) == homes, "fragments moved after the run ended"
        for name, digest in digests.items():
            dst = tmp_path / "back"
            await client.download(name, dst)
            assert sha256_of(dst) == digest, name

        # -- status, as text and as JSON ---------------------------------------------------
        async def heartbeats_caught_up() -> bool:
            buckets = (await client.status())["buckets"]
            return all(b["fragments"] == b["placed_fragments"] for b in buckets)

        await wait_until(heartbeats_caught_up, "the buckets' own counts to match the registry")
        text = (await karma8("status", cwd=tmp_path, env=env)).ok().out
        lines = text.splitlines()
        assert lines[0] == "8 live bucket(s), 6 parts per file"
        assert lines[1].split() == ["bucket", "address", "live", "used", "free", "capacity", "fill", "frags"]
        rows = {line.split()[0]: line for line in lines[2:10]}
        assert set(rows) == new | old
        assert all(row.split()[2] == "yes" and "%" in row for row in rows.values())
        assert lines[10].startswith("spread: "), text
        assert lines[11].startswith("rebalancer: idle (automatic runs off); last run moved "), text
        # This cluster runs without parity: new files get what is configured, no warning.
        assert lines[12] == "protection: new files get 6+0 (configured 6+0, acknowledged with 6 fragments)", (
            text
        )
        assert lines[13].startswith("files: 8 ("), text
        assert lines[13].endswith(": 8 survive 0 more loss(es)"), text
        assert lines[14] == "repair: repair queue empty", text
        assert len(lines) == 15, text

        st = json.loads((await karma8("status", "--json", cwd=tmp_path, env=env)).ok().out)
        reb = st["rebalancer"]
        assert (reb["state"], reb["auto"], reb["moved"]) == ("idle", False, 0)
        assert reb["last"]["moves"] == last["moves"]
        assert reb["last"]["finished"] >= reb["last"]["started"]
        assert isinstance(st["spread"], float)
        for b in st["buckets"]:
            assert b["fill"] == round(b["used"] / b["capacity"], 6)
            assert b["placed_fragments"] == len(homes[b["id"]])

        # -- balanced now: nothing to do ---------------------------------------------------
        again = (await karma8("rebalance", cwd=tmp_path, env=env)).ok()
        assert again.out.startswith("nothing to move (spread "), again.out
        assert registry_homes(cluster) == homes
