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
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from karma8.errors import ConfigError, RegistryUnavailable

log = logging.getLogger(__name__)


#: Write transactions one SQLite commit may hold (see :class:`SQLite`).
GROUP_MAX = 64


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
    """One SQLite file in WAL mode: one writing connection with group commit, and a few
    reading connections beside it (WAL lets readers run while a transaction writes).

    **Group commit.** Write transactions take turns on the writing connection. Each runs
    inside a savepoint of one ``BEGIN IMMEDIATE`` transaction that stays open while other
    threads are waiting for their turn (up to ``group`` transactions): the last one of the
    group commits for all, one fsync of the WAL for the group, and every member returns
    only once that commit is on disk (a failed commit fails every member). A transaction
    that raises rolls back to its savepoint: the others of its group are not touched.

    Several processes on one host may share the file (``karma8 api --workers``): a group
    begins with ``BEGIN IMMEDIATE`` and waits up to ``busy_timeout`` for another
    process's to end.
    """

    name = "sqlite"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    #: Threads of the async facade: writers queue for the group, readers read meanwhile.
    concurrency = 4

    def __init__(self, path: Path, group: int = GROUP_MAX, readers: int = 3) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._tx = _SQLiteTx(self._conn)
        self._group_max = max(1, group)
        #: Held by the transaction whose body runs on the writing connection.
        self._turn = threading.Lock()
        #: Guards the group's state below; waited on for a group's commit.
        self._state = threading.Condition()
        self._wanting = 0  # threads waiting for the turn
        self._open = False  # BEGIN IMMEDIATE done, COMMIT not yet
        self._members = 0  # transactions done in the open group
        self._generation = 0  # groups ended so far
        self._failures: dict[int, BaseException] = {}  # recent groups that failed to commit
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        #: An in-memory database (simulations) is one connection: reads take the turn.
        self._all_readers = 0 if str(path) == ":memory:" else readers
        for _ in range(self._all_readers):
            self._readers.put(self._connect())

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # FULL: a commit is on disk before the client hears of it (NORMAL could lose the
        # last commits to a power cut, and reconciliation would then delete their data).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._state:
            self._wanting += 1
        self._turn.acquire()
        with self._state:
            self._wanting -= 1
            generation = self._generation
        try:
            if not self._open:
                self._tx.execute("BEGIN IMMEDIATE")
                self._open = True
            self._conn.execute("SAVEPOINT k8")
        except BaseException:
            if self._open:  # joining failed: the group goes on (or commits) without this one
                self._leave(generation, member=False)
            else:  # BEGIN failed (busy: another process writes): nothing is open
                self._turn.release()
            raise
        try:
            yield self._tx
        except BaseException:
            self._conn.execute("ROLLBACK TO k8")
            self._conn.execute("RELEASE k8")
            self._leave(generation, member=False)
            raise
        self._conn.execute("RELEASE k8")
        self._members += 1
        self._leave(generation, member=True)

    def _leave(self, generation: int, member: bool) -> None:
        """After a transaction's body: hand the open group to a waiting thread, or commit it.

        Raises:
            BaseException: a member's group failed to commit.
        """
        with self._state:
            if self._wanting and self._members < self._group_max:
                self._turn.release()  # the next one runs its body in this group
                if not member:
                    return
                while self._generation == generation:
                    self._state.wait()
                failure = self._failures.get(generation)
                if failure is not None:
                    raise failure
                return
        error: BaseException | None = None
        try:
            self._tx.execute("COMMIT" if self._members else "ROLLBACK")
        except BaseException as exc:
            error = exc
        self._end_group(generation, error)
        if error is not None and member:
            raise error

    def _end_group(self, generation: int, error: BaseException | None) -> None:
        """The group is over (committed, or failed with ``error``): wake its members."""
        if error is not None and self._open:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        with self._state:
            self._open, self._members = False, 0
            if error is not None:
                self._failures[generation] = error
                for old in [g for g in self._failures if g < generation - 1000]:
                    del self._failures[old]  # its members have long read it
            self._generation += 1
            self._state.notify_all()
        self._turn.release()

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        if not self._all_readers:
            with self._turn:
                yield self._tx
            return
        conn = self._readers.get()
        try:
            yield _SQLiteTx(conn)
        finally:
            self._readers.put(conn)

    def lock(self, tx: Tx, key: str) -> None:
        """Nothing to do: a write transaction (``BEGIN IMMEDIATE``) already excludes every other."""

    def group_concat(self, expr: str) -> str:
        return f"group_concat({expr})"

    def close(self) -> None:
        with self._turn:
            self._conn.close()
        for _ in range(self._all_readers):
            self._readers.get().close()

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
