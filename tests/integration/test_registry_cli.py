"""``karma8 registry migrate|copy|check`` as an operator runs them: real subprocesses on
real SQLite files and PostgreSQL databases (the ``postgres_url`` fixture)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from karma8.core.records import Heartbeat, Usage
from karma8.registry import copy, schema
from karma8.registry.database import open_database
from karma8.registry.db import BucketSpace, FileRow, RegistryDB, UploadRow
from tests.integration.harness import free_port, karma8_cmd
from tests.integration.up_harness import cli_env

#: Limit for one command (each takes about a second).
DEADLINE = 120.0
GiB = 1 << 30
DIGEST = "9f" * 32
BUCKETS = tuple(f"b{i}" for i in range(5))
NAMES = tuple(f"media/clip {n} é.bin" for n in range(12))
#: Tables the fixture fills (more may exist; every table found is compared).
FILLED = ("buckets", "uploads", "fragments", "files", "placed", "repairs", "moves", "stale")


@dataclass(frozen=True)
class Run:
    """A finished command."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def ok(self) -> Run:
        assert self.code == 0, f"karma8 {' '.join(self.args)} exited {self.code}: {self.err}"
        assert self.err == "", self.err
        return self

    def error(self, *expected: str) -> Run:
        """A failure: exit status 1, one line on stderr mentioning ``expected``."""
        assert self.code == 1, f"karma8 {' '.join(self.args)} exited {self.code}: {self.out} {self.err}"
        assert "Traceback" not in self.err, self.err
        assert len(self.err.strip().splitlines()) == 1, self.err
        assert self.err.startswith("karma8: error: "), self.err
        for text in expected:
            assert text in self.err, self.err
        return self


