"""``karma8 registry``: migrate, copy and check a registry database, no server needed.

A registry is named by a URL (``postgresql://…``, ``sqlite:PATH`` or a plain path) or,
without ``--registry``, is the API server's (its config file and ``KARMA8_API_*``
variables: ``registry_url``, else ``data_dir/registry.sqlite3``). Output never shows a
password. Errors are one line on stderr and exit status 1, as for every command.

Like the rest of the CLI, the registry's modules are imported by the commands that use
them, so ``karma8 --help`` stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote

import typer

if TYPE_CHECKING:
    from karma8.registry.database import Database
    from karma8.registry.db import RegistryDB

registry_app = typer.Typer(
    help="Migrate, copy and check a registry database (SQLite or PostgreSQL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="postgresql://USER:PASSWORD@HOST/DB or sqlite:PATH (default: the API server's registry).",
    ),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (its [api]).")]


@contextmanager
def _errors() -> Iterator[None]:
    """The CLI's one-line errors, and the registry's own failures as plain sentences."""
    import sqlite3

    import psycopg

    from karma8.cli import _errors_as_one_line, fail
    from karma8.errors import Internal, RegistryUnavailable
    from karma8.registry.copy import CopyError
    from karma8.registry.database import Retry

    with _errors_as_one_line():
        try:
            yield
        except (Internal, RegistryUnavailable, CopyError) as exc:  # Internal: a newer schema
            fail(exc.message)
        except Retry as exc:
            fail(f"registry busy ({exc}): stop every API server using it and try again")
        except sqlite3.OperationalError as exc:  # unreadable, read-only, ...
            fail(f"sqlite: {exc}")
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # integrity, programming: a bug
                raise
            fail(f"sqlite: {exc}")  # "file is not a database"
        except psycopg.OperationalError as exc:  # the server went away
            fail(f"postgresql: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _api_registry(registry: str | None, config: Path | None) -> str:
    """``--registry``, or the API server's registry."""
    if registry:
        return registry
    from karma8.config import ApiConfig, load

    return load(ApiConfig, config).registry


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite registry (None for PostgreSQL), read as ``open_database`` does."""
    if url.startswith("sqlite:"):
        return Path(unquote(url.removeprefix("sqlite:").removeprefix("//")))
    return None if "://" in url else Path(url)


def _connect(url: str, *, existing: bool) -> Database:
    """Open the database at ``url``, failing with one line if it cannot be reached, or,
    with ``existing``, if it holds no registry (a missing SQLite file is not created)."""
    import sqlite3

    import psycopg

    from karma8.cli import fail
    from karma8.registry import schema
    from karma8.registry.database import Postgres, open_database

    path = _sqlite_file(url)
    if existing and path is not None and not path.exists():
        fail(f"no registry at {path}")
    # The pool retries in the background, logging each failure; one probe below says why.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        db = open_database(url)
    except sqlite3.DatabaseError as exc:  # not a database, unreadable
        fail(f"registry {path}: {exc}")
    if isinstance(db, Postgres):
        try:
            psycopg.connect(db.url, connect_timeout=10).close()
        except psycopg.Error as exc:
            db.close()
            fail(f"registry {db.describe()} unreachable: {_first_line(exc)}")
    if existing:
        with db.read() as tx:
            found = schema.version(db, tx)
        if found == 0:
            db.close()
            fail(f"registry {db.describe()} is empty (no registry schema)")
    return db


def _open(url: str, *, existing: bool) -> RegistryDB:
    """Open (migrating it to this release's schema) the registry at ``url``."""
    from karma8.registry import retrying
    from karma8.registry.db import RegistryDB

    db = _connect(url, existing=existing)
    try:
        return retrying(RegistryDB, db)
    except BaseException:
        db.close()
        raise


@registry_app.command()
def migrate(registry: RegistryOpt = None, config: ConfigOpt = None) -> None:
    """Bring a registry's schema to this release's version (a new one is created).

    The API server does this too when it opens the registry; this command does it ahead
    of time (before starting several servers on a new release, say). A registry written
    by a newer release is refused.
    """
    with _errors():
        from karma8.registry import retrying, schema

        db = _connect(_api_registry(registry, config), existing=False)
        try:

            def run() -> tuple[int, int]:
                with db.transaction() as tx:
                    return schema.migrate(db, tx)

            found, now = retrying(run)
        finally:
            db.close()
        typer.echo(f"registry {db.describe()} at schema version {now} (was {found})")


@registry_app.command()
def copy(
    source: Annotated[str, typer.Option("--from", help="The registry to copy (URL or SQLite path).")],
    destination: Annotated[
        str, typer.Option("--to", help="An empty registry to copy it into (created if needed).")
    ],
    batch: Annotated[int, typer.Option(min=1, help="Rows per insert.")] = 10_000,
) -> None:
    """Copy a whole registry into an empty one (SQLite to PostgreSQL, or back).

    Stop every API server first. Both registries are brought to this release's schema;
    the destination must be empty. The rows are written in one transaction and checked
    (row counts per table, the ledger of placed bytes) before it commits: a failed copy
    leaves the destination as it was.
    """
    from karma8.registry.copy import Copied, copy_registry

    with _errors():
        src = _open(source, existing=True)
        try:
            dst = _open(destination, existing=False)
            try:
                header = f"copying registry {src.database.describe()} -> {dst.database.describe()}"

                def show(table: Copied) -> None:
                    nonlocal header
                    if header:  # once the first table is in: a refused copy prints nothing
                        typer.echo(header)
                        header = ""
                    typer.echo(f"  {table.table:<16}{table.rows:>12} rows")

                report = copy_registry(src, dst, batch, on_table=show)
            finally:
                dst.close()
        finally:
            src.close()
        typer.echo(
            f"copied {report.rows} rows in {len(report.tables)} tables in {report.seconds:.2f} s;"
            " row counts equal, ledger exact"
        )


@registry_app.command()
def check(registry: RegistryOpt = None, config: ConfigOpt = None) -> None:
    """Check a registry: schema version, counts, and the ledger (exit status 1 if it drifts).

    Shows the files, the uploads and fragments by state, and checks the ledger of placed
    bytes against the fragment rows it sums. Run it with the API servers stopped, or again
    if it reports a drift: on a busy registry the ledger and the rows are read at two
    moments.
    """
    from karma8.cli import fail
    from karma8.registry import retrying, schema
    from karma8.registry.db import RegistryDB

    with _errors():
        db = _connect(_api_registry(registry, config), existing=True)
        try:
            with db.read() as tx:
                found = schema.version(db, tx)
            if found != schema.VERSION:
                newer = found > schema.VERSION
                fail(
                    f"registry {db.describe()} has schema version {found}, "
                    + ("newer than this release's: upgrade karma8" if newer else "older than this release's")
                    + f" ({schema.VERSION})"
                    + ("" if newer else ": run karma8 registry migrate")
                )
            reg = retrying(RegistryDB, db)  # at this release's version: nothing changes
            with db.read() as tx:
                files = int(tx.execute("SELECT COUNT(*) FROM files").fetchone()[0])
                uploads = dict(tx.execute("SELECT state, COUNT(*) FROM uploads GROUP BY state").fetchall())
                fragments = dict(
                    tx.execute("SELECT state, COUNT(*) FROM fragments GROUP BY state").fetchall()
                )
            drift = reg.ledger_drift()
            stored_drift = reg.stored_drift()
        finally:
            db.close()
        typer.echo(f"registry {db.describe()} at schema version {found}")
        typer.echo(f"files: {files}")
        typer.echo(f"uploads: {sum(uploads.values())}{_by_state(uploads)}")
        typer.echo(f"fragments: {sum(fragments.values())}{_by_state(fragments)}")
        if stored_drift == (0, 0):
            typer.echo("file counter: exact")
        else:
            off_files, off_bytes = stored_drift
            typer.echo(f"file counter: {off_files:+d} files, {off_bytes:+d} bytes off the files rows")
        if not drift:
            typer.echo("ledger: exact")
        else:
            typer.echo(f"ledger: drifts on {len(drift)} bucket(s) (the ledger minus the fragment rows):")
            for bucket, (size, count) in sorted(drift.items()):
                typer.echo(f"  {bucket}: {size:+d} bytes, {count:+d} fragments")
            fail(f"the ledger of placed bytes drifts from the fragment rows on {len(drift)} bucket(s)")
        if stored_drift != (0, 0):
            fail("the counter of stored files drifts from the files rows")


def _by_state(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) + ")"
