"""The registry's schema versions: older registries migrate in place, newer ones are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from karma8.errors import Internal
from karma8.registry import schema
from karma8.registry.database import open_database
from karma8.registry.db import RegistryDB

DIGEST = "ef" * 32
UID = "0123456789abcdef" * 2
FAILED, CLEANED = "1" * 32, "2" * 32


def _version_2(path: Path) -> None:
    """A registry as the release before version 3 left it: triggers keep the ledger,
    ``user_version`` holds the version; two in-progress uploads of one name (which
    only a crash of that release could leave behind)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in schema.SQLITE_MIGRATIONS[:2]:
        for statement in schema.statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    rows = [
        ("u1", "a", "committed", 1.0),
        ("u2", "b", "in_progress", 2.0),
        ("u3", "b", "in_progress", 3.0),
        ("u4", "c", "deleting", 4.0),
    ]
    for upload_id, name, state, created in rows:
        conn.execute(
            "INSERT INTO uploads (id, name, size, parts, unit, state, created, sha256)"
            " VALUES (?, ?, 60, 2, 16, 'in_progress', ?, ?)",
            (upload_id, name, created, DIGEST),
        )
        for part in range(2):
            conn.execute(
                "INSERT INTO fragments (upload_id, part, bucket_id, size) VALUES (?, ?, ?, 30)",
                (upload_id, part, f"b{part + int(created) % 2}"),
            )
        conn.execute("UPDATE uploads SET state = ? WHERE id = ?", (state, upload_id))
    conn.execute(
        "INSERT INTO files (name, upload_id, size, sha256, created) VALUES ('a', 'u1', 60, ?, 1)", (DIGEST,)
    )
    conn.close()


def test_a_version_2_registry_migrates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    _version_2(path)
    db = RegistryDB(path)
    try:
        with db.database.read() as tx:
            assert schema.version(db.database, tx) == schema.VERSION
        assert db._query("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
        # The older duplicate in progress stays, the newer one is failed; the ledger counts
        # the committed file and the one upload left in progress.
        states = dict(db._query("SELECT id, state FROM uploads"))
        assert states == {"u1": "committed", "u2": "in_progress", "u3": "failed", "u4": "deleting"}
        assert db.ledger_drift() == {}
        assert db.placed() == {"b0": (30, 1), "b1": (60, 2), "b2": (30, 1)}
        file = db.lookup("a")
        assert file is not None
        assert (file.upload.upload_id, len(file.fragments)) == ("u1", 2)
    finally:
        db.close()
    # Opening it again migrates nothing.
    RegistryDB(path).close()


def _version_3(url: str) -> None:
    """A registry as release 3 left it (no indexes for the paged background passes)."""
    database = open_database(url)
    try:
        with database.transaction() as tx:
            if database.name == "sqlite":
                for script in schema.SQLITE_MIGRATIONS[:3]:
                    for statement in schema.statements(script):
                        tx.execute(statement)
            else:
                for statement in schema.statements(schema.POSTGRES_V3):
                    tx.execute(statement)
            tx.execute("INSERT INTO schema_version (version) VALUES (3)")
            tx.execute(
                "INSERT INTO uploads (id, name, size, parts, unit, state, created, sha256)"
                " VALUES (?, 'a', 60, 2, 16, 'committed', 1, ?)",
                (UID, DIGEST),
            )
            for part in range(2):
                tx.execute(
                    "INSERT INTO fragments (upload_id, part, bucket_id, size) VALUES (?, ?, ?, 30)",
                    (UID, part, f"b{part}"),
                )
            tx.execute("INSERT INTO placed (bucket_id, bytes, fragments) VALUES ('b0', 30, 1), ('b1', 30, 1)")
            # Failed uploads: one with a fragment still to delete, one long cleaned up; and
            # a file waiting for repair.
            for upload_id in (FAILED, CLEANED):
                tx.execute(
                    "INSERT INTO uploads (id, name, size, parts, unit, state, created)"
                    " VALUES (?, 'b', 30, 1, 16, 'failed', 1)",
                    (upload_id,),
                )
            tx.execute(
                "INSERT INTO fragments (upload_id, part, bucket_id, size) VALUES (?, 0, 'b1', 30)", (FAILED,)
            )
            tx.execute(
                "INSERT INTO repairs (upload_id, spare, reason, since, next_try) VALUES (?, 0, 'x', 1, 1)",
                (UID,),
            )
            tx.execute(
                "INSERT INTO files (name, upload_id, size, sha256, created) VALUES ('a', ?, 60, ?, 1)",
                (UID, DIGEST),
            )
    finally:
        database.close()


def _indexes(db: RegistryDB) -> set[str]:
    if db.database.name == "sqlite":
        return {str(n) for (n,) in db._query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return {str(n) for (n,) in db._query("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}


def test_a_version_3_registry_migrates_in_place(registry_url: str) -> None:
    _version_3(registry_url)
    db = RegistryDB(registry_url)
    try:
        with db.database.read() as tx:
            assert schema.version(db.database, tx) == schema.VERSION == 4
        indexes = _indexes(db)
        assert {
            "fragments_bucket_upload",
            "fragments_bucket_size_id",
            "moves_dst_upload",
            "uploads_state_id",
            "uploads_to_delete",
            "repairs_due",
        } <= indexes
        assert not {"fragments_bucket_size", "uploads_state", "repairs_order"} & indexes
        # Only the failed upload with a fragment left is walked by the janitor.
        assert db.deletions_page("failed", "", 10) == ([(FAILED, "b1")], None)
        assert [r.upload_id for r in db.due_repairs(5.0, 10)] == [UID]
        # No queueing of upgrades was recorded: the first start walks the files (the one
        # in format 1 is in the queue already) and records it.
        assert db._query("SELECT parity, format FROM upgrades") == []
        assert db.queue_upgrades(0, 5.0) == 0
        assert db._query("SELECT parity, format FROM upgrades") == [(0, 2)]
        assert db.ledger_drift() == {}
        assert db.stored() == (1, 60)  # the file counter starts at what the files rows hold
        assert db.expected_page("b1", "", 10) == ({UID + ".1": "committed", FAILED + ".0": "failed"}, None)
        file = db.lookup("a")
        assert file is not None
        assert [f.bucket_id for f in file.fragments] == ["b0", "b1"]
    finally:
        db.close()
    RegistryDB(registry_url).close()  # opening it again migrates nothing


def test_a_registry_from_a_newer_release_is_refused(registry_url: str) -> None:
    RegistryDB(registry_url).close()
    database = open_database(registry_url)
    try:
        with database.transaction() as tx:
            tx.execute("UPDATE schema_version SET version = ?", (schema.VERSION + 1,))
        with pytest.raises(Internal, match="newer than this release"):
            RegistryDB(database)
    finally:
        database.close()


def test_every_backend_has_every_version() -> None:
    assert len(schema.SQLITE_MIGRATIONS) == schema.VERSION
    assert sorted(schema.POSTGRES_MIGRATIONS) == list(
        range(min(schema.POSTGRES_MIGRATIONS), schema.VERSION + 1)
    )


def test_a_registry_is_described_without_its_password(postgres_url: str) -> None:
    database = open_database(postgres_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@"))
    try:
        text = database.describe()
    finally:
        database.close()
    assert "s3cret" not in text
    assert text.startswith("postgresql://")
    assert "?host=/" in text  # the socket's directory
