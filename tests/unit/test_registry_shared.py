"""One registry shared by several API servers: each server is a RegistryDB of its own on
the same database (a second connection on SQLite, a second pool on PostgreSQL), and the
races between them come from threads started together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

import pytest

from karma8.core.coding import Scheme
from karma8.errors import Conflict
from karma8.registry import retrying
from karma8.registry.db import BucketSpace, RegistryDB, UploadRow
from karma8.registry.leases import Fence, LeaseLost
from tests.polling import poll_until

DIGEST = "12" * 32
SCHEME = Scheme.of(3, 1)
LIVE = [BucketSpace(f"b{i}", 1 << 30, 1 << 30) for i in range(6)]


@pytest.fixture
def servers(registry_url: str) -> Iterator[list[RegistryDB]]:
    first = RegistryDB(registry_url, "A")  # creates the schema before the others open it
    dbs = [first, RegistryDB(registry_url, "B"), RegistryDB(registry_url, "C")]
    yield dbs
    for db in dbs:
        db.close()


def _upload(n: int, name: str, rewrites: str | None = None) -> UploadRow:
    return replace(UploadRow.new(f"{n:032x}", name, 40, SCHEME, 16, float(n)), rewrites=rewrites)


def _together(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls in threads released at once; their results or exceptions."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_one_client_upload_of_a_name_in_progress_on_any_server(servers: list[RegistryDB]) -> None:
    sizes = [10, 10, 10, 10]
    results = _together(
        [
            partial(retrying, db.place_upload, _upload(n, "same"), sizes, LIVE)
            for n, db in enumerate(servers, 1)
        ]
    )
    assert sum(isinstance(r, list) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 2, results
    rows = servers[0]._query("SELECT state FROM uploads WHERE name = 'same'")
    assert rows == [("in_progress",)]
    # Once that upload ends, the name is free again, through any server.
    (won,) = servers[0]._query("SELECT id FROM uploads WHERE name = 'same'")
    servers[1].fail_upload(won[0], now=5.0)
    servers[2].place_upload(_upload(9, "same"), sizes, LIVE)
    assert servers[0].ledger_drift() == {}


def test_concurrent_commits_of_one_name_leave_one_version(servers: list[RegistryDB]) -> None:
    sizes = [10, 10, 10, 10]
    first = servers[0]
    first.place_upload(_upload(1, "x"), sizes, LIVE)
    first.commit_upload(f"{1:032x}", DIGEST, {}, now=1.0)
    # Three rewrites of "x" at once (repair raising its protection runs beside client
    # uploads), each committed through another server.
    ids = []
    for n, db in enumerate(servers * 2, 2):
        db.place_upload(_upload(n, "x", rewrites=f"{1:032x}"), sizes, LIVE)
        ids.append(f"{n:032x}")
    results = _together(
        [
            partial(retrying, db.commit_upload, u, DIGEST, {}, 2.0)
            for db, u in zip(servers * 2, ids, strict=True)
        ]
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    committed = first._query("SELECT id FROM uploads WHERE name = 'x' AND state = 'committed'")
    assert len(committed) == 1
    (files,) = first._query("SELECT upload_id FROM files WHERE name = 'x'")
    assert files[0] == committed[0][0]
    # Every other version is being deleted, none lost track of: the first and the rewrites
    # that lost; the ledger counts exactly the committed one.
    states = dict(first._query("SELECT id, state FROM uploads WHERE name = 'x'"))
    assert sorted(states.values()) == ["committed"] + ["deleting"] * 6
    assert first.ledger_drift() == {}
    assert sum(n for n, _ in first.placed().values()) == 40
    pending = {u for u, _ in first.pending_deletions()}
    assert pending == {u for u, s in states.items() if s == "deleting"}


def test_concurrent_uploads_of_distinct_names_keep_the_ledger_exact(servers: list[RegistryDB]) -> None:
    sizes = [100, 100, 100, 100]

    def work(db: RegistryDB, base: int) -> None:
        for i in range(20):
            n = base + i
            retrying(db.place_upload, _upload(n, f"n{n % 7}-{base}"), sizes, LIVE)
            if i % 3:
                retrying(db.commit_upload, f"{n:032x}", DIGEST, {}, float(n))
            else:
                retrying(db.fail_upload, f"{n:032x}", float(n))
            if i % 5 == 0:
                retrying(db.delete_file, f"n{(n + 1) % 7}-{base}", float(n))

    results = _together([partial(work, db, b) for db, b in zip(servers, (100, 200, 300), strict=True)])
    assert results == [None, None, None]
    assert servers[0].ledger_drift() == {}
    committed = servers[1]._query("SELECT COUNT(*) FROM files")
    assert committed[0][0] > 0


def _moving(db: RegistryDB) -> None:
    """Start one move of ``db``'s server (a committed file and an empty bucket to even out)."""
    move = db.start_move({b.bucket_id: b.capacity for b in LIVE[:5]}, 0.0, 4)
    assert move is not None


