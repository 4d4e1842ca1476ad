"""SQLite group commit: write transactions queued behind one another share one commit; each
returns only once that commit is done, a failing one leaves the others alone, a failed
commit fails every member, and reads run beside an open group without seeing it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from karma8.registry.database import SQLite
from tests.polling import poll_until

DEADLINE = 30.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SQLite]:
    database = SQLite(tmp_path / "g.sqlite3")
    with database.transaction() as tx:
        tx.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        tx.execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, parent INTEGER"
            " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    yield database
    database.close()


def _commits(db: SQLite) -> list[str]:
    seen: list[str] = []
    db._conn.set_trace_callback(lambda sql: seen.append(sql) if sql in ("COMMIT", "ROLLBACK") else None)
    return seen


class Writers:
    """Threads that each run one transaction; the first holds its body until released."""

    def __init__(self, db: SQLite) -> None:
        self.db = db
        self.release = threading.Event()
        self.errors: dict[int, BaseException] = {}
        self.threads: list[threading.Thread] = []

    def start(self, key: int, parent: int | None = None, fail: bool = False, hold: bool = False) -> None:
        def body() -> None:
            try:
                with self.db.transaction() as tx:
                    tx.execute("INSERT INTO t (id, parent) VALUES (?, ?)", (key, parent))
                    if hold:
                        self.release.wait(DEADLINE)
                    if fail:
                        raise ValueError(f"transaction {key} gives up")
            except BaseException as exc:
                self.errors[key] = exc

        thread = threading.Thread(target=body)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(DEADLINE)
            assert not thread.is_alive()


def _ids(db: SQLite) -> list[int]:
    with db.read() as tx:
        return [int(r[0]) for r in tx.execute("SELECT id FROM t ORDER BY id").fetchall()]


def _group(db: SQLite, *others: tuple[int, bool]) -> Writers:
    """Transaction 1 holds the turn while ``others`` queue behind it, then all run."""
    writers = Writers(db)
    writers.start(1, hold=True)
    poll_until(lambda: db._open, "a group open")
    for key, fail in others:
        writers.start(key, fail=fail)
    poll_until(lambda: db._wanting == len(others), "the others queued")
    writers.release.set()
    writers.join()
    return writers


def test_queued_transactions_share_one_commit(db: SQLite) -> None:
    commits = _commits(db)
    writers = _group(db, (2, False), (3, False))
    assert writers.errors == {}
    assert commits == ["COMMIT"]
    assert _ids(db) == [1, 2, 3]
    reopened = SQLite(db.path)
    try:
        with reopened.read() as tx:
            assert tx.execute("SELECT COUNT(*) FROM t").fetchone() == (3,)
    finally:
        reopened.close()


def test_a_failing_transaction_leaves_its_group_alone(db: SQLite) -> None:
    commits = _commits(db)
    writers = _group(db, (2, True), (3, False))
    assert list(writers.errors) == [2]
    assert isinstance(writers.errors[2], ValueError)
    assert commits == ["COMMIT"]
    assert _ids(db) == [1, 3]


def test_a_failed_commit_fails_every_member(db: SQLite) -> None:
    writers = Writers(db)
    writers.start(1, hold=True)
    poll_until(lambda: db._open, "a group open")
    writers.start(2, parent=99)  # no parent 99: the deferred foreign key fails the COMMIT
    writers.start(3)
    poll_until(lambda: db._wanting == 2, "two queued")
    writers.release.set()
    writers.join()
    assert sorted(writers.errors) == [1, 2, 3]
    assert all(isinstance(e, sqlite3.IntegrityError) for e in writers.errors.values())
    assert _ids(db) == []
    with db.transaction() as tx:  # the connection is usable again
        tx.execute("INSERT INTO t (id) VALUES (4)")
    assert _ids(db) == [4]


def test_reads_run_beside_an_open_group_and_see_only_commits(db: SQLite) -> None:
    writers = Writers(db)
    writers.start(1, hold=True)
    poll_until(lambda: db._open, "a group open")
    assert _ids(db) == []  # not blocked, and the uncommitted row is not seen
    writers.release.set()
    writers.join()
    assert _ids(db) == [1]


def test_a_group_holds_at_most_group_transactions(tmp_path: Path) -> None:
    database = SQLite(tmp_path / "small.sqlite3", group=2)
    try:
        with database.transaction() as tx:
            tx.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, parent INTEGER)")
        commits = _commits(database)
        writers = _group(database, (2, False), (3, False), (4, False))
        assert writers.errors == {}
        assert commits == ["COMMIT", "COMMIT"]
        assert _ids(database) == [1, 2, 3, 4]
    finally:
        database.close()
