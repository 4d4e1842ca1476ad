"""Work proportional to what is pending, on SQLite and PostgreSQL: the janitor walks only
uploads with fragments left, the upgrade queueing is skipped when nothing changed and
walks in tiny pages when it must, due repairs are read without passing the others."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from karma8.api.reconcile import Capped
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow

PARTS = 3
DIGEST = "cd" * 32
LIVE = [BucketSpace(f"b{i}", 1 << 30, 1 << 30) for i in range(PARTS + 3)]


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


def _id(n: int) -> str:
    return f"{n * 7919 % 4096:03x}{n:029x}"


def _place(db: RegistryDB, n: int, parity: int = 0, fmt: int = 2) -> str:
    upload = UploadRow(_id(n), f"f{n}", 30, PARTS, 1, "in_progress", parity=parity, format=fmt)
    db.place_upload(upload, [10] * (PARTS + parity), LIVE)
    return upload.upload_id


def _commit(db: RegistryDB, n: int, parity: int = 0, fmt: int = 2) -> str:
    upload_id = _place(db, n, parity, fmt)
    db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS + parity)}, now=1.0)
    return upload_id


def _walk(db: RegistryDB, state: str) -> tuple[set[str], int]:
    """The uploads a janitor's walk of ``state`` sees, and its pages."""
    seen: set[str] = set()
    after: str | None = ""
    pages = 0
    while after is not None:
        pairs, after = db.deletions_page(state, after, 2)
        pages += 1
        seen |= {u for u, _ in pairs}
    return seen, pages


def test_failed_uploads_leave_the_janitors_walk_once_their_fragments_are_gone(db: RegistryDB) -> None:
    failed = [_place(db, n) for n in range(9)]
    for upload_id in failed:
        db.fail_upload(upload_id, 2.0)
    seen, pages = _walk(db, "failed")
    assert seen == set(failed)
    assert pages >= 5
    # Every bucket confirms for the first 7, and one bucket of the 8th.
    for upload_id in failed[:7]:
        for f in db.fragments(upload_id):
            db.fragments_deleted(upload_id, f.bucket_id)
    db.fragments_deleted(failed[7], db.fragments(failed[7])[0].bucket_id)
    seen, pages = _walk(db, "failed")
    assert seen == set(failed[7:])
    assert pages == 2  # two uploads left: a full page and an empty read, whatever failed before
    assert sorted(seen) == sorted({u for u, _ in db.pending_deletions()})
    # Failed uploads stay as records.
    assert all((u := db.upload(upload_id)) is not None and u.state == "failed" for upload_id in failed)


def test_replaced_and_deleted_versions_are_walked_until_deleted(db: RegistryDB) -> None:
    old = _commit(db, 1)
    _commit(db, 2)
    new = _place(db, 3)
    with db.database.transaction() as tx:  # the same name: version 3 replaces version 1
        tx.execute("UPDATE uploads SET name = 'f1' WHERE id = ?", (new,))
    db.commit_upload(new, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=2.0)
    db.delete_file("f2", 3.0)
    assert _walk(db, "deleting")[0] == {old, _id(2)}
    for f in db.fragments(old):
        db.fragments_deleted(old, f.bucket_id)
    assert _walk(db, "deleting")[0] == {_id(2)}
    assert db.upload(old) is None


def test_upgrades_are_queued_in_pages_and_skipped_when_nothing_changed(db: RegistryDB) -> None:
    weak = {_commit(db, n, parity=0) for n in range(5)}
    old = {_commit(db, n, parity=2, fmt=1) for n in range(5, 8)}
    strong = {_commit(db, n, parity=2) for n in range(8, 11)}

    def queued() -> set[str]:
        return {r.upload_id for r in db.repairs() if r.reason == "upgrade"}

    assert db.queue_upgrades(2, 5.0, limit=2) == len(weak | old)
    assert queued() == weak | old
    for upload_id in weak | old:
        db.repair_done(upload_id)
    # The same protection again: one row read, nothing walked, nothing queued.
    assert db.queue_upgrades(2, 6.0, limit=2) == 0
    assert queued() == set()
    # A start with less parity lowers the record; its files are found by the next raise.
    assert db.queue_upgrades(1, 7.0, limit=2) == 0
    meanwhile = _commit(db, 20, parity=1)
    assert db.queue_upgrades(2, 8.0, limit=2) == len(weak | old) + 1
    assert queued() == weak | old | {meanwhile}
    # Parity raised: every file below it.
    assert db.queue_upgrades(3, 9.0, limit=2) == len(strong)
    assert queued() == weak | old | strong | {meanwhile}
    assert db.queue_upgrades(3, 9.0, limit=2) == 0


def test_due_repairs_come_most_at_risk_first_past_those_not_due(db: RegistryDB) -> None:
    ids = [_commit(db, n) for n in range(12)]
    # spare -1, 0, 1 (due), with some of each not due until later.
    for i, upload_id in enumerate(ids):
        spare = i % 3 - 1
        next_try = 100.0 if i % 4 == 0 else 1.0 + i
        db.queue_repair(upload_id, "test", spare, 0.0)
        db.repair_later(upload_id, spare, [], next_try)
    rows = [r for r in db.repairs()]
    due = sorted(
        (r for r in rows if r.upload_id in ids and ids.index(r.upload_id) % 4 != 0),
        key=lambda r: (r.spare, 1.0 + ids.index(r.upload_id), r.upload_id),
    )
    assert [r.upload_id for r in db.due_repairs(50.0, 100)] == [r.upload_id for r in due]
    assert [r.upload_id for r in db.due_repairs(50.0, 3)] == [r.upload_id for r in due[:3]]
    skip = [due[0].upload_id, due[4].upload_id]
    assert [r.upload_id for r in db.due_repairs(50.0, 4, skip)] == [
        r.upload_id for r in due if r.upload_id not in skip
    ][:4]
    assert db.due_repairs(0.5, 10) == []


def test_the_corrupt_set_keeps_the_latest_ids() -> None:
    corrupt = Capped(3)
    for fid in ("a.0", "b.0", "c.0", "a.0", "d.0"):  # "a.0" found again: the latest
        corrupt.add(fid)
    assert len(corrupt) == 3
    assert [f for f in ("a.0", "b.0", "c.0", "d.0") if f in corrupt] == ["a.0", "c.0", "d.0"]
    corrupt.discard("c.0")
    corrupt.discard("x.0")
    assert len(corrupt) == 2
