"""The registry: which files exist and where their fragments live.

SQLite or PostgreSQL (karma8/registry/database.py); the SQL here is the same for both.
This module is synchronous and knows nothing of trio; the API server reaches it through
:class:`karma8.registry.Registry`, which runs every call on a worker thread so the event
loop never blocks. Each public method is one transaction (or a read), so a call that
lost a race (:class:`~karma8.registry.database.Retry`) can simply be made again.

Upload states: ``in_progress`` -> ``committed`` (the file's current version) ->
``deleting`` (replaced or deleted; fragments being removed), or ``in_progress`` ->
``failed``. A fragment row stays until its bucket confirmed the delete, so a cleanup
that could not reach a bucket is retried, and after a crash the registry still knows
where every byte went.

Rebalancing adds two tables. ``moves`` holds the fragment copies under way (the copy on
``dst`` is not yet the fragment's home); ``stale`` holds copies that are no longer any
fragment's home and wait to be deleted: the source of a finished move (once no download
reads it) and the destination of an abandoned one. ``placed`` is a ledger of the bytes
and fragments of live (in-progress or committed) uploads per bucket, kept by explicit
statements in the same transactions that change fragments and uploads (karma8/registry/ledger.py),
so placement and the rebalancer read it in constant time and it cannot drift from the
rows it sums (:meth:`RegistryDB.ledger_drift` checks).

Several API servers may share the registry. A transaction that reads rows to change them
locks them first: the upload's row (``FOR UPDATE`` on PostgreSQL; SQLite's write
transactions exclude each other anyway), the name being committed or deleted, and the
ledger for placement (:meth:`~karma8.registry.database.Database.lock`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karma8.core import balance
from karma8.core.checksums import FORMAT
from karma8.core.coding import Scheme
from karma8.core.fragments import fragment_id
from karma8.core.listing import MAX_PAGE, Cursor, ListQuery, Page, common_prefix, successor
from karma8.core.placement import Candidate, choose_buckets
from karma8.core.records import Heartbeat
from karma8.errors import Conflict, Internal
from karma8.registry import ledger, planning, schema
from karma8.registry.database import Database, Duplicate, Tx, open_database
from karma8.registry.leases import Coordination, Fence, LeaseLost, check_fence, fence_holds
from karma8.registry.passes import Passes
from karma8.registry.repairs import RepairQueue, queue_if_short

log = logging.getLogger(__name__)

# Fragments on the source that may move to the destination: parts of committed files with
# nothing on the destination (no part, no move, no stale copy), not moving already, of
# at most / more than a size, in the order a plan reads them (karma8/registry/planning.py).
_LARGEST = planning.movable_sql("f.size <= ?", planning.DOWN)
_SMALLEST = planning.movable_sql("f.size > ?", planning.UP)


@dataclass(frozen=True, slots=True)
class BucketRow:
    """A bucket as last heard of."""

    bucket_id: str
    address: str
    #: Seconds since its last heartbeat (to any API server), by the database's clock.
    age: float
    used: int
    free: int
    capacity: int
    fragments: int


@dataclass(frozen=True, slots=True)
class FragmentRow:
    """Where one part of an upload lives."""

    upload_id: str
    part: int
    bucket_id: str
    size: int
    sha256: str | None
    #: ``ok``: stored (as far as the registry knows); ``owed``: the upload met its write
    #: quorum without it, and repair will write it.
    state: str = "ok"


@dataclass(frozen=True, slots=True)
class UploadRow:
    """One upload (a version of a file)."""

    upload_id: str
    name: str
    size: int
    parts: int
    unit: int
    state: str
    sha256: str | None = None
    created: float = 0.0
    #: The coding scheme (:class:`karma8.core.coding.Scheme`): data parts are ``parts``.
    parity: int = 0
    codec: str = "none"
    #: Fragment format on the buckets: 1 (one sha256 each), 2 (a crc32c per unit).
    format: int = 1
    #: The upload this one rewrites (repair raising a file's protection), None for a
    #: client's upload: at most one client upload of a name is in progress.
    rewrites: str | None = None

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.codec, self.parts, self.parity)

    @classmethod
    def new(cls, upload_id: str, name: str, size: int, scheme: Scheme, unit: int, now: float) -> UploadRow:
        """A new in-progress upload coded with ``scheme``, in today's fragment format."""
        return cls(
            upload_id,
            name,
            size,
            scheme.data,
            unit,
            "in_progress",
            created=now,
            parity=scheme.parity,
            codec=scheme.codec,
            format=FORMAT,
        )


