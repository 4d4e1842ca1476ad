"""The two databases a registry can live in: SQLite (embedded) and PostgreSQL (shared).

The registry's SQL is written once (karma8/registry/db.py, repairs.py), with ``?``
placeholders and the subset of SQL both databases speak (``ON CONFLICT``, ``CASE``,
``||``). What truly differs lives here, in a :class:`Database`:

- how a connection is had and a write transaction begins (SQLite: one connection and
  ``BEGIN IMMEDIATE``, one writer at a time; PostgreSQL: a pool, ``READ COMMITTED``);
- explicit locks (:meth:`Database.lock`: an advisory transaction lock on PostgreSQL,
  nothing on SQLite where a write transaction already excludes every other) and
  ``FOR UPDATE`` on the rows a transaction is about to change;
- a few spellings (:attr:`Database.now`, :meth:`Database.group_concat`);
- which errors mean "run the transaction again" (:class:`Retry`: serialization failure,
  deadlock, SQLite busy) and which mean "the database is not there" (raised as
  :class:`~karma8.errors.RegistryUnavailable`, which API clients see as ``unavailable``).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from karma8.errors import ConfigError, RegistryUnavailable

log = logging.getLogger(__name__)


class Retry(Exception):
    """The transaction lost a race (serialization failure, deadlock, busy): run it again."""


class Duplicate(Exception):
    """A row would break a unique constraint (the transaction is then rolled back)."""


class Cursor(Protocol):
    """What the registry uses of a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """A connection inside a transaction (or a read)."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...


class Database(abc.ABC):
    """One registry database; subclasses are the backends."""

    #: ``sqlite`` or ``postgresql``.
    name = ""
    #: Calls that may run at once (the async facade's thread limit).
    concurrency = 1
    #: The database's clock, in seconds since the epoch (an SQL expression).
    now = ""
    #: Appended to a SELECT that reads rows the transaction will change.
    for_update = ""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        ...

    @abc.abstractmethod
    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """Queries that need no transaction of their own (each sees committed data)."""
        ...

    @abc.abstractmethod
    def lock(self, tx: Tx, key: str) -> None:
        """Serialize, until the transaction ends, the transactions that lock ``key``."""

    @abc.abstractmethod
    def group_concat(self, expr: str) -> str:
        """SQL: the values of ``expr`` in a group, as comma-separated text."""
        ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the database is, for logs (no password)."""
        ...


def open_database(url: str) -> Database:
    """The database at ``url``: ``postgresql://…`` (or ``postgres://``), ``sqlite:PATH``,
    or a plain path (SQLite)."""
    scheme = urlsplit(url).scheme if "://" in url or url.startswith("sqlite:") else ""
    if scheme in ("postgresql", "postgres"):
        return Postgres(url)
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:").removeprefix("//")
        return SQLite(Path(unquote(path)))
    if scheme:
        raise ConfigError(f"registry URL {url!r}: use postgresql://… or sqlite:PATH")
    return SQLite(Path(url))


# -- SQLite ------------------------------------------------------------------------------


class _SQLiteTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        try:
            return self._conn.execute(sql, args)
        except sqlite3.OperationalError as exc:
            raise _sqlite_error(exc) from exc
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise Duplicate(str(exc)) from exc
            raise

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise _sqlite_error(exc) from exc


def _sqlite_error(exc: sqlite3.OperationalError) -> Exception:
    if "locked" in str(exc) or "busy" in str(exc):
        return Retry(str(exc))
    return exc


class SQLite(Database):
    """One SQLite file in WAL mode: one connection, one call at a time.

    Several processes on one host may share the file (``karma8 api --workers``): a write
    transaction begins with ``BEGIN IMMEDIATE`` and waits up to ``busy_timeout`` for
    another process's to end.
    """

    name = "sqlite"
    now = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the client hears of it (NORMAL could lose the
        # last commits to a power cut, and reconciliation would then delete their data).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._tx = _SQLiteTx(self._conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._tx.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._tx.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._lock:
            yield self._tx

    def lock(self, tx: Tx, key: str) -> None:
        """Nothing to do: a write transaction (``BEGIN IMMEDIATE``) already excludes every other."""

    def group_concat(self, expr: str) -> str:
        return f"group_concat({expr})"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def describe(self) -> str:
        return f"sqlite:{self.path}"


# -- PostgreSQL --------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The registry's ``?`` placeholders as psycopg's ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        import psycopg

        try:
            return self._conn.execute(_pg_sql(sql), args)  # type: ignore[no-any-return]
        except psycopg.errors.UniqueViolation as exc:
            raise Duplicate(str(exc)) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), rows)


class Postgres(Database):
    """PostgreSQL through psycopg 3: a pool of connections, each call on its own.

    Transactions run at READ COMMITTED; the registry locks what it reads to change
    (``FOR UPDATE``, :meth:`lock`), and a transaction that still loses a race (deadlock,
    serialization failure) raises :class:`Retry`. A database that cannot be reached
    raises :class:`RegistryUnavailable`; the pool reconnects when it is back.
    """

    name = "postgresql"
    now = "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"
    for_update = " FOR UPDATE"

    def __init__(self, url: str, size: int = 8, timeout: float = 5.0) -> None:
        import psycopg
        import psycopg_pool

        self._errors = psycopg.errors
        self._psycopg = psycopg
        self.concurrency = size
        self.url = url
        self._timeout = timeout
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=size,
            kwargs={"autocommit": True},
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=timeout,
            open=False,
            name="karma8-registry",
        )
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        import psycopg_pool

        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise RegistryUnavailable(f"registry {self.describe()} unreachable: {exc}") from None
        except (self._errors.SerializationFailure, self._errors.DeadlockDetected) as exc:
            raise Retry(str(exc)) from exc
        except self._psycopg.OperationalError as exc:
            raise RegistryUnavailable(f"registry {self.describe()}: {exc}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._connection() as conn, conn.transaction():
            yield _PgTx(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._connection() as conn:
            yield _PgTx(conn)

    def lock(self, tx: Tx, key: str) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,)).fetchone()

    def group_concat(self, expr: str) -> str:
        return f"string_agg(CAST({expr} AS TEXT), ',')"

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        where = f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"
        socket_dir = parse_qs(parts.query).get("host")  # a Unix socket's directory: no secret
        return where + (f"?host={socket_dir[0]}" if socket_dir else "")