def karma8(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``karma8 ARGS`` to completion."""
    done = subprocess.run(
        karma8_cmd(*args),
        capture_output=True,
        text=True,
        check=False,
        timeout=DEADLINE,
        cwd=cwd,
        env=cli_env() if env is None else env,
    )
    return Run(args, done.returncode, done.stdout, done.stderr)


# -- registries ------------------------------------------------------------------------


def _uid(n: int) -> str:
    return f"{n:032x}"


def _place(db: RegistryDB, n: int, name: str, parity: int = 0) -> str:
    upload_id = _uid(n)
    parts = 3
    part = 1000 + 17 * n
    db.place_upload(
        UploadRow(upload_id, name, part * parts, parts, 64, "in_progress", created=n + 0.25, parity=parity),
        [part] * (parts + parity),
        [BucketSpace(b, GiB, GiB) for b in BUCKETS[:4]],
    )
    return upload_id


def _put(db: RegistryDB, n: int, name: str, parity: int = 0, owed: tuple[int, ...] = ()) -> str:
    upload_id = _place(db, n, name, parity)
    checksums = {p: f"{p + n:064x}" for p in range(3 + parity) if p not in owed}
    db.commit_upload(upload_id, DIGEST, checksums, now=n + 0.5, owed=owed)
    return upload_id


def fill(where: str) -> None:
    """A registry with a row in every table: buckets, files (one replaced, one owing a
    fragment to repair), a failed and an in-progress upload, a move under way and a stale copy."""
    db = RegistryDB(where)
    try:
        for i, bucket in enumerate(BUCKETS):
            usage = Usage(used=i * 1000, free=GiB - i * 1000, capacity=GiB, fragments=i)
            db.upsert_bucket(Heartbeat(bucket, f"127.0.0.1:{7000 + i}", usage, hello=False))
        for n, name in enumerate(NAMES):
            _put(db, n, name)
        _put(db, 40, NAMES[0])  # the first version of NAMES[0] is now deleting
        _put(db, 41, "owed.bin", parity=1, owed=(3,))  # queued for repair
        db.fail_upload(_place(db, 42, "failed.bin"), now=9.0)
        _place(db, 43, "in-progress.bin")
        live = dict.fromkeys(BUCKETS, GiB)  # b4 is empty: moves go there
        move = db.start_move(live, 0.0, 3)
        assert move is not None
        db.abandon_move(move)  # its copy on b4 is stale
        assert db.start_move(live, 0.0, 3, skip={(move.upload_id, move.part)}) is not None
        assert db.ledger_drift() == {}
    finally:
        db.close()


def rows(where: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows (columns by name, rows sorted), found at run time."""
    db = open_database(where)
    try:
        with db.read() as tx:
            out = {}
            for table in copy.tables(db, tx):
                cols = sorted(copy.columns(db, tx, table))
                names = ", ".join(f'"{c}"' for c in cols)
                found = tx.execute(f'SELECT {names} FROM "{table}"').fetchall()
                out[table] = sorted((tuple(r) for r in found), key=repr)
            return out
    finally:
        db.close()


def lookup(where: str, name: str) -> FileRow | None:
    db = RegistryDB(where)
    try:
        assert db.ledger_drift() == {}
        return db.lookup(name)
    finally:
        db.close()


def execute(where: str, sql: str, args: tuple[object, ...] = ()) -> None:
    db = open_database(where)
    try:
        with db.transaction() as tx:
            tx.execute(sql, args)
    finally:
        db.close()


# -- migrate ---------------------------------------------------------------------------


def test_migrate_creates_a_registry_then_finds_it_current(tmp_path: Path) -> None:
    path = tmp_path / "new" / "registry.sqlite3"

    first = karma8("registry", "migrate", "--registry", f"sqlite:{path}", cwd=tmp_path).ok()
    again = karma8("registry", "migrate", "--registry", str(path), cwd=tmp_path).ok()

    v = schema.VERSION
    assert first.out == f"registry sqlite:{path} at schema version {v} (was 0)\n"
    assert again.out == f"registry sqlite:{path} at schema version {v} (was {v})\n"
    db = open_database(str(path))
    try:
        with db.read() as tx:
            assert schema.version(db, tx) == v
    finally:
        db.close()


def test_migrate_finds_the_api_servers_registry(tmp_path: Path, postgres_url: str) -> None:
    config = tmp_path / "karma8.toml"
    config.write_text(f'[api]\ndata_dir = "{tmp_path / "api"}"\n')

    by_config = karma8("registry", "migrate", "--config", str(config), cwd=tmp_path).ok()
    env = cli_env(KARMA8_API_REGISTRY_URL=postgres_url)
    by_env = karma8("registry", "migrate", "--config", str(config), cwd=tmp_path, env=env).ok()

    assert by_config.out.startswith(f"registry sqlite:{tmp_path / 'api' / 'registry.sqlite3'} at schema")
    assert by_env.out.startswith("registry postgresql://")
    assert by_env.out.endswith(f"at schema version {schema.VERSION} (was 0)\n")


def test_migrate_refuses_a_newer_registry_and_an_unreachable_one(tmp_path: Path, registry_url: str) -> None:
    RegistryDB(registry_url).close()
    execute(registry_url, "UPDATE schema_version SET version = ?", (schema.VERSION + 1,))

    karma8("registry", "migrate", "--registry", registry_url, cwd=tmp_path).error("newer than this release")
    karma8("registry", "check", "--registry", registry_url, cwd=tmp_path).error("newer than this release")

    nowhere = f"postgresql://karma8:s3cret@127.0.0.1:{free_port()}/registry"
    failed = karma8("registry", "migrate", "--registry", nowhere, cwd=tmp_path).error("unreachable")
    assert "s3cret" not in failed.err


# -- copy ------------------------------------------------------------------------------


def test_copy_sqlite_to_postgresql_and_back(tmp_path: Path, postgres_url: str) -> None:
    source = str(tmp_path / "source.sqlite3")
    back = str(tmp_path / "back.sqlite3")
    fill(source)
    before = rows(source)
    assert all(before[t] for t in FILLED), {t: len(before[t]) for t in FILLED}

    there = karma8("registry", "copy", "--from", f"sqlite:{source}", "--to", postgres_url, cwd=tmp_path)
    home = karma8("registry", "copy", "--from", postgres_url, "--to", back, "--batch", "4", cwd=tmp_path)

    for run in (there.ok(), home.ok()):
        lines = run.out.splitlines()
        assert lines[0].startswith("copying registry ")
        assert lines[-1].endswith("row counts equal, ledger exact")
        assert f"copied {sum(len(r) for t, r in before.items() if t != 'schema_version')} rows" in lines[-1]
        for table in FILLED:
            assert any(line.split() == [table, str(len(before[table])), "rows"] for line in lines), lines
    # Parents before the rows that reference them.
    order = [line.split()[0] for line in there.out.splitlines()[1:-1]]
    assert order.index("uploads") < min(order.index(t) for t in ("fragments", "files", "repairs"))
    assert rows(source) == before
    assert rows(postgres_url) == before
    assert rows(back) == before
    for where in (postgres_url, back):
        for name in (NAMES[0], NAMES[5], "owed.bin"):
            assert lookup(where, name) == lookup(source, name) is not None
        karma8("registry", "check", "--registry", where, cwd=tmp_path).ok()


def test_copy_refuses_a_non_empty_destination(tmp_path: Path, postgres_url: str) -> None:
    source = str(tmp_path / "source.sqlite3")
    fill(source)
    karma8("registry", "copy", "--from", source, "--to", postgres_url, cwd=tmp_path).ok()
    other = str(tmp_path / "other.sqlite3")
    db = RegistryDB(other)  # one bucket, nothing else
    db.upsert_bucket(Heartbeat("b9", "127.0.0.1:7009", Usage(0, GiB, GiB, 0), hello=True))
    db.close()
    filled, lone = rows(postgres_url), rows(other)

    refused = karma8("registry", "copy", "--from", source, "--to", postgres_url, cwd=tmp_path)
    refused.error("not empty", "nothing copied")
    karma8("registry", "copy", "--from", source, "--to", other, cwd=tmp_path).error(
        "not empty", "1 in buckets"
    )

    assert refused.out == ""
    assert rows(postgres_url) == filled
    assert rows(other) == lone


def test_copy_refuses_a_missing_source_and_a_drifting_ledger(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite3"
    karma8("registry", "copy", "--from", str(missing), "--to", str(tmp_path / "b.db"), cwd=tmp_path).error(
        "no registry at"
    )
    assert not missing.exists()

    source = str(tmp_path / "source.sqlite3")
    fill(source)
    execute(source, "UPDATE placed SET bytes = bytes + 5 WHERE bucket_id = 'b1'")
    dest = str(tmp_path / "dest.sqlite3")
    karma8("registry", "copy", "--from", source, "--to", dest, cwd=tmp_path).error("drifts")
    assert all(not table for name, table in rows(dest).items() if name != "schema_version")


# -- check -----------------------------------------------------------------------------


def test_check_reports_counts_and_a_drifting_ledger(tmp_path: Path, registry_url: str) -> None:
    fill(registry_url)

    good = karma8("registry", "check", "--registry", registry_url, cwd=tmp_path).ok()
    execute(
        registry_url,
        "UPDATE placed SET bytes = bytes + 100, fragments = fragments - 1 WHERE bucket_id = 'b2'",
    )
    bad = karma8("registry", "check", "--registry", registry_url, cwd=tmp_path).error("ledger", "1 bucket")

    lines = good.out.splitlines()
    assert lines[0].endswith(f"at schema version {schema.VERSION}")
    assert lines[1:] == [
        f"files: {len(NAMES) + 1}",
        f"uploads: {len(NAMES) + 4} (committed {len(NAMES) + 1}, deleting 1, failed 1, in_progress 1)",
        lines[3],  # fragments: checked below
        "file counter: exact",
        "ledger: exact",
    ]
    assert lines[3].startswith("fragments: ")
    assert "owed 1" in lines[3]
    assert "  b2: +100 bytes, -1 fragments" in bad.out.splitlines()
    undo = "UPDATE placed SET bytes = bytes - 100, fragments = fragments + 1 WHERE bucket_id = 'b2'"
    execute(registry_url, undo)
    execute(registry_url, "UPDATE stored SET files = files + 2")
    off = karma8("registry", "check", "--registry", registry_url, cwd=tmp_path)
    off.error("counter of stored files")
    assert "file counter: +2 files, +0 bytes off the files rows" in off.out.splitlines()


def test_check_refuses_an_empty_or_missing_registry(tmp_path: Path, postgres_url: str) -> None:
    karma8("registry", "check", "--registry", str(tmp_path / "none.sqlite3"), cwd=tmp_path).error(
        "no registry at"
    )
    karma8("registry", "check", "--registry", postgres_url, cwd=tmp_path).error("empty")
    assert not (tmp_path / "none.sqlite3").exists()
