"""The registry: which files exist and where their fragments live (SQLite).

One SQLite file in WAL mode. This module is synchronous and knows nothing of trio; the
API server reaches it through :class:`karma8.registry.Registry`, which runs every call
on a worker thread so the event loop never blocks.

Upload states: ``in_progress`` -> ``committed`` (the file's current version) ->
``deleting`` (replaced or deleted; fragments being removed), or ``in_progress`` ->
``failed``. A fragment row stays until its bucket confirmed the delete, so a cleanup
that could not reach a bucket is retried, and after a crash the registry still knows
where every byte went.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karma8.core.records import Heartbeat
from karma8.errors import Internal

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    last_seen   REAL NOT NULL,
    used        INTEGER NOT NULL,
    free        INTEGER NOT NULL,
    capacity    INTEGER NOT NULL,
    fragments   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    parts       INTEGER NOT NULL,
    unit        INTEGER NOT NULL,
    sha256      TEXT,
    state       TEXT NOT NULL
                CHECK (state IN ('in_progress', 'committed', 'failed', 'deleting')),
    created     REAL NOT NULL,
    finished    REAL
);
CREATE INDEX IF NOT EXISTS uploads_state ON uploads(state);
CREATE TABLE IF NOT EXISTS fragments (
    upload_id   TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    part        INTEGER NOT NULL,
    bucket_id   TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT,
    PRIMARY KEY (upload_id, part)
);
CREATE INDEX IF NOT EXISTS fragments_bucket ON fragments(bucket_id);
CREATE TABLE IF NOT EXISTS files (
    name        TEXT PRIMARY KEY,
    upload_id   TEXT NOT NULL UNIQUE REFERENCES uploads(id),
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created     REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class BucketRow:
    """A bucket as last heard of."""

    bucket_id: str
    address: str
    last_seen: float
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


@dataclass(frozen=True, slots=True)
class FileRow:
    """A committed file: its current upload and where the parts are."""

    name: str
    size: int
    sha256: str
    created: float
    upload: UploadRow
    fragments: tuple[FragmentRow, ...]


class RegistryDB:
    """Synchronous registry over one SQLite connection (thread-safe by a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _tx(self, statements: Iterable[tuple[str, tuple[object, ...]]]) -> None:
        with self._transaction() as c:
            for sql, args in statements:
                c.execute(sql, args)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- buckets ---------------------------------------------------------------------

    def upsert_bucket(self, beat: Heartbeat, now: float) -> None:
        """Record a bucket's heartbeat."""
        u = beat.usage
        self._tx(
            [
                (
                    "INSERT INTO buckets (id, address, last_seen, used, free, capacity, fragments)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                    " address=excluded.address, last_seen=excluded.last_seen, used=excluded.used,"
                    " free=excluded.free, capacity=excluded.capacity, fragments=excluded.fragments",
                    (beat.bucket_id, beat.address, now, u.used, u.free, u.capacity, u.fragments),
                )
            ]
        )

    def buckets(self) -> list[BucketRow]:
        """Every bucket ever registered."""
        rows = self._query(
            "SELECT id, address, last_seen, used, free, capacity, fragments FROM buckets ORDER BY id"
        )
        return [BucketRow(*r) for r in rows]

    # -- uploads ---------------------------------------------------------------------

    def begin_upload(self, upload: UploadRow, fragments: list[FragmentRow]) -> None:
        """Record a new in-progress upload and where each of its parts goes."""
        self._tx(
            [
                (
                    "INSERT INTO uploads (id, name, size, parts, unit, state, created)"
                    " VALUES (?, ?, ?, ?, ?, 'in_progress', ?)",
                    (upload.upload_id, upload.name, upload.size, upload.parts, upload.unit, upload.created),
                ),
                *(
                    (
                        "INSERT INTO fragments (upload_id, part, bucket_id, size) VALUES (?, ?, ?, ?)",
                        (f.upload_id, f.part, f.bucket_id, f.size),
                    )
                    for f in fragments
                ),
            ]
        )

    def commit_upload(self, upload_id: str, sha256: str, checksums: dict[int, str], now: float) -> str | None:
        """Make ``upload_id`` the current version of its name, atomically.

        Returns the id of the version it replaced (now ``deleting``), if any.
        """
        with self._transaction() as c:
            row = c.execute(
                "SELECT name, size FROM uploads WHERE id = ? AND state = 'in_progress'",
                (upload_id,),
            ).fetchone()
            if row is None:
                raise Internal(f"upload {upload_id} is not in progress; cannot commit it")
            name, size = row
            old = c.execute("SELECT upload_id FROM files WHERE name = ?", (name,)).fetchone()
            for part, digest in checksums.items():
                c.execute(
                    "UPDATE fragments SET sha256 = ? WHERE upload_id = ? AND part = ?",
                    (digest, upload_id, part),
                )
            c.execute(
                "UPDATE uploads SET state = 'committed', sha256 = ?, finished = ? WHERE id = ?",
                (sha256, now, upload_id),
            )
            if old is not None:
                c.execute("UPDATE uploads SET state = 'deleting', finished = ? WHERE id = ?", (now, old[0]))
            c.execute(
                "INSERT INTO files (name, upload_id, size, sha256, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " upload_id=excluded.upload_id, size=excluded.size,"
                " sha256=excluded.sha256, created=excluded.created",
                (name, upload_id, size, sha256, now),
            )
        return None if old is None else str(old[0])

    def fail_upload(self, upload_id: str, now: float) -> None:
        """Mark an in-progress upload failed (its fragments are then cleaned up)."""
        self._tx(
            [
                (
                    "UPDATE uploads SET state = 'failed', finished = ?"
                    " WHERE id = ? AND state = 'in_progress'",
                    (now, upload_id),
                )
            ]
        )

    def fail_all_in_progress(self, now: float) -> int:
        """After a restart: every upload still in progress was interrupted."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE uploads SET state = 'failed', finished = ? WHERE state = 'in_progress'", (now,)
            )
            return cur.rowcount

    def upload(self, upload_id: str) -> UploadRow | None:
        """One upload by id."""
        rows = self._query(
            "SELECT id, name, size, parts, unit, state, sha256, created FROM uploads WHERE id = ?",
            (upload_id,),
        )
        return UploadRow(*rows[0]) if rows else None

    def fragments(self, upload_id: str) -> list[FragmentRow]:
        """The fragment rows of an upload, in part order."""
        rows = self._query(
            "SELECT upload_id, part, bucket_id, size, sha256 FROM fragments"
            " WHERE upload_id = ? ORDER BY part",
            (upload_id,),
        )
        return [FragmentRow(*r) for r in rows]

    # -- cleanup ---------------------------------------------------------------------

    def pending_deletions(self) -> list[tuple[str, str]]:
        """(upload id, bucket id) pairs whose fragments must be deleted."""
        rows = self._query(
            "SELECT DISTINCT f.upload_id, f.bucket_id FROM fragments f JOIN uploads u"
            " ON u.id = f.upload_id WHERE u.state IN ('failed', 'deleting')"
            " ORDER BY f.upload_id, f.bucket_id"
        )
        return [(str(a), str(b)) for a, b in rows]

    def fragments_deleted(self, upload_id: str, bucket_id: str) -> None:
        """A bucket confirmed it no longer holds fragments of ``upload_id``.

        A ``deleting`` upload with no fragment left is forgotten; a ``failed`` one stays
        as a record of the failure.
        """
        self._tx(
            [
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
            ]
        )

    def expected_on(self, bucket_id: str) -> dict[str, str]:
        """Fragment ids the registry places on ``bucket_id``, with their upload's state."""
        rows = self._query(
            "SELECT f.upload_id || '.' || f.part, u.state FROM fragments f JOIN uploads u"
            " ON u.id = f.upload_id WHERE f.bucket_id = ?",
            (bucket_id,),
        )
        return {str(fid): str(state) for fid, state in rows}

    # -- files -----------------------------------------------------------------------

    def lookup(self, name: str) -> FileRow | None:
        """The committed file called ``name``, with its fragments."""
        rows = self._query("SELECT upload_id, size, sha256, created FROM files WHERE name = ?", (name,))
        if not rows:
            return None
        upload_id, size, sha256, created = rows[0]
        upload = self.upload(str(upload_id))
        assert upload is not None  # files.upload_id is a foreign key
        return FileRow(
            name,
            int(size),
            str(sha256),
            float(created),
            upload,
            tuple(self.fragments(str(upload_id))),
        )

    def list_files(self, prefix: str = "") -> list[tuple[str, int, str, float]]:
        """(name, size, sha256, created) of committed files, by name."""
        rows = self._query(
            "SELECT name, size, sha256, created FROM files WHERE substr(name, 1, ?) = ? ORDER BY name",
            (len(prefix), prefix),
        )
        return [(str(n), int(s), str(h), float(c)) for n, s, h, c in rows]

    def delete_file(self, name: str, now: float) -> str | None:
        """Remove ``name``; its upload becomes ``deleting``. Returns that upload's id."""
        with self._transaction() as c:
            row = c.execute("SELECT upload_id FROM files WHERE name = ?", (name,)).fetchone()
            if row is not None:
                c.execute("DELETE FROM files WHERE name = ?", (name,))
                c.execute("UPDATE uploads SET state = 'deleting', finished = ? WHERE id = ?", (now, row[0]))
        return None if row is None else str(row[0])
