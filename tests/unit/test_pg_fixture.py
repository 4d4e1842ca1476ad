"""The throwaway PostgreSQL of the tests (tests/pg.py, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

import tests.pg
from tests.pg import PostgresCluster, require_postgres

#: The databases the parametrized test below has seen, across its runs.
_seen_databases: set[str] = set()


def test_select_over_unix_socket(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Over a Unix socket the server has no address, and the host is the socket directory.
        assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)
        assert Path(conn.info.host).is_dir()
        assert conn.execute("SELECT current_setting('listen_addresses')").fetchone() == ("",)


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_distinct_empty_database(postgres_url: str, run: int) -> None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        database = row[0]
        assert database != "postgres"
        assert database not in _seen_databases
        _seen_databases.add(database)
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
        # The next run would see this table if it got the same database.
        conn.execute("CREATE TABLE marker (run int)")
        conn.execute("INSERT INTO marker VALUES (%s)", (run,))


def test_create_database_urls_are_distinct(postgres_cluster: PostgresCluster) -> None:
    first = postgres_cluster.create_database("pg_fixture_first")
    second = postgres_cluster.create_database("pg_fixture_second")
    try:
        assert first != second
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_in_first (x int)")
        with psycopg.connect(second) as conn:
            tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
            assert tables == []
    finally:
        postgres_cluster.drop_database("pg_fixture_first")
        postgres_cluster.drop_database("pg_fixture_second")


def test_stop_and_start_server() -> None:
    # A cluster of its own: the shared one stays up whatever happens here.
    require_postgres()
    with PostgresCluster() as cluster:
        url = cluster.create_database("restart")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        with psycopg.connect(url, autocommit=True) as open_session:
            cluster.stop_server()
            assert not cluster.running
            # The session open across the shutdown is ended, and new ones are refused.
            with pytest.raises(psycopg.OperationalError):
                open_session.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5)
        cluster.start_server()
        assert cluster.running
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    assert not cluster.running


@pytest.mark.parametrize(
    ("required", "outcome"), [("required", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_postgres_skips_unless_required(
    monkeypatch: pytest.MonkeyPatch, required: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(tests.pg, "find_bindir", lambda: None)
    monkeypatch.setenv("KARMA8_TEST_POSTGRES", required)
    assert not tests.pg.postgres_available()
    with pytest.raises(outcome, match="PostgreSQL is not installed"):
        require_postgres()