@dataclass(frozen=True, slots=True)
class FileRow:
    """A committed file: its current upload and where the parts are."""

    name: str
    size: int
    sha256: str
    created: float
    upload: UploadRow
    fragments: tuple[FragmentRow, ...]


@dataclass(frozen=True, slots=True)
class BucketSpace:
    """A live bucket's capacity and free disk space, as it last reported them."""

    bucket_id: str
    capacity: int
    free: int


@dataclass(frozen=True, slots=True)
class MoveRow:
    """A fragment copy under way (or planned, in a dry run)."""

    upload_id: str
    part: int
    size: int
    src: str
    dst: str
    sha256: str
    #: The file's name (filled in for plans shown to people).
    name: str = ""
    #: The fragment's unit if it carries a crc32c per unit (format 2), else 0.
    unit: int = 0

    @property
    def fragment_id(self) -> str:
        return fragment_id(self.upload_id, self.part)


@dataclass(frozen=True, slots=True)
class StaleRow:
    """A copy of a fragment that is no longer its home, waiting for deletion."""

    bucket_id: str
    upload_id: str
    part: int


class _Movable:
    """:class:`karma8.core.balance.Movable` over the registry (one indexed query)."""

    def __init__(self, tx: Tx, skip: Set[tuple[str, int]]) -> None:
        self._tx = tx
        self._skip = skip

    def largest(self, src: str, dst: str, limit: int) -> tuple[str, int, int] | None:
        return self._first(_LARGEST, src, limit, dst)

    def smallest(self, src: str, dst: str, above: int) -> tuple[str, int, int] | None:
        return self._first(_SMALLEST, src, above, dst)

    def _first(self, sql: str, src: str, size: int, dst: str) -> tuple[str, int, int] | None:
        # Only skipped fragments can come before the answer: read no more rows than that.
        rows = self._tx.execute(sql, (src, size, dst, dst, dst, len(self._skip) + 1)).fetchall()
        for upload_id, part, found in rows:
            if (upload_id, part) not in self._skip:
                return str(upload_id), int(part), int(found)
        return None


