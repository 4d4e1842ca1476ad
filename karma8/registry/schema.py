"""The registry's schema, and the migrations that bring any older registry up to it.

A registry records its schema version in the table ``schema_version`` (registries before
version 3 are SQLite files that kept it in ``PRAGMA user_version``). Opening one runs, in
one transaction, every migration it has not had yet, so a registry written by any earlier
release opens in place (``tests/unit/test_registry_schema.py`` upgrades one written by
release 0.1). A registry from a newer release is refused rather than misread.

SQLite: version 1 is the schema of release 0.1, which had no version number: its
statements are idempotent (``IF NOT EXISTS``), so they run on an unnumbered registry of
any age. PostgreSQL registries start at version 3 (:data:`POSTGRES_V3`, the same tables
with PostgreSQL's types); every later version is a pair of scripts, one per database.
"""

from __future__ import annotations

import sqlite3

from karma8.errors import Internal
from karma8.registry.database import Database, Tx

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

# Several API servers on one registry (issue 13): the ledger is kept by explicit
# statements in the registry's transactions (the same on both databases) instead of
# triggers; at most one client upload of a name in progress, enforced by the database
# (a rewrite by repair, which names the upload it rewrites, is not a client upload);
# the version moves to a table. Duplicate in-progress uploads of an older registry (there
# are none unless two servers shared it) are failed, keeping the oldest. The servers and
# their liveness (``servers``), which server runs each upload and move (``server``: ''
# for those of the single server before), the leases of background jobs (``leases``)
# and the uploads each server's downloads read (``reads``).
V3 = """
DROP TRIGGER IF EXISTS placed_insert;
DROP TRIGGER IF EXISTS placed_delete;
DROP TRIGGER IF EXISTS placed_update;
DROP TRIGGER IF EXISTS placed_dead;
ALTER TABLE uploads ADD COLUMN rewrites TEXT;
UPDATE uploads SET state = 'failed', finished = created WHERE state = 'in_progress'
    AND rowid NOT IN (SELECT min(rowid) FROM uploads WHERE state = 'in_progress' GROUP BY name);
CREATE UNIQUE INDEX uploads_in_progress_name ON uploads(name)
    WHERE state = 'in_progress' AND rewrites IS NULL;
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE servers (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    started     REAL NOT NULL,
    last_seen   REAL NOT NULL
);
ALTER TABLE uploads ADD COLUMN server TEXT NOT NULL DEFAULT '';
ALTER TABLE moves ADD COLUMN server TEXT NOT NULL DEFAULT '';
CREATE INDEX uploads_in_progress ON uploads(server) WHERE state = 'in_progress';
CREATE TABLE leases (
    job         TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    expires     REAL NOT NULL
);
CREATE TABLE reads (
    server      TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    PRIMARY KEY (upload_id, server)
);
DELETE FROM placed;
INSERT INTO placed (bucket_id, bytes, fragments)
    SELECT f.bucket_id, SUM(f.size), COUNT(*) FROM fragments f JOIN uploads u ON u.id = f.upload_id
    WHERE u.state IN ('in_progress', 'committed') GROUP BY f.bucket_id;
"""

#: Version 3 on PostgreSQL: sizes are BIGINT (files reach 10 GiB), times DOUBLE PRECISION.
POSTGRES_V3 = """
CREATE TABLE buckets (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    last_seen   DOUBLE PRECISION NOT NULL,
    used        BIGINT NOT NULL,
    free        BIGINT NOT NULL,
    capacity    BIGINT NOT NULL,
    fragments   BIGINT NOT NULL
);
CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    parts       INTEGER NOT NULL,
    unit        INTEGER NOT NULL,
    sha256      TEXT,
    state       TEXT NOT NULL
                CHECK (state IN ('in_progress', 'committed', 'failed', 'deleting')),
    created     DOUBLE PRECISION NOT NULL,
    finished    DOUBLE PRECISION,
    parity      INTEGER NOT NULL DEFAULT 0,
    codec       TEXT NOT NULL DEFAULT 'none',
    format      INTEGER NOT NULL DEFAULT 1,
    rewrites    TEXT,
    server      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX uploads_state ON uploads(state);
CREATE UNIQUE INDEX uploads_in_progress_name ON uploads(name)
    WHERE state = 'in_progress' AND rewrites IS NULL;
CREATE TABLE fragments (
    upload_id   TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    part        INTEGER NOT NULL,
    bucket_id   TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT,
    state       TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'owed')),
    PRIMARY KEY (upload_id, part)
);
CREATE INDEX fragments_bucket_size ON fragments(bucket_id, size);
CREATE TABLE files (
    name        TEXT COLLATE "C" PRIMARY KEY,
    upload_id   TEXT NOT NULL UNIQUE REFERENCES uploads(id),
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    created     DOUBLE PRECISION NOT NULL
);
CREATE TABLE moves (
    upload_id   TEXT NOT NULL,
    part        INTEGER NOT NULL,
    src         TEXT NOT NULL,
    dst         TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    started     DOUBLE PRECISION NOT NULL,
    server      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (upload_id, part)
);
CREATE TABLE stale (
    bucket_id   TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    part        INTEGER NOT NULL,
    size        BIGINT NOT NULL,
    since       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (bucket_id, upload_id, part)
);
CREATE TABLE placed (
    bucket_id   TEXT PRIMARY KEY,
    bytes       BIGINT NOT NULL DEFAULT 0,
    fragments   BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE repairs (
    upload_id   TEXT PRIMARY KEY REFERENCES uploads(id) ON DELETE CASCADE,
    spare       INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    since       DOUBLE PRECISION NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    DOUBLE PRECISION NOT NULL,
    bad         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX repairs_order ON repairs(spare, next_try);
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE servers (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    started     DOUBLE PRECISION NOT NULL,
    last_seen   DOUBLE PRECISION NOT NULL
);
CREATE INDEX uploads_in_progress ON uploads(server) WHERE state = 'in_progress';
CREATE TABLE leases (
    job         TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    expires     DOUBLE PRECISION NOT NULL
);
CREATE TABLE reads (
    server      TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    PRIMARY KEY (upload_id, server)
);
"""

