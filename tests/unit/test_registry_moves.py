"""The registry's side of placement and rebalancing: the ledger, moves and stale copies."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from karma8.core.fragments import fragment_id
from karma8.registry.db import BucketSpace, MoveRow, RegistryDB, UploadRow

GiB = 1 << 30
PARTS = 3
DIGEST = "cd" * 32


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


def _live(n: int, capacity: int = GiB) -> list[BucketSpace]:
    return [BucketSpace(f"b{i}", capacity, capacity) for i in range(n)]


def _capacities(n: int, capacity: int = GiB) -> dict[str, int]:
    return {b.bucket_id: b.capacity for b in _live(n, capacity)}


def _place(db: RegistryDB, n: int, name: str, part: int, buckets: int = PARTS) -> str:
    upload_id = f"{n:032x}"
    db.place_upload(
        UploadRow(upload_id, name, part * PARTS, PARTS, 1, "in_progress"), [part] * PARTS, _live(buckets)
    )
    return upload_id


def _put(db: RegistryDB, n: int, name: str, part: int = 100, buckets: int = PARTS) -> str:
    upload_id = _place(db, n, name, part, buckets)
    db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=1.0)
    return upload_id


def _one_movable(db: RegistryDB) -> str:
    """Files on b0..b2 where exactly one fragment (a part of "a") fits the gap of an empty b3."""
    for i, name in enumerate("bcd"):
        _put(db, 10 + i, name, part=100)
    return _put(db, 1, "a", part=30)


def _assert_next_move_avoids(db: RegistryDB, upload_id: str, bucket_id: str) -> None:
    """The next move is not a part of ``upload_id`` to ``bucket_id`` (and leaves no trace)."""
    move = db.start_move(_capacities(4), 0.0, PARTS)
    if move is not None:
        assert (move.upload_id, move.dst) != (upload_id, bucket_id)
        db.abandon_move(move)
        db.stale_deleted(move.dst, move.upload_id, [move.part])


def _recomputed(db: RegistryDB) -> dict[str, tuple[int, int]]:
    rows = db._query(
        "SELECT f.bucket_id, SUM(f.size), COUNT(*) FROM fragments f JOIN uploads u ON u.id = f.upload_id"
        " WHERE u.state IN ('in_progress', 'committed') GROUP BY f.bucket_id"
    )
    return {str(b): (int(n), int(k)) for b, n, k in rows}


def _nonzero(ledger: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {b: v for b, v in ledger.items() if v != (0, 0)}


def test_ledger_follows_every_change(registry_url: str) -> None:
    rng = random.Random(4)
    db = RegistryDB(registry_url)
    names = [f"f{i}" for i in range(8)]
    in_progress: dict[str, str] = {}  # upload id -> name (one client upload of a name at a time)
    moving: list[MoveRow] = []
    for step in range(600):
        op = rng.choice(["place", "commit", "fail", "delete", "move", "finish", "abandon", "gc", "reopen"])
        free = sorted(set(names) - set(in_progress.values()))
        if op == "place" and free:
            name = rng.choice(free)
            in_progress[_place(db, step, name, rng.randrange(1, 1000), buckets=5)] = name
        elif op in ("commit", "fail") and in_progress:
            upload_id = rng.choice(sorted(in_progress))
            del in_progress[upload_id]
            if op == "commit":
                db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=1.0)
            else:
                db.fail_upload(upload_id, now=1.0)
        elif op == "delete":
            db.delete_file(rng.choice(names), now=1.0)
        elif op == "move":
            move = db.start_move(_capacities(5), 0.0, PARTS)
            if move is not None:
                moving.append(move)
        elif op in ("finish", "abandon") and moving:
            move = moving.pop(rng.randrange(len(moving)))
            db.finish_move(move) if op == "finish" else db.abandon_move(move)
        elif op == "gc":
            for upload_id, bucket_id in db.pending_deletions()[:3]:
                db.fragments_deleted(upload_id, bucket_id)
        elif op == "reopen":
            db.close()
            db = RegistryDB(registry_url)
        assert _nonzero(db.placed()) == _recomputed(db), f"after step {step} ({op})"
        assert db.ledger_drift() == {}
    db.close()


def test_placement_reads_the_ledger(db: RegistryDB) -> None:
    # b0..b2 hold a file; a new upload on 3 of 4 buckets must use the empty b3.
    _put(db, 1, "a", part=100)
    assert (
        db.place_upload(UploadRow(f"{2:032x}", "b", 3, PARTS, 1, "in_progress"), [1] * PARTS, _live(4)).count(
            "b3"
        )
        == 1
    )


def test_a_move_switches_the_row_and_leaves_the_source_stale(db: RegistryDB) -> None:
    upload_id = _one_movable(db)
    move = db.start_move(_capacities(4), 0.0, PARTS)
    assert move is not None
    assert (move.upload_id, move.dst) == (upload_id, "b3")
    fid = fragment_id(upload_id, move.part)
    # Under way: the copy on b3 is known (not an orphan), the fragment still lives on src.
    assert db.expected_on("b3") == {fid: "moving"}
    assert db.expected_on(move.src)[fid] == "committed"
    # No second part of "a" may go to b3 while this one moves there.
    _assert_next_move_avoids(db, upload_id, "b3")

    assert db.finish_move(move)
    assert {f.part: f.bucket_id for f in db.fragments(upload_id)}[move.part] == "b3"
    assert db.expected_on(move.src)[fid] == "stale"
    assert db.expected_on("b3")[fid] == "committed"
    assert [(s.bucket_id, s.part) for s in db.pending_stale()] == [(move.src, move.part)]
    assert _nonzero(db.placed()) == _recomputed(db)
    db.stale_deleted(move.src, upload_id, [move.part])
    assert db.pending_stale() == []


def test_a_move_of_a_replaced_file_does_not_switch(db: RegistryDB) -> None:
    old = _one_movable(db)
    move = db.start_move(_capacities(4), 0.0, PARTS)
    assert move is not None
    _put(db, 2, "a")  # replaces "a" while its part is being copied
    assert not db.finish_move(move)
    assert {f.part: f.bucket_id for f in db.fragments(old)}[move.part] == move.src
    assert [(s.bucket_id, s.upload_id) for s in db.pending_stale()] == [("b3", old)]


def test_abandoned_moves_leave_their_copies_stale(db: RegistryDB) -> None:
    _one_movable(db)
    first = db.start_move(_capacities(4), 0.0, PARTS)
    assert first is not None
    db.abandon_move(first)
    assert [(s.bucket_id, s.part) for s in db.pending_stale()] == [("b3", first.part)]
    # The stale copy blocks b3 for that file until it is deleted: no part may meet it there.
    _assert_next_move_avoids(db, first.upload_id, "b3")
    db.stale_deleted("b3", first.upload_id, [first.part])
    second = db.start_move(_capacities(4), 0.0, PARTS)
    assert second is not None
    # A restart abandons whatever was under way.
    assert db.start_server("127.0.0.1:8080") == (0, 1)
    assert [(s.bucket_id, s.part) for s in db.pending_stale()] == [(second.dst, second.part)]
    assert db.expected_on(second.dst)[second.fragment_id] == "stale"


def test_deleting_an_upload_on_a_bucket_also_clears_its_stale_copies(db: RegistryDB) -> None:
    upload_id = _one_movable(db)
    move = db.start_move(_capacities(4), 0.0, PARTS)
    assert move is not None
    assert db.finish_move(move)
    db.delete_file("a", now=2.0)
    db.fragments_deleted(upload_id, move.src)
    assert db.pending_stale() == []


def test_a_dry_run_records_nothing(db: RegistryDB) -> None:
    for i in range(12):
        _put(db, i, f"f{i}", part=100 + i)
    before = (db.placed(), db._query("SELECT * FROM fragments ORDER BY upload_id, part"))
    plan = db.plan_moves(_capacities(5), 0.0, PARTS)
    assert plan
    assert {m.name for m in plan} <= {f"f{i}" for i in range(12)}
    assert {m.dst for m in plan} == {"b3", "b4"}
    assert (db.placed(), db._query("SELECT * FROM fragments ORDER BY upload_id, part")) == before
    assert db._query("SELECT COUNT(*) FROM moves") == [(0,)]
    # The real run follows the same plan.
    done = []
    while (move := db.start_move(_capacities(5), 0.0, PARTS)) is not None:
        assert db.finish_move(move)
        done.append(move)
    assert [(m.upload_id, m.part, m.dst) for m in done] == [(m.upload_id, m.part, m.dst) for m in plan]
