"""Fixtures for every test: a throwaway PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.pg import PostgresCluster, require_postgres


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the whole session, deleted at the end.

    Skips when PostgreSQL is not installed, or fails if ``KARMA8_TEST_POSTGRES=required``.
    """
    require_postgres()
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a fresh, empty database of the session cluster, dropped after the test.

    A test that stops the shared server and fails before restarting it gets it restarted
    here, so the tests after it still have PostgreSQL.
    """
    # Named after the test, for reading the server log; the suffix makes it unique.
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    name = f"{stem}_{uuid.uuid4().hex[:12]}"
    url = postgres_cluster.create_database(name)
    yield url
    if not postgres_cluster.running:
        postgres_cluster.start_server()
    postgres_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where a fresh registry lives: a SQLite file, then a PostgreSQL database (the
    registry's tests run against both backends)."""
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("registry") / "registry.sqlite3")
    return str(request.getfixturevalue("postgres_url"))
