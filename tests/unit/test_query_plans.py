"""Every statement the registry runs for a client request is planned on an index: no full
scan of ``files``, ``uploads`` or ``fragments`` (SQLite's ``EXPLAIN QUERY PLAN``,
PostgreSQL's ``EXPLAIN`` with sequential scans disabled, so that only a query no index
can serve is planned as one).

The statements are recorded as the registry's real calls run them, on both databases;
the calls are those the API's request handlers make (upload, download, stat, listing,
delete, verify's queueing, status) and those of a server's start and of every heartbeat
(the background passes read in keyset pages: tests/unit/test_registry_passes.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from karma8.core.coding import Scheme
from karma8.core.listing import Cursor, ListQuery
from karma8.core.records import Heartbeat, Usage
from karma8.registry import database
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow

BIG = ("files", "uploads", "fragments")
SCHEME = Scheme.of(4, 2)
LIVE = [BucketSpace(f"b{i}", 1 << 40, 1 << 40) for i in range(8)]
Statement = tuple[str, tuple[object, ...]]


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url, "api-1")
    yield registry
    registry.close()


def _record(monkeypatch: pytest.MonkeyPatch, into: list[Statement]) -> None:
    """Record every statement the registry executes (SQL and arguments), then run it."""
    for cls in (database._SQLiteTx, database._PgTx):
        original: Callable[..., Any] = cls.execute

        def execute(self: Any, sql: str, args: Any = (), _original: Callable[..., Any] = original) -> Any:
            into.append((sql, tuple(args)))
            return _original(self, sql, args)

        monkeypatch.setattr(cls, "execute", execute)


def _fill(db: RegistryDB, files: int) -> None:
    """Buckets, committed files (some in directories), one failed and one in progress."""
    for b in LIVE:
        db.upsert_bucket(
            Heartbeat(b.bucket_id, f"{b.bucket_id}:1", Usage(0, 1 << 40, 1 << 40, 0), hello=True)
        )
    for n in range(files):
        upload = UploadRow.new(f"{n + 1:032x}", f"d{n % 5}/f{n:04}", 600, SCHEME, 64, float(n))
        db.place_upload(upload, [100] * SCHEME.width, LIVE)
        db.commit_upload(upload.upload_id, "ab" * 32, {p: f"{p:064x}" for p in range(SCHEME.width)}, float(n))


def _per_request_calls(db: RegistryDB) -> None:
    """What the request handlers ask of the registry, one of each."""
    upload = UploadRow.new("f" * 32, "d1/new", 600, SCHEME, 64, 9e9)
    db.place_upload(upload, [100] * SCHEME.width, LIVE)  # /upload
    db.commit_upload(upload.upload_id, "cd" * 32, {p: f"{p:064x}" for p in range(SCHEME.width)}, 9e9)
    failed = UploadRow.new("e" * 32, "d2/broken", 600, SCHEME, 64, 9e9)
    db.place_upload(failed, [100] * SCHEME.width, LIVE)
    db.fail_upload(failed.upload_id, 9e9)
    found = db.lookup("d1/new")  # /download, /stat
    assert found is not None
    db.repairing(found.upload.upload_id)  # /stat
    db.queue_repair(found.upload.upload_id, "read around", 1, 9e9, bad=[2])  # a download's bad fragment
    db.queue_bad_fragments([(found.upload.upload_id, 3)], "scrub", 9e9)  # /verify
    db.list_page(ListQuery(limit=50, paged=True))  # /files
    db.list_page(ListQuery("d3/", limit=5, paged=True))
    db.list_page(ListQuery("", "/", limit=3, paged=True))
    db.list_page(ListQuery("d", "/", Cursor("d2/", inclusive=False), 10, paged=True))
    db.list_page(ListQuery("d4/f0004", paged=False))
    db.delete_file("d1/new", 9e9)  # /delete
    db.repair_summary()  # /status
    db.placed()
    db.servers()
    db.lease_holders()


def _start_and_heartbeat_calls(db: RegistryDB) -> None:
    """What a server does when it starts, and every heartbeat interval after."""
    db.start_server("api-1:8080")
    db.server_alive("api-1:8080")
    db.reap_servers(silent_for=30.0)
    db.fail_abandoned(active=["0" * 32], before=9e9)
    db.publish_reads(["1".rjust(32, "0")])
    db.hold_lease("janitor", 10.0)
    db.upsert_bucket(Heartbeat("b0", "b0:1", Usage(0, 1 << 40, 1 << 40, 0), hello=False))
    db.buckets()


def _aliases(sql: str) -> set[str]:
    """The big tables of a statement and their aliases (SQLite's plan names the alias)."""
    names = set()
    for table, alias in re.findall(
        r"\b(files|uploads|fragments)\b(?:\s+(?:AS\s+)?(\w+))?", sql, re.IGNORECASE
    ):
        names.add(table)
        if alias and alias.upper() not in {"WHERE", "JOIN", "ON", "SET", "LEFT", "ORDER", "GROUP", "VALUES"}:
            names.add(alias)
    return names


def _full_scans(db: RegistryDB, sql: str, args: tuple[object, ...]) -> list[str]:
    """The plan lines of ``sql`` that read a big table whole."""
    tables = _aliases(sql)
    if not tables:
        return []
    if db.database.name == "sqlite":
        with db.database.read() as tx:
            plan = [str(row[-1]) for row in tx.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()]
        # "SCAN t" reads the table; "SCAN t USING [COVERING] INDEX i" reads all of an index:
        # both grow with the table. "SEARCH t USING INDEX i (name>?)" is a range.
        return [line for line in plan if re.match(r"SCAN (\w+)", line) and line.split()[1] in tables]
    with db.database.transaction() as tx:
        tx.execute("SET LOCAL enable_seqscan = off")
        plan = [str(row[0]) for row in tx.execute("EXPLAIN " + sql, args).fetchall()]
    return [line.strip() for line in plan if re.search(r"Seq Scan on (files|uploads|fragments)\b", line)]


@pytest.mark.parametrize("calls", [_per_request_calls, _start_and_heartbeat_calls])
def test_no_request_reads_a_big_table_whole(
    db: RegistryDB, monkeypatch: pytest.MonkeyPatch, calls: Callable[[RegistryDB], None]
) -> None:
    _fill(db, 40)
    statements: list[Statement] = []
    _record(monkeypatch, statements)
    calls(db)
    monkeypatch.undo()
    checked = {
        (sql, args)
        for sql, args in statements
        if re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT .* SELECT|WITH)", sql, re.IGNORECASE | re.DOTALL)
    }
    assert len(checked) > 5, "the calls ran fewer statements than they should"
    offenders = {sql: scans for sql, args in checked if (scans := _full_scans(db, sql, args))}
    assert offenders == {}