def test_a_restart_ends_only_its_own_work(servers: list[RegistryDB]) -> None:
    a, b, _ = servers
    sizes = [1000, 1000, 1000, 1000]
    a.place_upload(_upload(1, "mine"), sizes, LIVE[:4])
    b.place_upload(_upload(2, "theirs"), sizes, LIVE[:4])
    b.place_upload(_upload(3, "kept"), sizes, LIVE[:4])
    b.commit_upload(f"{3:032x}", DIGEST, {}, now=3.0)
    _moving(b)
    assert a.start_server("a:8080") == (1, 0)
    states = dict(a._query("SELECT name, state FROM uploads"))
    assert states == {"mine": "failed", "theirs": "in_progress", "kept": "committed"}
    assert a._query("SELECT server FROM moves") == [("B",)]
    assert a.ledger_drift() == {}


def test_a_server_gives_up_only_its_own_moves(servers: list[RegistryDB]) -> None:
    """A move whose end could not reach the registry is given up by its own server's next
    rebalance run; another server's move in flight is left alone."""
    a, b, _ = servers
    sizes = [1000, 1000, 1000, 1000]
    for n, db in enumerate((a, b), 1):
        db.place_upload(_upload(n, f"file-{n}"), sizes, LIVE[:4])
        db.commit_upload(f"{n:032x}", DIGEST, {}, now=float(n))
    six = {x.bucket_id: x.capacity for x in LIVE}  # two empty buckets: room for two moves
    assert a.start_move(six, 0.0, 4) is not None
    assert b.start_move(six, 0.0, 4) is not None
    assert sorted(a._query("SELECT server FROM moves")) == [("A",), ("B",)]
    assert a.abandon_own_moves() == 1
    assert a._query("SELECT server FROM moves") == [("B",)]
    assert len(a.pending_stale()) == 1  # the abandoned copy, for the janitor
    assert a.abandon_own_moves() == 0
    assert a.ledger_drift() == {}


def test_a_silent_server_is_reaped_by_another(servers: list[RegistryDB]) -> None:
    a, b, c = servers
    sizes = [1000, 1000, 1000, 1000]
    for db in servers:
        db.start_server(f"{db.server_id}:8080")
    b.place_upload(_upload(2, "orphan"), sizes, LIVE[:4])
    b.place_upload(_upload(3, "kept"), sizes, LIVE[:4])
    b.commit_upload(f"{3:032x}", DIGEST, {}, now=3.0)
    _moving(b)
    assert a.reap_servers(silent_for=60.0) == []  # b was heard from just now
    # Make b silent for longer than the timeout, by the database's clock.
    with a.database.transaction() as tx:
        tx.execute("UPDATE servers SET last_seen = last_seen - 120 WHERE id = 'B'")
    c.server_alive("C:8080")
    assert a.reap_servers(silent_for=60.0) == [("B", 1, 1)]
    assert dict(a._query("SELECT name, state FROM uploads")) == {"orphan": "failed", "kept": "committed"}
    assert a._query("SELECT COUNT(*) FROM moves") == [(0,)]
    assert len(a.pending_stale()) == 1  # the abandoned move's copy is deleted by the janitor
    assert sorted(s for s, _, _ in a.servers()) == ["A", "C"]
    assert a.ledger_drift() == {}


def test_a_silent_server_is_reaped_once_when_two_servers_reap_at_once(servers: list[RegistryDB]) -> None:
    a, b, c = servers
    b.start_server("B:8080")
    with a.database.transaction() as tx:
        tx.execute("UPDATE servers SET last_seen = last_seen - 120 WHERE id = 'B'")
    reaped: list[object] = []
    with a.database.transaction() as tx:
        # a reaps b: it holds b's row while c's reaper runs.
        tx.execute("SELECT id FROM servers WHERE id = 'B'" + a.database.for_update)
        reaper = threading.Thread(target=lambda: reaped.append(c.reap_servers(silent_for=60.0)))
        reaper.start()
        if a.database.name == "postgresql":
            _wait_for_a_lock_wait(a)  # c waits on b's row (SQLite: on the whole database)
        tx.execute("DELETE FROM servers WHERE id = 'B'")
    reaper.join(timeout=30)
    assert reaped == [[]]