class RegistryDB(RepairQueue, Coordination, Passes):
    """Synchronous registry over one database (see karma8/registry/database.py).

    Args:
        where: a :class:`Database`, a registry URL (``postgresql://…``, ``sqlite:PATH``)
            or the path of a SQLite file.
        server_id: the API server using it (see :meth:`start_server`).
    """

    def __init__(self, where: Database | Path | str, server_id: str = "") -> None:
        self._db = where if isinstance(where, Database) else open_database(str(where))
        #: The API server this registry works for: its uploads and moves are marked with it.
        self.server_id = server_id
        with self._db.transaction() as tx:
            found, now = schema.migrate(self._db, tx)
        if found != now:
            log.info("registry %s migrated from schema version %d to %d", self._db.describe(), found, now)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple[object, ...]]]) -> None:
        with self._db.transaction() as tx:
            for sql, args in statements:
                tx.execute(sql, args)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._db.read() as tx:
            return tx.execute(sql, args).fetchall()

    def _lock_upload(self, tx: Tx, upload_id: str) -> str | None:
        return ledger.lock_upload(self._db, tx, upload_id)

    def _retire(self, tx: Tx, upload_id: str, state: str, now: float) -> None:
        """Move a locked live upload to ``state`` (failed, deleting): off the ledger, and
        on the janitor's list while it has fragment rows (``to_delete``)."""
        ledger.add_uploads(tx, -1, "u.id = ?", (upload_id,))
        tx.execute(
            "UPDATE uploads SET state = ?, finished = ?, to_delete = CASE WHEN EXISTS"
            " (SELECT 1 FROM fragments f WHERE f.upload_id = uploads.id) THEN 1 ELSE 0 END WHERE id = ?",
            (state, now, upload_id),
        )

    def ledger_drift(self) -> dict[str, tuple[int, int]]:
        """Buckets whose ledger row differs from the sum of the rows it counts:
        bucket -> (bytes, fragments) in the ledger minus in the rows. Empty: exact."""
        with self._db.read() as tx:
            kept = tx.execute("SELECT bucket_id, bytes, fragments FROM placed").fetchall()
            ledger = {str(b): (int(n), int(k)) for b, n, k in kept}
            rows = {
                str(b): (int(n), int(k))
                for b, n, k in tx.execute(
                    "SELECT f.bucket_id, SUM(f.size), COUNT(*) FROM fragments f"
                    " JOIN uploads u ON u.id = f.upload_id"
                    " WHERE u.state IN ('in_progress', 'committed') GROUP BY f.bucket_id"
                )
            }
        drift = {}
        for bucket in ledger.keys() | rows.keys():
            a, b = ledger.get(bucket, (0, 0)), rows.get(bucket, (0, 0))
            if a != b:
                drift[bucket] = (a[0] - b[0], a[1] - b[1])
        return drift

    # -- servers ---------------------------------------------------------------------

    def start_server(self, address: str) -> tuple[int, int]:
        """This server (re)starts: what it had under way was interrupted.

        Its in-progress uploads fail and its moves are abandoned (their copies become
        stale), and so do those of the single server of registries from before several
        servers shared one (marked ``''``). Other servers' work is left alone: a running
        server's, and a dead one's until :meth:`reap_servers` finds it silent.

        Returns:
            (uploads failed, moves abandoned).
        """
        with self._db.transaction() as tx:
            uploads, moves = 0, 0
            for server in sorted({self.server_id, ""}):
                u, m = self._end_server(tx, server)
                uploads, moves = uploads + u, moves + m
            self._alive(tx, address)
        return uploads, moves

    def server_alive(self, address: str) -> None:
        """This server's heartbeat (in the database's clock, the one every server shares)."""
        with self._db.transaction() as tx:
            self._alive(tx, address)

    def reap_servers(self, silent_for: float) -> list[tuple[str, int, int]]:
        """Servers silent for ``silent_for`` seconds died: fail their in-progress uploads,
        abandon their moves, drop their read leases and their row.

        Returns:
            (server, uploads failed, moves abandoned) for each server reaped.
        """
        reaped = []
        with self._db.transaction() as tx:
            dead = tx.execute(
                # FOR UPDATE: a server reaped by another meanwhile is skipped, not reaped twice.
                f"SELECT id FROM servers WHERE last_seen < {self._db.now} - ? AND id <> ? ORDER BY id"
                + self._db.for_update,
                (silent_for, self.server_id),
            ).fetchall()
            for (server,) in dead:
                uploads, moves = self._end_server(tx, str(server))
                tx.execute("DELETE FROM servers WHERE id = ?", (server,))
                reaped.append((str(server), uploads, moves))
        return reaped

    def fail_abandoned(self, active: Iterable[str], before: float) -> int:
        """Fail this server's uploads in progress created before ``before`` that it no
        longer runs (not in ``active``): an upload whose commit or cleanup could not reach
        the registry. Returns how many."""
        running = set(active)
        failed = 0
        with self._db.transaction() as tx:
            rows = tx.execute(
                "SELECT id FROM uploads WHERE state = 'in_progress' AND server = ? AND created < ?"
                f" ORDER BY id{self._db.for_update}",
                (self.server_id, before),
            ).fetchall()
            for (upload_id,) in rows:
                if str(upload_id) not in running:
                    self._retire(tx, str(upload_id), "failed", time.time())
                    failed += 1
        return failed

    def servers(self) -> list[tuple[str, str, float]]:
        """(id, address, seconds since its last heartbeat) of every server alive or not yet reaped."""
        rows = self._query(f"SELECT id, address, {self._db.now} - last_seen FROM servers ORDER BY id")
        return [(str(i), str(a), float(age)) for i, a, age in rows]

    def _alive(self, tx: Tx, address: str) -> None:
        now = self._db.now
        tx.execute(
            f"INSERT INTO servers (id, address, started, last_seen) VALUES (?, ?, {now}, {now})"
            " ON CONFLICT (id) DO UPDATE SET address = excluded.address, last_seen = excluded.last_seen",
            (self.server_id, address),
        )

    def _end_server(self, tx: Tx, server: str) -> tuple[int, int]:
        now = time.time()
        ids = tx.execute(
            "SELECT id FROM uploads WHERE state = 'in_progress' AND server = ?"
            f" ORDER BY id{self._db.for_update}",
            (server,),
        ).fetchall()
        for (upload_id,) in ids:
            self._retire(tx, str(upload_id), "failed", now)
        moves = self._abandon_moves(tx, server, now)
        tx.execute("DELETE FROM reads WHERE server = ?", (server,))
        return len(ids), moves

    @staticmethod
    def _abandon_moves(tx: Tx, server: str, now: float) -> int:
        """Give up every move ``server`` recorded: their destination copies become stale."""
        tx.execute(
            "INSERT INTO stale (bucket_id, upload_id, part, size, since)"
            " SELECT dst, upload_id, part, size, ? FROM moves WHERE server = ? ON CONFLICT DO NOTHING",
            (now, server),
        )
        return int(tx.execute("DELETE FROM moves WHERE server = ?", (server,)).rowcount)

    def abandon_own_moves(self) -> int:
        """Give up the moves this server recorded and no longer runs (a move whose end
        could not reach the registry); call when none of its moves is running. Returns
        how many."""
        with self._db.transaction() as tx:
            return self._abandon_moves(tx, self.server_id, time.time())

    # -- buckets ---------------------------------------------------------------------

    def upsert_bucket(self, beat: Heartbeat) -> None:
        """Record a bucket's heartbeat, at the database's clock: every API server sharing
        the registry sees the same liveness."""
        u = beat.usage
        self._tx(
            [
                (
                    "INSERT INTO buckets (id, address, last_seen, used, free, capacity, fragments)"
                    f" VALUES (?, ?, {self._db.now}, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                    " address=excluded.address, last_seen=excluded.last_seen, used=excluded.used,"
                    " free=excluded.free, capacity=excluded.capacity, fragments=excluded.fragments",
                    (beat.bucket_id, beat.address, u.used, u.free, u.capacity, u.fragments),
                )
            ]
        )

    def buckets(self) -> list[BucketRow]:
        """Every bucket ever registered."""
        rows = self._query(
            f"SELECT id, address, {self._db.now} - last_seen, used, free, capacity, fragments"
            " FROM buckets ORDER BY id"
        )
        return [BucketRow(*r) for r in rows]

    # -- uploads ---------------------------------------------------------------------

    def begin_upload(self, upload: UploadRow, fragments: list[FragmentRow]) -> None:
        """Record a new in-progress upload and where each of its parts goes.

        Raises:
            Conflict: a client upload of the same name is in progress (on any server).
        """
        with self._db.transaction() as tx:
            _insert_upload(tx, upload, fragments, self.server_id)

    def place_upload(
        self,
        upload: UploadRow,
        part_sizes: Sequence[int],
        live: Sequence[BucketSpace],
        required: int | None = None,
    ) -> list[str]:
        """Choose the buckets of a new upload and record it, in one transaction.

        Placement reads the ledger of placed bytes and records the new parts in the same
        transaction (under the placement lock), so concurrent uploads, on any server,
        each see the ones placed before them. With fewer live buckets than parts, the
        first parts are placed (at least ``required``).

        Raises:
            NotEnoughBuckets: fewer live buckets with room than ``required`` (default: all parts).
            Conflict: a client upload of the same name is in progress (on any server).
        """
        with self._db.transaction() as tx:
            self._db.lock(tx, "karma8-placement")
            used = _planned_usage(tx)
            candidates = [Candidate(b.bucket_id, used.get(b.bucket_id, 0), b.capacity, b.free) for b in live]
            bucket_ids = choose_buckets(upload.upload_id, candidates, part_sizes, required)
            _insert_upload(
                tx,
                upload,
                [FragmentRow(upload.upload_id, p, b, part_sizes[p], None) for p, b in enumerate(bucket_ids)],
                self.server_id,
            )
        return bucket_ids

    def commit_upload(
        self,
        upload_id: str,
        sha256: str,
        checksums: Mapping[int, str],
        now: float,
        owed: Iterable[int] = (),
        replacing: str | None = None,
    ) -> str | None:
        """Make ``upload_id`` the current version of its name, atomically.

        Fragments in ``owed`` were placed but not written; they are marked so, and a file
        with fewer fragments than its scheme (owed or never placed) joins the repair
        queue in the same transaction. With ``replacing`` (a rewrite of a stored file),
        the name must still point at that upload, and keeps its creation time.
        Concurrent commits of one name (through any servers) take turns on the name's
        lock: each replaces the one before, and exactly one version stays committed.

        Returns the id of the version it replaced (now ``deleting``), if any.

        Raises:
            Conflict: ``replacing`` is no longer the name's current version.
        """
        with self._db.transaction() as tx:
            row = tx.execute(
                "SELECT name, size FROM uploads WHERE id = ? AND state = 'in_progress'", (upload_id,)
            ).fetchone()
            if row is None:
                raise Internal(f"upload {upload_id} is not in progress; cannot commit it")
            name, size = row
            self._db.lock(tx, "name:" + name)
            if self._lock_upload(tx, upload_id) != "in_progress":  # failed meanwhile (its server was reaped)
                raise Internal(f"upload {upload_id} is not in progress; cannot commit it")
            old = tx.execute("SELECT upload_id, created, size FROM files WHERE name = ?", (name,)).fetchone()
            created = now
            if replacing is not None:
                if old is None or old[0] != replacing:
                    raise Conflict(f"{name!r} changed while it was being rewritten")
                created = old[1]
            tx.executemany(
                "UPDATE fragments SET sha256 = ? WHERE upload_id = ? AND part = ?",
                [(digest, upload_id, part) for part, digest in checksums.items()],
            )
            tx.executemany(
                "UPDATE fragments SET state = 'owed' WHERE upload_id = ? AND part = ?",
                [(upload_id, part) for part in owed],
            )
            tx.execute(
                "UPDATE uploads SET state = 'committed', sha256 = ?, finished = ? WHERE id = ?",
                (sha256, now, upload_id),
            )
            queue_if_short(tx, upload_id, "owed" if owed else "under_protected", now)
            if old is not None:
                self._lock_upload(tx, old[0])
                self._retire(tx, old[0], "deleting", now)
            tx.execute(
                "INSERT INTO files (name, upload_id, size, sha256, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " upload_id=excluded.upload_id, size=excluded.size,"
                " sha256=excluded.sha256, created=excluded.created",
                (name, upload_id, size, sha256, created),
            )
            _count_stored(tx, 0 if old is not None else 1, int(size) - (0 if old is None else int(old[2])))
        return None if old is None else str(old[0])

    def fail_upload(self, upload_id: str, now: float) -> None:
        """Mark an in-progress upload failed (its fragments are then cleaned up)."""
        with self._db.transaction() as tx:
            if self._lock_upload(tx, upload_id) == "in_progress":
                self._retire(tx, upload_id, "failed", now)

    def upload(self, upload_id: str) -> UploadRow | None:
        """One upload by id."""
        rows = self._query(
            "SELECT id, name, size, parts, unit, state, sha256, created, parity, codec, format, rewrites"
            " FROM uploads WHERE id = ?",
            (upload_id,),
        )
        return UploadRow(*rows[0]) if rows else None

    def fragments(self, upload_id: str) -> list[FragmentRow]:
        """The fragment rows of an upload, in part order."""
        rows = self._query(
            "SELECT upload_id, part, bucket_id, size, sha256, state FROM fragments"
            " WHERE upload_id = ? ORDER BY part",
            (upload_id,),
        )
        return [FragmentRow(*r) for r in rows]

    # -- cleanup ---------------------------------------------------------------------

    def pending_deletions(self) -> list[tuple[str, str]]:
        """(upload id, bucket id) pairs whose fragments must be deleted, except those of
        uploads another server's downloads still read."""
        rows = self._query(
            "SELECT DISTINCT f.upload_id, f.bucket_id FROM fragments f JOIN uploads u"
            " ON u.id = f.upload_id WHERE u.state IN ('failed', 'deleting')"
            " AND NOT EXISTS (SELECT 1 FROM reads r WHERE r.upload_id = f.upload_id AND r.server <> ?)"
            " ORDER BY f.upload_id, f.bucket_id",
            (self.server_id,),
        )
        return [(str(a), str(b)) for a, b in rows]

    def fragments_deleted(self, upload_id: str, bucket_id: str) -> None:
        """A bucket confirmed it no longer holds fragments of ``upload_id`` (any copy).

        A ``deleting`` upload with no fragment left is forgotten; a ``failed`` one stays
        as a record of the failure, off the janitor's list.
        """
        self._tx(
            [
                ("DELETE FROM stale WHERE upload_id = ? AND bucket_id = ?", (upload_id, bucket_id)),
                (
                    "DELETE FROM fragments WHERE upload_id = ? AND bucket_id = ?"
                    " AND (SELECT state FROM uploads WHERE id = ?) IN ('failed', 'deleting')",
                    (upload_id, bucket_id, upload_id),
                ),
                (
                    "DELETE FROM uploads WHERE id = ? AND state = 'deleting' AND NOT EXISTS"
                    " (SELECT 1 FROM fragments WHERE upload_id = ?)",
                    (upload_id, upload_id),
                ),
                (
                    "UPDATE uploads SET to_delete = 0 WHERE id = ? AND to_delete = 1 AND NOT EXISTS"
                    " (SELECT 1 FROM fragments WHERE upload_id = ?)",
                    (upload_id, upload_id),
                ),
            ]
        )

    def expected_on(self, bucket_id: str) -> dict[str, str]:
        """Fragment ids the registry knows on ``bucket_id``, with their upload's state.

        Copies being moved there count as ``moving``, copies waiting for deletion as
        ``stale``: neither is garbage, and neither is a committed file's data yet or still.
        """
        rows = self._query(
            "SELECT f.upload_id || '.' || f.part, CASE WHEN f.state = 'owed' AND u.state = 'committed'"
            " THEN 'owed' ELSE u.state END FROM fragments f JOIN uploads u"
            " ON u.id = f.upload_id WHERE f.bucket_id = ?"
            " UNION ALL SELECT upload_id || '.' || part, 'moving' FROM moves WHERE dst = ?"
            " UNION ALL SELECT upload_id || '.' || part, 'stale' FROM stale WHERE bucket_id = ?",
            (bucket_id, bucket_id, bucket_id),
        )
        expected: dict[str, str] = {}
        for fid, state in rows:
            expected.setdefault(str(fid), str(state))
        return expected

    # -- rebalancing -----------------------------------------------------------------

    def placed(self) -> dict[str, tuple[int, int]]:
        """Bytes and fragments of live uploads per bucket (the ledger)."""
        rows = self._query("SELECT bucket_id, bytes, fragments FROM placed ORDER BY bucket_id")
        return {str(b): (int(n), int(k)) for b, n, k in rows if n or k}

    def fills(self, live: Mapping[str, int]) -> list[balance.Fill]:
        """The fill of each live bucket (id -> capacity), counting moves under way as done."""
        with self._db.read() as tx:
            return _fills(tx, live)

    def start_move(
        self,
        live: Mapping[str, int],
        tolerance: float,
        parts: int,
        skip: Set[tuple[str, int]] = frozenset(),
        fence: Fence | None = None,
    ) -> MoveRow | None:
        """Record and return the next move that evens out the live buckets (None: balanced).

        ``live`` maps each live bucket to its capacity; fragments in ``skip`` (upload id,
        part) are not chosen. See :func:`karma8.core.balance.plan`.

        Raises:
            LeaseLost: this server no longer holds ``fence``.
        """
        with self._db.transaction() as tx:
            check_fence(self._db, tx, self.server_id, fence)
            self._db.lock(tx, "karma8-placement")
            for move in balance.plan(_fills(tx, live), tolerance, parts, _Movable(tx, skip)):
                return _insert_move(tx, move, time.time(), self.server_id)
        return None

    def rebalance_plan(
        self,
        live: Mapping[str, int],
        tolerance: float,
        parts: int,
        *,
        shown: int = planning.PLAN_SHOWN,
        most: int = planning.PLAN_MAX,
    ) -> planning.Plan:
        """What a run of :meth:`start_move` would do now, recording nothing: totals, each
        bucket's change and the first ``shown`` moves, at most ``most`` moves (see
        karma8/registry/planning.py). Read-only: each planned move is taken as finished
        (the fragment on its destination, its source copy gone), as a run sees its moves
        when they succeed, and each fragment moves at most once."""
        with self._db.read() as tx:
            fills = _fills(tx, live)
        return planning.compute(self._db, fills, tolerance, parts, shown=shown, most=most)

    def plan_moves(
        self, live: Mapping[str, int], tolerance: float, parts: int, limit: int = planning.PLAN_SHOWN
    ) -> list[MoveRow]:
        """The first ``limit`` moves of :meth:`rebalance_plan` (tests, small registries)."""
        plan = self.rebalance_plan(live, tolerance, parts, shown=limit, most=limit)
        return [MoveRow(m.upload_id, m.part, m.size, m.src, m.dst, m.sha256, m.name) for m in plan.shown]

    def finish_move(self, move: MoveRow, fence: Fence | None = None) -> bool:
        """Make the copy on ``move.dst`` the fragment's home, atomically.

        The source copy becomes stale (deleted once no download reads it). If the file was
        replaced or deleted meanwhile, nothing switches, the new copy is stale instead and
        False is returned.

        Raises:
            LeaseLost: this server no longer holds ``fence``: nothing switched, the new
                copy is stale.
        """
        now = time.time()
        with self._db.transaction() as tx:
            fenced = fence_holds(self._db, tx, self.server_id, fence)
            state = self._lock_upload(tx, move.upload_id)
            current = (
                fenced
                and state == "committed"
                and tx.execute(
                    "SELECT 1 FROM moves m JOIN fragments f ON f.upload_id = m.upload_id AND f.part = m.part"
                    " WHERE m.upload_id = ? AND m.part = ? AND m.dst = ? AND f.bucket_id = ?",
                    (move.upload_id, move.part, move.dst, move.src),
                ).fetchone()
                is not None
            )
            tx.execute("DELETE FROM moves WHERE upload_id = ? AND part = ?", (move.upload_id, move.part))
            if current:
                tx.execute(
                    "UPDATE fragments SET bucket_id = ? WHERE upload_id = ? AND part = ?",
                    (move.dst, move.upload_id, move.part),
                )
                ledger.move(tx, move.size, move.src, move.dst)
            _insert_stale(tx, move.src if current else move.dst, move, now)
        if not fenced:
            raise LeaseLost(f"lease on {fence.job if fence else ''} lost; move of {move.fragment_id} dropped")
        return current

    def abandon_move(self, move: MoveRow) -> None:
        """Give a move up: whatever reached ``move.dst`` is stale."""
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM moves WHERE upload_id = ? AND part = ?", (move.upload_id, move.part))
            _insert_stale(tx, move.dst, move, time.time())

    def pending_stale(self) -> list[StaleRow]:
        """Stale copies still to delete, oldest first, except those of uploads another
        server's downloads still read."""
        rows = self._query(
            "SELECT bucket_id, upload_id, part FROM stale s WHERE NOT EXISTS"
            " (SELECT 1 FROM reads r WHERE r.upload_id = s.upload_id AND r.server <> ?)"
            " ORDER BY since, bucket_id, upload_id, part",
            (self.server_id,),
        )
        return [StaleRow(str(b), str(u), int(p)) for b, u, p in rows]

    def stale_deleted(self, bucket_id: str, upload_id: str, parts: Iterable[int]) -> None:
        """``bucket_id`` confirmed it no longer holds these parts of ``upload_id``."""
        self._tx(
            (
                "DELETE FROM stale WHERE bucket_id = ? AND upload_id = ? AND part = ?",
                (bucket_id, upload_id, p),
            )
            for p in parts
        )

    # -- files -----------------------------------------------------------------------

    def lookup(self, name: str) -> FileRow | None:
        """The committed file called ``name``, with its fragments."""
        # One indexed query: the name's row, its upload, and its fragments (none for a file
        # whose parts were all owed to repair).
        rows = self._query(
            "SELECT u.id, u.name, u.size, u.parts, u.unit, u.state, u.sha256, u.created, u.parity,"
            " u.codec, u.format, u.rewrites, f.size, f.sha256, f.created,"
            " g.upload_id, g.part, g.bucket_id, g.size, g.sha256, g.state FROM files f"
            " JOIN uploads u ON u.id = f.upload_id LEFT JOIN fragments g ON g.upload_id = f.upload_id"
            " WHERE f.name = ? ORDER BY g.part",
            (name,),
        )
        if not rows:
            return None
        *upload, size, sha256, created = rows[0][:15]
        fragments = [r[15:] for r in rows if r[15] is not None]
        return FileRow(
            name,
            int(size),
            str(sha256),
            float(created),
            UploadRow(*upload),
            tuple(FragmentRow(*r) for r in fragments),
        )

    def list_page(self, query: ListQuery) -> Page:
        """One page of committed files (and common prefixes under ``query.delimiter``), by
        name: range scans of the name index, each common prefix skipped with one seek."""
        end = query.end()
        at = query.first()
        files: list[tuple[str, int, str, float]] = []
        prefixes: list[str] = []
        # Under a delimiter the next row may well be rolled up and the rest of its batch
        # skipped: read a few rows after each skip, more while they are files.
        batch = SKIP_BATCH if query.delimiter else query.limit + 1
        with self._db.read() as tx:
            while True:
                want = min(query.limit - len(files) - len(prefixes) + 1, batch)
                op = ">=" if at.inclusive else ">"
                sql = f"SELECT name, size, sha256, created FROM files WHERE name {op} ?"
                args: tuple[object, ...] = (at.key,) if end is None else (at.key, end)
                if end is not None:
                    sql += " AND name < ?"
                rows = tx.execute(sql + " ORDER BY name LIMIT ?", (*args, want)).fetchall()
                skipped = False
                for name, size, sha256, created in rows:
                    if len(files) + len(prefixes) == query.limit:
                        return Page(files, prefixes, at)  # a name at or after ``at`` is left
                    rolled = common_prefix(name, query.prefix, query.delimiter)
                    if rolled is not None:
                        prefixes.append(rolled)
                        past = successor(rolled)
                        if past is None:
                            return Page(files, prefixes, None)
                        at, skipped = Cursor(past, inclusive=True), True
                        break  # seek past everything under it
                    files.append((str(name), int(size), str(sha256), float(created)))
                    at = Cursor(str(name))
                if not skipped and len(rows) < want:
                    return Page(files, prefixes, None)
                batch = SKIP_BATCH if skipped else batch * 4

    def list_files(self, prefix: str = "") -> list[tuple[str, int, str, float]]:
        """Every committed file under ``prefix``, page by page into one list (tests and
        tools on small registries; the API lists by :meth:`list_page`)."""
        out: list[tuple[str, int, str, float]] = []
        cursor: Cursor | None = None
        while True:
            page = self.list_page(ListQuery(prefix, start=cursor, paged=True))
            out += page.files
            if page.next is None:
                return out
            cursor = page.next

    def file_names(self, after: str = "", limit: int = MAX_PAGE) -> list[str]:
        """Up to ``limit`` committed names after ``after``, by name (one index range)."""
        rows = self._query("SELECT name FROM files WHERE name > ? ORDER BY name LIMIT ?", (after, limit))
        return [str(n) for (n,) in rows]

    def delete_file(self, name: str, now: float) -> str | None:
        """Remove ``name``; its upload becomes ``deleting``. Returns that upload's id."""
        with self._db.transaction() as tx:
            self._db.lock(tx, "name:" + name)
            row = tx.execute("SELECT upload_id, size FROM files WHERE name = ?", (name,)).fetchone()
            if row is not None:
                tx.execute("DELETE FROM files WHERE name = ?", (name,))
                self._lock_upload(tx, row[0])
                self._retire(tx, row[0], "deleting", now)
                _count_stored(tx, -1, -int(row[1]))
        return None if row is None else str(row[0])

    def stored(self) -> tuple[int, int]:
        """(committed files, their bytes), from the counter their changes keep."""
        row = self._query("SELECT files, bytes FROM stored")
        return (int(row[0][0]), int(row[0][1])) if row else (0, 0)

    def stored_drift(self) -> tuple[int, int]:
        """The counter minus a count of ``files`` (a full scan: for checks): (files, bytes)."""
        ((files, size),) = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files")
        kept = self.stored()
        return kept[0] - int(files), kept[1] - int(size)


