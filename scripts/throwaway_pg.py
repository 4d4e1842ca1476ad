"""A throwaway PostgreSQL cluster for a script's run (the tests' own, tests/pg.py): a
fresh data directory and a Unix socket in a temporary directory, removed at the end."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def throwaway_postgres(note: Callable[[str], None], error: type[Exception]) -> Iterator[Any]:
    """The cluster (a ``tests.pg.PostgresCluster``), running until the block ends.

    Raises:
        error: it could not start (with initdb's or pg_ctl's output).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.pg import PostgresCluster, PostgresError

    try:
        cluster = PostgresCluster()
        cluster.start()
    except PostgresError as exc:
        raise error(f"cannot start a throwaway PostgreSQL: {exc}") from exc
    try:
        note(f"throwaway PostgreSQL in {cluster.directory}")
        yield cluster
    finally:
        cluster.stop()
