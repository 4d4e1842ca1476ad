"""The synchronous registry (SQLite and PostgreSQL): uploads, files, fragments, buckets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from karma8.core.records import Heartbeat, Usage
from karma8.registry.db import BucketRow, FragmentRow, RegistryDB, UploadRow

DIGEST = "ab" * 32
BUCKETS = ("b0", "b1", "b2")


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


def _uid(n: int) -> str:
    return f"{n:032x}"


def _begin(db: RegistryDB, n: int, name: str, size: int = 30, now: float = 1.0) -> str:
    upload_id = _uid(n)
    parts = len(BUCKETS)
    db.begin_upload(
        UploadRow(upload_id, name, size, parts, unit=10, state="in_progress", created=now),
        [FragmentRow(upload_id, p, bucket, size // parts, None) for p, bucket in enumerate(BUCKETS)],
    )
    return upload_id


def _commit(db: RegistryDB, upload_id: str, now: float = 2.0, digest: str = DIGEST) -> str | None:
    return db.commit_upload(upload_id, digest, {p: f"{p:064x}" for p in range(len(BUCKETS))}, now)


def _put(db: RegistryDB, n: int, name: str, size: int = 30, now: float = 2.0) -> str:
    upload_id = _begin(db, n, name, size)
    _commit(db, upload_id, now)
    return upload_id


def _state(db: RegistryDB, upload_id: str) -> str | None:
    row = db.upload(upload_id)
    return None if row is None else row.state


# -- uploads -------------------------------------------------------------------------


def test_begin_records_an_in_progress_upload(db: RegistryDB) -> None:
    upload_id = _begin(db, 1, "a.txt", now=5.0)

    assert db.upload(upload_id) == UploadRow(upload_id, "a.txt", 30, 3, 10, "in_progress", None, 5.0)
    assert db.fragments(upload_id) == [
        FragmentRow(upload_id, 0, "b0", 10, None),
        FragmentRow(upload_id, 1, "b1", 10, None),
        FragmentRow(upload_id, 2, "b2", 10, None),
    ]
    # Not visible as a file until committed.
    assert db.lookup("a.txt") is None
    assert db.list_files() == []
    assert db.pending_deletions() == []


def test_commit_makes_the_file_visible(db: RegistryDB) -> None:
    upload_id = _begin(db, 1, "a.txt", now=1.0)

    assert _commit(db, upload_id, now=7.0) is None

    row = db.lookup("a.txt")
    assert row is not None
    assert (row.name, row.size, row.sha256, row.created) == ("a.txt", 30, DIGEST, 7.0)
    assert row.upload.upload_id == upload_id
    assert row.upload.state == "committed"
    assert row.upload.sha256 == DIGEST
    assert [f.sha256 for f in row.fragments] == [f"{p:064x}" for p in range(3)]
    assert [f.bucket_id for f in row.fragments] == list(BUCKETS)
    assert db.list_files() == [("a.txt", 30, DIGEST, 7.0)]


def test_second_upload_of_a_name_replaces_the_first(db: RegistryDB) -> None:
    old = _put(db, 1, "a.txt", size=30)
    new = _begin(db, 2, "a.txt", size=60)

    # While the new version uploads, the old one is still the file.
    row = db.lookup("a.txt")
    assert row is not None
    assert row.upload.upload_id == old

    assert _commit(db, new, now=9.0, digest="cd" * 32) == old

    row = db.lookup("a.txt")
    assert row is not None
    assert (row.upload.upload_id, row.size, row.sha256) == (new, 60, "cd" * 32)
    assert _state(db, old) == "deleting"
    assert _state(db, new) == "committed"
    assert db.list_files() == [("a.txt", 60, "cd" * 32, 9.0)]
    assert db.pending_deletions() == [(old, b) for b in BUCKETS]


def test_fail_upload(db: RegistryDB) -> None:
    upload_id = _begin(db, 1, "a.txt")

    db.fail_upload(upload_id, now=3.0)

    assert _state(db, upload_id) == "failed"
    assert db.lookup("a.txt") is None
    assert db.pending_deletions() == [(upload_id, b) for b in BUCKETS]


def test_fail_upload_leaves_committed_uploads_alone(db: RegistryDB) -> None:
    upload_id = _put(db, 1, "a.txt")

    db.fail_upload(upload_id, now=3.0)

    assert _state(db, upload_id) == "committed"
    assert db.lookup("a.txt") is not None
    assert db.pending_deletions() == []


def test_failed_upload_does_not_disturb_the_current_version(db: RegistryDB) -> None:
    current = _put(db, 1, "a.txt")
    attempt = _begin(db, 2, "a.txt")

    db.fail_upload(attempt, now=3.0)

    row = db.lookup("a.txt")
    assert row is not None
    assert row.upload.upload_id == current
    assert db.pending_deletions() == [(attempt, b) for b in BUCKETS]


def test_a_restart_fails_the_uploads_in_progress(db: RegistryDB) -> None:
    a = _begin(db, 1, "a")
    b = _begin(db, 2, "b")
    c = _put(db, 3, "c")

    assert db.start_server("127.0.0.1:8080") == (2, 0)

    assert (_state(db, a), _state(db, b), _state(db, c)) == ("failed", "failed", "committed")
    assert db.start_server("127.0.0.1:8080") == (0, 0)


def test_unknown_upload(db: RegistryDB) -> None:
    assert db.upload(_uid(99)) is None
    assert db.fragments(_uid(99)) == []


# -- cleanup -------------------------------------------------------------------------


def test_pending_deletions_only_for_failed_and_deleting(db: RegistryDB) -> None:
    in_progress = _begin(db, 1, "in-progress")
    _put(db, 2, "committed")
    failed = _begin(db, 3, "failed")
    db.fail_upload(failed, now=3.0)
    deleting = _put(db, 4, "deleted")
    assert db.delete_file("deleted", now=4.0) == deleting

    pending = db.pending_deletions()

    assert pending == sorted([(failed, b) for b in BUCKETS] + [(deleting, b) for b in BUCKETS])
    assert all(upload_id != in_progress for upload_id, _ in pending)


def test_pending_deletions_are_distinct_pairs(db: RegistryDB) -> None:
    # Two parts on one bucket (possible when parts > buckets in a test stack) are one pair.
    upload_id = _uid(1)
    db.begin_upload(
        UploadRow(upload_id, "x", 20, 2, 10, "in_progress", created=1.0),
        [FragmentRow(upload_id, 0, "b0", 10, None), FragmentRow(upload_id, 1, "b0", 10, None)],
    )
    db.fail_upload(upload_id, now=2.0)

    assert db.pending_deletions() == [(upload_id, "b0")]


def test_fragments_deleted_forgets_a_deleting_upload_once_empty(db: RegistryDB) -> None:
    old = _put(db, 1, "a.txt")
    new = _put(db, 2, "a.txt")

    db.fragments_deleted(old, "b0")
    db.fragments_deleted(old, "b1")

    assert [f.bucket_id for f in db.fragments(old)] == ["b2"]
    assert _state(db, old) == "deleting"
    assert db.pending_deletions() == [(old, "b2")]

    db.fragments_deleted(old, "b2")

    assert db.fragments(old) == []
    assert db.upload(old) is None
    assert db.pending_deletions() == []
    # The current version is untouched.
    row = db.lookup("a.txt")
    assert row is not None
    assert row.upload.upload_id == new
    assert len(row.fragments) == 3


def test_fragments_deleted_keeps_a_failed_upload_row(db: RegistryDB) -> None:
    upload_id = _begin(db, 1, "a.txt")
    db.fail_upload(upload_id, now=2.0)

    for bucket in BUCKETS:
        db.fragments_deleted(upload_id, bucket)

    assert db.fragments(upload_id) == []
    assert _state(db, upload_id) == "failed"
    assert db.pending_deletions() == []


@pytest.mark.parametrize("committed", [False, True])
def test_fragments_deleted_ignores_live_uploads(db: RegistryDB, committed: bool) -> None:
    upload_id = _put(db, 1, "a.txt") if committed else _begin(db, 1, "a.txt")

    db.fragments_deleted(upload_id, "b0")

    assert [f.bucket_id for f in db.fragments(upload_id)] == list(BUCKETS)
    assert db.upload(upload_id) is not None


def test_fragments_deleted_for_unknown_upload_is_harmless(db: RegistryDB) -> None:
    upload_id = _put(db, 1, "a.txt")

    db.fragments_deleted(_uid(42), "b0")

    assert len(db.fragments(upload_id)) == 3


# -- files -------------------------------------------------------------------------


def test_delete_file(db: RegistryDB) -> None:
    upload_id = _put(db, 1, "a.txt")
    _put(db, 2, "b.txt")

    assert db.delete_file("a.txt", now=5.0) == upload_id

    assert db.lookup("a.txt") is None
    assert _state(db, upload_id) == "deleting"
    assert [name for name, *_ in db.list_files()] == ["b.txt"]
    assert db.pending_deletions() == [(upload_id, b) for b in BUCKETS]
    assert db.delete_file("a.txt", now=6.0) is None


def test_delete_missing_file(db: RegistryDB) -> None:
    assert db.delete_file("nope", now=1.0) is None


def test_name_can_be_reused_after_delete(db: RegistryDB) -> None:
    _put(db, 1, "a.txt")
    db.delete_file("a.txt", now=3.0)
    new = _put(db, 2, "a.txt")

    row = db.lookup("a.txt")
    assert row is not None
    assert row.upload.upload_id == new


def test_the_file_counter_follows_commits_replacements_and_deletes(db: RegistryDB) -> None:
    assert db.stored() == (0, 0)
    _put(db, 1, "a", size=30)
    _put(db, 2, "b", size=60)
    assert db.stored() == (2, 90)
    _put(db, 3, "a", size=90)  # replaces a: one file, 60 bytes more
    assert db.stored() == (2, 150)
    db.fail_upload(_begin(db, 4, "c", size=300), 3.0)  # never committed: not counted
    db.delete_file("b", 4.0)
    db.delete_file("b", 4.0)  # already gone: nothing changes
    assert db.stored() == (1, 90)
    assert db.stored_drift() == (0, 0)
    assert db.repair_summary()["stored_files"] == 1


def test_list_files_in_name_order_with_prefix(db: RegistryDB) -> None:
    names = ["logs/b", "logs/a", "log", "logs2", "other/logs/x", "LOGS/c", "日本/x"]
    for n, name in enumerate(names):
        _put(db, n, name)

    assert [row[0] for row in db.list_files()] == sorted(names)
    assert [row[0] for row in db.list_files("logs/")] == ["logs/a", "logs/b"]
    assert [row[0] for row in db.list_files("log")] == ["log", "logs/a", "logs/b", "logs2"]
    assert [row[0] for row in db.list_files("日本")] == ["日本/x"]
    assert db.list_files("zzz") == []
    assert db.list_files("logs/a/longer-than-the-name") == []


def test_list_files_prefix_has_no_wildcards(db: RegistryDB) -> None:
    for n, name in enumerate(["100%", "100% sure", "1000", "a_b", "axb", "a_bc", "%x", "_y"]):
        _put(db, n, name)

    assert [row[0] for row in db.list_files("100%")] == ["100%", "100% sure"]
    assert [row[0] for row in db.list_files("a_")] == ["a_b", "a_bc"]
    assert [row[0] for row in db.list_files("%")] == ["%x"]
    assert [row[0] for row in db.list_files("_")] == ["_y"]


def test_list_files_prefix_beyond_the_bmp(db: RegistryDB) -> None:
    # SQLite's substr counts characters like Python's len, also for astral characters.
    for n, name in enumerate(["😀/a", "😀😀/b", "x😀"]):
        _put(db, n, name)

    assert [row[0] for row in db.list_files("😀/")] == ["😀/a"]
    assert [row[0] for row in db.list_files("😀")] == ["😀/a", "😀😀/b"]


# -- persistence and buckets -----------------------------------------------------------


def test_data_survives_reopening(registry_url: str) -> None:
    db = RegistryDB(registry_url)
    committed = _put(db, 1, "a.txt")
    failed = _begin(db, 2, "b.txt")
    db.fail_upload(failed, now=3.0)
    db.upsert_bucket(Heartbeat("b0", "127.0.0.1:9100", Usage(1, 2, 3, 4), hello=True))
    db.close()

    db = RegistryDB(registry_url)
    try:
        row = db.lookup("a.txt")
        assert row is not None
        assert row.upload.upload_id == committed
        assert len(row.fragments) == 3
        assert _state(db, failed) == "failed"
        assert db.pending_deletions() == [(failed, b) for b in BUCKETS]
        assert [replace(b, age=0.0) for b in db.buckets()] == [
            BucketRow("b0", "127.0.0.1:9100", 0.0, 1, 2, 3, 4)
        ]
    finally:
        db.close()


def test_upsert_bucket(db: RegistryDB) -> None:
    assert db.buckets() == []

    db.upsert_bucket(Heartbeat("b1", "h1:1", Usage(10, 90, 100, 1), hello=True))
    db.upsert_bucket(Heartbeat("b0", "h0:1", Usage(0, 50, 50, 0), hello=True))
    db.upsert_bucket(Heartbeat("b1", "h1:2", Usage(20, 80, 100, 2), hello=False))

    rows = db.buckets()
    assert [replace(b, age=0.0) for b in rows] == [
        BucketRow("b0", "h0:1", 0.0, 0, 50, 50, 0),
        BucketRow("b1", "h1:2", 0.0, 20, 80, 100, 2),
    ]
    assert all(0 <= b.age < 5 for b in rows)  # seconds since the beat, by the database's clock