def _wait_for_a_lock_wait(db: RegistryDB) -> None:
    """Poll until another session of the database waits on a lock (PostgreSQL)."""
    sql = "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    poll_until(lambda: db._query(sql), "a session waiting on a lock")


def _expire(db: RegistryDB, job: str) -> None:
    with db.database.transaction() as tx:
        tx.execute(f"UPDATE leases SET expires = {db.database.now} - 1 WHERE job = ?", (job,))


def test_a_job_lease_has_one_holder_and_fences_a_late_one(servers: list[RegistryDB]) -> None:
    a, b, _ = servers
    sizes = [1000, 1000, 1000, 1000]
    for n in (1, 2):  # two files on b0..b3, b4 empty: a move is due
        a.place_upload(_upload(n, f"f{n}"), sizes, LIVE[:4])
        a.commit_upload(f"{n:032x}", DIGEST, {}, now=1.0)
    results = _together([partial(db.hold_lease, "rebalancer", 30.0) for db in servers])
    assert sorted(results, key=str) == [1, None, None]  # one holder, whoever came first
    holder = next(db for db, r in zip(servers, results, strict=True) if r == 1)
    other = b if holder is a else a
    assert holder.hold_lease("rebalancer", 30.0) == 1  # renewed, same epoch
    assert other.hold_lease("rebalancer", 30.0) is None
    live = {x.bucket_id: x.capacity for x in LIVE[:5]}
    move = holder.start_move(live, 0.0, 4, fence=Fence("rebalancer", 1))
    assert move is not None
    # The holder stalls past its lease; the other server takes the job over.
    _expire(holder, "rebalancer")
    assert other.hold_lease("rebalancer", 30.0) == 2
    with pytest.raises(LeaseLost):
        holder.start_move(live, 0.0, 4, fence=Fence("rebalancer", 1))
    with pytest.raises(LeaseLost):
        holder.finish_move(move, fence=Fence("rebalancer", 1))
    # Nothing switched: the fragment stays home, the copy is stale, the ledger exact.
    (home,) = holder._query(
        "SELECT bucket_id FROM fragments WHERE upload_id = ? AND part = ?", (move.upload_id, move.part)
    )
    assert home[0] == move.src
    assert [(s.bucket_id, s.part) for s in holder.pending_stale()] == [(move.dst, move.part)]
    assert holder._query("SELECT COUNT(*) FROM moves") == [(0,)]
    assert holder.ledger_drift() == {}
    other.release_lease("rebalancer")
    assert holder.hold_lease("rebalancer", 30.0) == 3


def test_uploads_another_server_reads_are_not_deleted(servers: list[RegistryDB]) -> None:
    a, b, _ = servers
    sizes = [10, 10, 10, 10]
    a.place_upload(_upload(1, "f"), sizes, LIVE[:4])
    a.commit_upload(f"{1:032x}", DIGEST, {}, now=1.0)
    b.publish_reads([f"{1:032x}"])  # a download through B reads version 1...
    a.place_upload(_upload(2, "f"), sizes, LIVE[:4])
    a.commit_upload(f"{2:032x}", DIGEST, {}, now=2.0)  # ... while A replaces it
    assert a.pending_deletions() == []  # A's janitor leaves it to B's download
    assert {u for u, _ in b.pending_deletions()} == {f"{1:032x}"}  # B's own reads it knows itself
    b.publish_reads([])
    assert {u for u, _ in a.pending_deletions()} == {f"{1:032x}"}


def test_uploads_a_server_no_longer_runs_are_failed(servers: list[RegistryDB]) -> None:
    a, b, _ = servers
    sizes = [10, 10, 10, 10]
    a.place_upload(_upload(1, "lost"), sizes, LIVE)  # its commit never reached the registry
    a.place_upload(_upload(2, "running"), sizes, LIVE)
    a.place_upload(_upload(50, "young"), sizes, LIVE)  # placed after the cut-off (created 50.0)
    b.place_upload(_upload(3, "theirs"), sizes, LIVE)
    assert a.fail_abandoned([f"{2:032x}"], before=10.0) == 1
    states = dict(a._query("SELECT name, state FROM uploads"))
    assert states == {
        "lost": "failed",
        "running": "in_progress",
        "young": "in_progress",
        "theirs": "in_progress",
    }
    assert a.ledger_drift() == {}
