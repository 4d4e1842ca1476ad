"""The registry's schema, and the migrations that bring any older registry up to it.

A registry records its schema version in SQLite's ``user_version``. Opening one runs, in
one transaction, every migration it has not had yet, so a registry written by any earlier
release opens in place (``tests/unit/test_registry_migrations.py`` opens one written by
release 0.1). A registry from a newer release is refused rather than misread.

Version 1 is the schema of release 0.1, which had no version number: its statements are
idempotent (``IF NOT EXISTS``), so they run on an unnumbered registry of any age.
"""

from __future__ import annotations

import sqlite3

from karma8.errors import Internal

V1 = """
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
DROP INDEX IF EXISTS fragments_bucket;
CREATE INDEX IF NOT EXISTS fragments_bucket_size ON fragments(bucket_id, size);
CREATE TABLE IF NOT EXISTS files (
    name        TEXT PRIMARY KEY,
    upload_id   TEXT NOT NULL UNIQUE REFERENCES uploads(id),
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    upload_id   TEXT NOT NULL,
    part        INTEGER NOT NULL,
    src         TEXT NOT NULL,
    dst         TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    started     REAL NOT NULL,
    PRIMARY KEY (upload_id, part)
);
CREATE TABLE IF NOT EXISTS stale (
    bucket_id   TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    part        INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    since       REAL NOT NULL,
    PRIMARY KEY (bucket_id, upload_id, part)
);
CREATE TABLE IF NOT EXISTS placed (
    bucket_id   TEXT PRIMARY KEY,
    bytes       INTEGER NOT NULL DEFAULT 0,
    fragments   INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS placed_insert AFTER INSERT ON fragments
WHEN (SELECT state FROM uploads WHERE id = NEW.upload_id) IN ('in_progress', 'committed')
BEGIN
    INSERT OR IGNORE INTO placed (bucket_id) VALUES (NEW.bucket_id);
    UPDATE placed SET bytes = bytes + NEW.size, fragments = fragments + 1
    WHERE bucket_id = NEW.bucket_id;
END;
CREATE TRIGGER IF NOT EXISTS placed_delete AFTER DELETE ON fragments
WHEN (SELECT state FROM uploads WHERE id = OLD.upload_id) IN ('in_progress', 'committed')
BEGIN
    UPDATE placed SET bytes = bytes - OLD.size, fragments = fragments - 1
    WHERE bucket_id = OLD.bucket_id;
END;
CREATE TRIGGER IF NOT EXISTS placed_update AFTER UPDATE OF bucket_id, size ON fragments
WHEN (SELECT state FROM uploads WHERE id = NEW.upload_id) IN ('in_progress', 'committed')
BEGIN
    UPDATE placed SET bytes = bytes - OLD.size, fragments = fragments - 1
    WHERE bucket_id = OLD.bucket_id;
    INSERT OR IGNORE INTO placed (bucket_id) VALUES (NEW.bucket_id);
    UPDATE placed SET bytes = bytes + NEW.size, fragments = fragments + 1
    WHERE bucket_id = NEW.bucket_id;
END;
CREATE TRIGGER IF NOT EXISTS placed_dead AFTER UPDATE OF state ON uploads
WHEN OLD.state IN ('in_progress', 'committed') AND NEW.state NOT IN ('in_progress', 'committed')
BEGIN
    UPDATE placed SET
        bytes = bytes - (SELECT SUM(size) FROM fragments
                         WHERE upload_id = NEW.id AND bucket_id = placed.bucket_id),
        fragments = fragments - (SELECT COUNT(*) FROM fragments
                                 WHERE upload_id = NEW.id AND bucket_id = placed.bucket_id)
    WHERE bucket_id IN (SELECT bucket_id FROM fragments WHERE upload_id = NEW.id);
END;
"""

# Erasure coding: the scheme of every upload (files before it: no parity, format 1),
# fragments owed by an upload that met its quorum without them, and the repair queue.
V2 = """
ALTER TABLE uploads ADD COLUMN parity INTEGER NOT NULL DEFAULT 0;
ALTER TABLE uploads ADD COLUMN codec TEXT NOT NULL DEFAULT 'none';
ALTER TABLE uploads ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
ALTER TABLE fragments ADD COLUMN state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'owed'));
CREATE TABLE repairs (
    upload_id   TEXT PRIMARY KEY REFERENCES uploads(id) ON DELETE CASCADE,
    spare       INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    since       REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    REAL NOT NULL,
    bad         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX repairs_order ON repairs(spare, next_try);
"""

MIGRATIONS = (V1, V2)
VERSION = len(MIGRATIONS)

# Rebuilt at every open: cheap, and heals a ledger from before the triggers existed.
REBUILD_PLACED = """
DELETE FROM placed;
INSERT INTO placed (bucket_id, bytes, fragments)
    SELECT f.bucket_id, SUM(f.size), COUNT(*) FROM fragments f JOIN uploads u ON u.id = f.upload_id
    WHERE u.state IN ('in_progress', 'committed') GROUP BY f.bucket_id;
"""


def statements(script: str) -> list[str]:
    """The SQL statements of ``script`` (a trigger's body stays whole)."""
    out: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"incomplete SQL statement: {pending[:80]!r}")
    return out


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bring the registry up to :data:`VERSION` inside the caller's transaction.

    Returns:
        (version found, version now).

    Raises:
        Internal: the registry was written by a newer release.
    """
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > VERSION:
        raise Internal(
            f"registry schema version {found} is newer than this release's {VERSION}; upgrade karma8"
        )
    for script in MIGRATIONS[found:]:
        for statement in statements(script):
            conn.execute(statement)
    for statement in statements(REBUILD_PLACED):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {VERSION}")
    return int(found), VERSION