# Background passes in bounded batches at millions of files (issue 14): each pass walks a
# bucket's fragments, copies under way and stale copies, or the uploads in one state,
# in key order, one keyset page at a time (``WHERE key > last ORDER BY key LIMIT n``).
# These indexes make every page an index range, on both databases (the same script:
# upload ids are lowercase hex, which every collation orders as bytes, as buckets do).
# ``stored`` counts the committed files and their bytes (one row, kept by the statements
# that add and remove ``files`` rows): /status reads it instead of counting ``files``.
# The rebalancer reads a bucket's fragments by size in one total order (size, upload id,
# part) so that a plan resumes where it left off (karma8/registry/planning.py); that
# index replaces the one by size alone, and ``uploads_state_id`` the one by state alone.
# ``to_delete`` marks the failed and deleted uploads with fragment rows left (cleared
# when the last goes): the janitor walks those only, not every failed upload ever.
# ``upgrades`` remembers the protection the last queueing of under-protected files was
# done for (karma8/registry/repairs.py), so a start with the same config skips it;
# ``repairs_due`` lets the repairer read the due repairs of each spare count in order.
V4 = """
CREATE INDEX fragments_bucket_upload ON fragments(bucket_id, upload_id, part);
DROP INDEX fragments_bucket_size;
CREATE INDEX fragments_bucket_size_id ON fragments(bucket_id, size, upload_id, part);
CREATE INDEX moves_dst_upload ON moves(dst, upload_id, part);
CREATE INDEX uploads_state_id ON uploads(state, id);
DROP INDEX uploads_state;
ALTER TABLE uploads ADD COLUMN to_delete INTEGER NOT NULL DEFAULT 0;
UPDATE uploads SET to_delete = 1 WHERE state IN ('failed', 'deleting')
    AND EXISTS (SELECT 1 FROM fragments f WHERE f.upload_id = uploads.id);
CREATE INDEX uploads_to_delete ON uploads(state, id) WHERE to_delete = 1;
CREATE TABLE upgrades (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    parity INTEGER NOT NULL,
    format INTEGER NOT NULL
);
DROP INDEX repairs_order;
CREATE INDEX repairs_due ON repairs(spare, next_try, upload_id);
CREATE TABLE stored (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    files BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
INSERT INTO stored (id, files, bytes)
SELECT 1, COUNT(*), COALESCE(SUM(size), 0) FROM files HAVING COUNT(*) > 0;
"""

SQLITE_MIGRATIONS = (V1, V2, V3, V4)
#: Version -> script, from the first version a PostgreSQL registry can have.
POSTGRES_MIGRATIONS = {3: POSTGRES_V3, 4: V4}
VERSION = len(SQLITE_MIGRATIONS)
assert max(POSTGRES_MIGRATIONS) == VERSION


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


def version(db: Database, tx: Tx) -> int:
    """The schema version of the registry (0: empty)."""
    if db.name == "sqlite":
        if tx.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone() is None:
            return int(tx.execute("PRAGMA user_version").fetchone()[0])
    elif tx.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return 0
    row = tx.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(db: Database, tx: Tx) -> tuple[int, int]:
    """Bring the registry up to :data:`VERSION` inside the caller's transaction.

    Returns:
        (version found, version now).

    Raises:
        Internal: the registry was written by a newer release.
    """
    db.lock(tx, "karma8-schema")  # servers starting together migrate one at a time
    found = version(db, tx)
    if found > VERSION:
        raise Internal(
            f"registry schema version {found} is newer than this release's {VERSION}; upgrade karma8"
        )
    if found == VERSION:
        return found, found
    if db.name == "sqlite":
        scripts = SQLITE_MIGRATIONS[found:]
    else:
        first = max(found + 1, min(POSTGRES_MIGRATIONS))
        scripts = tuple(POSTGRES_MIGRATIONS[v] for v in range(first, VERSION + 1))
    for script in scripts:
        for statement in statements(script):
            tx.execute(statement)
    tx.execute("DELETE FROM schema_version")
    tx.execute("INSERT INTO schema_version (version) VALUES (?)", (VERSION,))
    if db.name == "sqlite":
        tx.execute(f"PRAGMA user_version = {VERSION}")  # what releases before 3 read
    return found, VERSION