#: Rows a delimited listing reads after skipping a common prefix.
SKIP_BATCH = 8


def _count_stored(tx: Tx, files: int, size: int) -> None:
    """Add to the counter of committed files (last in its transaction: it is one row every
    commit and delete writes, so it is held for the shortest time)."""
    tx.execute(
        "INSERT INTO stored (id, files, bytes) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " files = stored.files + excluded.files, bytes = stored.bytes + excluded.bytes",
        (files, size),
    )


def _insert_upload(tx: Tx, upload: UploadRow, fragments: list[FragmentRow], server: str) -> None:
    try:
        tx.execute(
            "INSERT INTO uploads (id, name, size, parts, unit, state, created, parity, codec, format,"
            " rewrites, server) VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?, ?, ?)",
            (
                upload.upload_id,
                upload.name,
                upload.size,
                upload.parts,
                upload.unit,
                upload.created,
                upload.parity,
                upload.codec,
                upload.format,
                upload.rewrites,
                server,
            ),
        )
    except Duplicate:
        raise Conflict(f"an upload of {upload.name!r} is already in progress") from None
    tx.executemany(
        "INSERT INTO fragments (upload_id, part, bucket_id, size, state) VALUES (?, ?, ?, ?, ?)",
        [(f.upload_id, f.part, f.bucket_id, f.size, f.state) for f in fragments],
    )
    ledger.add_uploads(tx, 1, "u.id = ?", (upload.upload_id,))


