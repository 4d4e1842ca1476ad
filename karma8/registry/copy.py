"""Copy a whole registry into an empty one: SQLite to PostgreSQL, or back.

For moving a stopped installation (``karma8 registry copy``). Both registries are
opened with :class:`~karma8.registry.db.RegistryDB`, so both are at this release's
schema version. The tables are found at run time (a later schema version's tables are
copied without a change here), in foreign-key order: a parent's rows before the rows
that reference it, since both databases check a reference when the row is inserted.

The source is read in one snapshot, a batch of rows at a time (memory does not grow
with the registry: SQLite's cursor steps through the rows, PostgreSQL's is a server-side
cursor), and the destination is written in one transaction, checked (row counts) before
it commits: a copy that fails leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import graphlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from karma8.errors import Karma8Error
from karma8.registry.database import Database, Tx
from karma8.registry.db import RegistryDB

log = logging.getLogger(__name__)

#: Rows per batch (one ``executemany`` into the destination).
BATCH = 10_000
#: Not copied: each registry keeps its own version (both are at this release's).
SKIPPED = frozenset({"schema_version"})
#: Parents first when foreign keys leave the order open (then by name): an ordering
#: hint only; the order that matters comes from the destination's foreign keys.
HINT = ("buckets", "uploads")


class CopyError(Karma8Error):
    """The copy was refused or did not check out; the destination is unchanged unless
    the message says otherwise."""

    code = "copy"


@dataclass(frozen=True, slots=True)
class Copied:
    """One table copied."""

    table: str
    rows: int
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CopyReport:
    """A finished, checked copy."""

    tables: tuple[Copied, ...]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


def copy_registry(
    src: RegistryDB,
    dst: RegistryDB,
    batch: int = BATCH,
    on_table: Callable[[Copied], None] | None = None,
) -> CopyReport:
    """Copy every row of ``src`` into ``dst``, which must be empty.

    Tables present in both (but ``schema_version``) are copied, with the destination's
    columns that the source also has. ``on_table`` hears of each table once its rows are
    written (not yet committed).

    Raises:
        CopyError: ``dst`` is not empty, ``src``'s ledger drifts from its fragment rows,
            the foreign keys form a cycle, or the copy does not check out (the
            destination's transaction is then rolled back).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    started = time.monotonic()
    drift = src.ledger_drift()
    if src.stored_drift() != (0, 0):
        raise CopyError(
            f"the file counter of {src.database.describe()} is off its files rows; see karma8 registry check"
        )
    if drift:
        raise CopyError(
            f"the ledger of {src.database.describe()} drifts from its fragment rows on"
            f" {len(drift)} bucket(s); see karma8 registry check"
        )
    done: list[Copied] = []
    with _snapshot(src.database) as rtx, dst.database.transaction() as wtx:
        src_tables = set(tables(src.database, rtx))
        dst_tables = set(tables(dst.database, wtx))
        common = (src_tables & dst_tables) - SKIPPED
        order = fk_order(common, parents(dst.database, wtx))
        occupied = {t: n for t in order if (n := count(wtx, t))}
        if occupied:
            rows = ", ".join(f"{n} in {t}" for t, n in occupied.items())
            raise CopyError(f"destination {dst.database.describe()} is not empty ({rows}); nothing copied")
        for table in order:
            have = set(columns(src.database, rtx, table))
            cols = tuple(c for c in columns(dst.database, wtx, table) if c in have)
            copied = _copy_table(src.database, rtx, wtx, table, cols, batch)
            expected, written = count(rtx, table), count(wtx, table)
            if not copied == expected == written:
                raise CopyError(
                    f"table {table}: {expected} rows in the source, {copied} read, {written} written;"
                    " nothing copied"
                )
            done.append(Copied(table, copied, cols))
            log.info("copied %d rows of %s", copied, table)
            if on_table is not None:
                on_table(done[-1])
    drift = dst.ledger_drift()
    if dst.stored_drift() != (0, 0):  # copied from an exact source: not expected
        raise CopyError(
            f"copied, but the file counter of {dst.database.describe()} is off its files rows;"
            " empty the destination before using it"
        )
    if drift:  # the rows are the source's, whose ledger was exact: not expected
        raise CopyError(
            f"copied, but the ledger of {dst.database.describe()} drifts on {len(drift)} bucket(s);"
            " empty the destination before using it"
        )
    return CopyReport(tuple(done), time.monotonic() - started)


@contextlib.contextmanager
def _snapshot(db: Database) -> Iterator[Tx]:
    """Reads that all see the database at one moment."""
    if db.name == "sqlite":
        with db.read() as tx:
            tx.execute("BEGIN")  # deferred: a read snapshot, no write lock
            try:
                yield tx
            finally:
                tx.execute("ROLLBACK")
    else:
        with db.transaction() as tx:
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield tx


def _copy_table(src: Database, rtx: Tx, wtx: Tx, table: str, cols: Sequence[str], batch: int) -> int:
    names = ", ".join(_quote(c) for c in cols)
    select = f"SELECT {names} FROM {_quote(table)}"
    insert = f"INSERT INTO {_quote(table)} ({names}) VALUES ({', '.join('?' * len(cols))})"
    copied = 0
    for rows in _batches(src, rtx, select, batch):
        wtx.executemany(insert, rows)
        copied += len(rows)
    return copied


def _batches(db: Database, tx: Tx, select: str, size: int) -> Iterator[list[tuple[object, ...]]]:
    """The rows of ``select``, ``size`` at a time."""
    if db.name == "sqlite":  # the cursor steps through the table as it is read
        cursor = iter(tx.execute(select))
        while rows := [tuple(r) for r in itertools.islice(cursor, size)]:
            yield rows
        return
    # psycopg's ordinary cursor holds the whole result in memory; a server-side one does not.
    # (A failure ends the transaction, which closes the cursor.)
    tx.execute(f"DECLARE karma8_copy NO SCROLL CURSOR FOR {select}")
    while rows := [tuple(r) for r in tx.execute(f"FETCH FORWARD {size} FROM karma8_copy").fetchall()]:
        yield rows
    tx.execute("CLOSE karma8_copy")


def tables(db: Database, tx: Tx) -> list[str]:
    """The registry's tables (SQLite's own excepted), by name."""
    if db.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_'"
    else:
        sql = (
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
    return sorted(str(name) for (name,) in tx.execute(sql))


def columns(db: Database, tx: Tx, table: str) -> list[str]:
    """The columns of ``table``, in the table's order."""
    if db.name == "sqlite":
        rows = tx.execute("SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))
    else:
        rows = tx.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
    return [str(name) for (name,) in rows]


def parents(db: Database, tx: Tx) -> dict[str, set[str]]:
    """Table -> the tables its foreign keys reference."""
    if db.name == "sqlite":
        pairs = tx.execute(
            'SELECT m.name, f."table" FROM sqlite_master m, pragma_foreign_key_list(m.name) f'
            " WHERE m.type = 'table'"
        )
    else:
        pairs = tx.execute(
            "SELECT k.relname, p.relname FROM pg_constraint c"
            " JOIN pg_class k ON k.oid = c.conrelid JOIN pg_class p ON p.oid = c.confrelid"
            " JOIN pg_namespace n ON n.oid = c.connamespace"
            " WHERE c.contype = 'f' AND n.nspname = current_schema()"
        )
    out: dict[str, set[str]] = {}
    for child, parent in pairs:
        out.setdefault(str(child), set()).add(str(parent))
    return out


def fk_order(names: set[str], references: Mapping[str, set[str]]) -> list[str]:
    """``names`` with every table after the tables it references (then :data:`HINT`, then
    by name).

    Raises:
        CopyError: the foreign keys form a cycle.
    """
    graph = {t: (references.get(t, set()) & names) - {t} for t in names}
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise CopyError(f"the registry's foreign keys form a cycle: {exc.args[1]}") from None
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda t: (HINT.index(t) if t in HINT else len(HINT), t))
        order.extend(ready)
        sorter.done(*ready)
    return order


def count(tx: Tx, table: str) -> int:
    """Rows in ``table``."""
    return int(tx.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
