"""The background passes' pages (karma8/registry/passes.py), on SQLite and PostgreSQL.

Tiny pages (3 rows) over many more rows: every walk sees each row once, pages end at
the end of an upload, and every query is an index range (no scan of a big table).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from karma8.core.fragments import fragment_id
from karma8.registry.database import Tx
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow

PARTS = 3
BUCKETS = 5
DIGEST = "cd" * 32
PAGE = 3
#: Tables with a row per bucket or per move under way: read whole, they stay small.
SMALL = ("placed", "moves", "buckets")


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


def _live() -> list[BucketSpace]:
    return [BucketSpace(f"b{i}", 1 << 30, 1 << 30) for i in range(BUCKETS)]


def _place(db: RegistryDB, n: int, name: str) -> str:
    upload_id = f"{n * 7919 % 4096:03x}{n:029x}"  # ids not in insertion order
    db.place_upload(UploadRow(upload_id, name, 30, PARTS, 1, "in_progress"), [10] * PARTS, _live())
    return upload_id


def _fill(db: RegistryDB, files: int = 40) -> dict[str, str]:
    """Committed, failed, deleted and replaced uploads, copies under way and stale ones."""
    states = {}
    for n in range(files):
        upload_id = _place(db, n, f"f{n % (files // 2)}")
        if n % 5 == 4:
            db.fail_upload(upload_id, 2.0)
            states[upload_id] = "failed"
            continue
        db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=2.0)
        states[upload_id] = "committed"
    for n in range(files, files + 4):
        upload_id = _place(db, n, f"g{n}")
        db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=2.0)
        db.delete_file(f"g{n}", 3.0)
    with db.database.transaction() as tx:
        some = tx.execute(
            "SELECT upload_id, part, bucket_id FROM fragments ORDER BY upload_id, part"
        ).fetchall()
        for i, (upload_id, part, bucket) in enumerate(some[:30]):
            other = f"b{(int(bucket[1:]) + 1 + i % 2) % BUCKETS}"
            if i % 3 == 0:
                tx.execute(
                    "INSERT INTO moves (upload_id, part, src, dst, size, sha256, started)"
                    " VALUES (?, ?, ?, ?, 10, '', 1)",
                    (upload_id, part, bucket, other),
                )
            elif i % 3 == 1:
                tx.execute(
                    "INSERT INTO stale (bucket_id, upload_id, part, size, since) VALUES (?, ?, ?, 10, 1)",
                    (other, upload_id, part),
                )
    return states


def test_expected_pages_cover_the_full_view_once(db: RegistryDB) -> None:
    _fill(db)
    for b in range(BUCKETS):
        bucket = f"b{b}"
        seen: dict[str, str] = {}
        after, pages = "", 0
        while True:
            page, end = db.expected_page(bucket, after, PAGE)
            pages += 1
            assert not seen.keys() & page.keys()
            assert all(after < fid.split(".")[0] <= (end or "~") for fid in page)
            seen.update(page)
            if end is None:
                break
            assert end > after
            after = end
        assert seen == db.expected_on(bucket)
        assert pages > 3, "the walk took more than a few pages"


def test_an_expected_page_ends_at_upto_and_keeps_whole_uploads(db: RegistryDB) -> None:
    _fill(db)
    full = db.expected_on("b0")
    uploads = sorted({fid.split(".")[0] for fid in full})
    page, end = db.expected_page("b0", "", 1000, upto=uploads[4])
    assert end == uploads[4]
    assert page == {fid: s for fid, s in full.items() if fid.split(".")[0] <= uploads[4]}
    # A page of one row still covers whole uploads: every copy of the upload it ends at.
    with db.database.transaction() as tx:
        tx.execute(
            "INSERT INTO stale (bucket_id, upload_id, part, size, since) VALUES ('b0', ?, 63, 1, 1)",
            (uploads[0],),
        )
    page, end = db.expected_page("b0", "", 1)
    assert end == uploads[0]
    assert fragment_id(uploads[0], 63) in page
    assert {fid.split(".")[0] for fid in page} == {uploads[0]}


def test_deletion_pages_cover_every_pending_deletion_once(db: RegistryDB) -> None:
    states = _fill(db)
    assert "failed" in states.values()
    walked: list[tuple[str, str]] = []
    for state in ("deleting", "failed"):
        after: str | None = ""
        while after is not None:
            pairs, after = db.deletions_page(state, after, PAGE)
            walked += pairs
    assert sorted(walked) == db.pending_deletions()
    assert len(walked) > PAGE * 3


def test_stale_pages_cover_every_stale_copy_once(db: RegistryDB) -> None:
    _fill(db)
    walked: list[tuple[str, str, int]] = []
    after = None
    while page := db.stale_page(after, PAGE):
        walked += page
        after = page[-1]
    assert walked == sorted((s.bucket_id, s.upload_id, s.part) for s in db.pending_stale())
    assert len(walked) > PAGE * 3


def test_lost_buckets_are_queued_page_by_page_once_per_file(db: RegistryDB) -> None:
    _fill(db)
    committed = {str(u) for (u,) in db._query("SELECT id FROM uploads WHERE state = 'committed'")}
    lost = ["b1", "b3"]
    queued = db.queue_lost_buckets(lost, 5.0, limit=PAGE)
    on_lost = {u: {f.part for f in db.fragments(u) if f.bucket_id in lost} for u in committed}
    expected = {u: parts for u, parts in on_lost.items() if parts}
    assert queued == len(expected)
    rows = {r.upload_id: r for r in db.repairs()}
    assert rows.keys() == expected.keys()
    for upload_id, parts in expected.items():
        assert rows[upload_id].bad == parts
        assert rows[upload_id].spare == PARTS - len(parts) - PARTS  # no parity here
        assert rows[upload_id].reason == "bucket_lost"


# -- every query of the passes is an index range ---------------------------------------


class _Recorder:
    """A transaction that remembers the statements run through it."""

    def __init__(self, tx: Tx, seen: list[tuple[str, tuple[object, ...]]]) -> None:
        self._tx = tx
        self._seen = seen

    def execute(self, sql: str, args: Any = ()) -> Any:
        self._seen.append((sql, tuple(args)))
        return self._tx.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> None:
        self._tx.executemany(sql, rows)


def _recording(db: RegistryDB, seen: list[tuple[str, tuple[object, ...]]]) -> None:
    database = db.database
    read, transaction = database.read, database.transaction

    @contextlib.contextmanager
    def rec_read() -> Iterator[Any]:
        with read() as tx:
            yield _Recorder(tx, seen)

    @contextlib.contextmanager
    def rec_tx() -> Iterator[Any]:
        with transaction() as tx:
            yield _Recorder(tx, seen)

    database.read = rec_read  # type: ignore[method-assign]
    database.transaction = rec_tx  # type: ignore[method-assign]


def _plan(db: RegistryDB, sql: str, args: tuple[object, ...]) -> str:
    with db.database.read() as tx:
        if db.database.name == "sqlite":
            rows = tx.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
            return "\n".join(str(r[-1]) for r in rows)
        # Tables this small would be read whole anyway: ask what an index can do.
        tx.execute("SET enable_seqscan = off")
        try:
            return "\n".join(str(r[0]) for r in tx.execute("EXPLAIN " + sql, args).fetchall())
        finally:
            tx.execute("RESET enable_seqscan")


def test_every_query_of_the_passes_is_an_index_range(db: RegistryDB) -> None:
    _fill(db)
    seen: list[tuple[str, tuple[object, ...]]] = []
    _recording(db, seen)
    db.expected_page("b0", "", PAGE)
    db.expected_page("b0", "", PAGE, upto="8")
    db.deletions_page("failed", "", PAGE)
    db.stale_page(("b1", "0", 0), PAGE)
    db.queue_lost_buckets(["b1", "b2"], 5.0, limit=PAGE)
    db.known_on("b0", [fragment_id("0" * 32, 1), fragment_id("f" * 32, 2)])
    db.queue_upgrades(2, 5.0, limit=PAGE)
    db.queue_upgrades(2, 6.0, limit=PAGE)  # skipped: one row read
    db.due_repairs(9e9, 5)
    more = {f"b{i}": 1 << 30 for i in range(BUCKETS + 2)}
    db.rebalance_plan(more, 0.0, PARTS, most=20)
    db.start_move(more, 0.0, PARTS)
    del db.database.read, db.database.transaction  # back to the class's methods
    queries = [
        (sql, args)
        for sql, args in seen
        if re.match(r"\s*(SELECT|INSERT .* SELECT)", sql, re.IGNORECASE | re.DOTALL)
    ]
    assert len(queries) > 10
    assert any("ORDER BY f.size DESC, f.upload_id DESC" in sql for sql, _ in queries)
    for sql, args in queries:
        plan = _plan(db, sql, args)
        if db.database.name == "sqlite":
            scans = [
                line
                for line in plan.splitlines()
                if line.startswith("SCAN ") and line.split()[1] not in SMALL
            ]
            # The rebalancer's and the repairer's reads come in index order, never sorted.
            if "ORDER BY f.size" in sql or "FROM repairs WHERE spare" in sql:
                scans += [line for line in plan.splitlines() if "TEMP B-TREE" in line]
        else:
            scans = [
                line
                for line in plan.splitlines()
                if "Seq Scan" in line and not re.search(rf"Seq Scan on ({'|'.join(SMALL)})\b", line)
            ]
            if "ORDER BY f.size" in sql or "FROM repairs WHERE spare" in sql:
                scans += [line for line in plan.splitlines() if line.strip().startswith("Sort")]
        assert not scans, f"{sql}\n{plan}"