def _planned_usage(tx: Tx) -> dict[str, int]:
    """Bytes placed per bucket, counting the moves under way as done."""
    used = {str(b): int(n) for b, n in tx.execute("SELECT bucket_id, bytes FROM placed")}
    for src, dst, size in tx.execute("SELECT src, dst, size FROM moves"):
        used[src] = used.get(src, 0) - size
        used[dst] = used.get(dst, 0) + size
    return used


def _fills(tx: Tx, live: Mapping[str, int]) -> list[balance.Fill]:
    used = _planned_usage(tx)
    return [balance.Fill(b, used.get(b, 0), capacity) for b, capacity in sorted(live.items())]


def _insert_move(tx: Tx, move: balance.Move, now: float, server: str) -> MoveRow:
    sha256, unit = tx.execute(
        "SELECT f.sha256, CASE WHEN u.format >= 2 THEN u.unit ELSE 0 END FROM fragments f"
        " JOIN uploads u ON u.id = f.upload_id WHERE f.upload_id = ? AND f.part = ?",
        (move.upload_id, move.part),
    ).fetchone()
    row = MoveRow(move.upload_id, move.part, move.size, move.src, move.dst, str(sha256), unit=int(unit))
    tx.execute(
        "INSERT INTO moves (upload_id, part, src, dst, size, sha256, started, server)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (row.upload_id, row.part, row.src, row.dst, row.size, row.sha256, now, server),
    )
    return row


def _insert_stale(tx: Tx, bucket_id: str, move: MoveRow, now: float) -> None:
    tx.execute(
        "INSERT INTO stale (bucket_id, upload_id, part, size, since) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (bucket_id, move.upload_id, move.part, move.size, now),
    )
