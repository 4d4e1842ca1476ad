"""A throwaway PostgreSQL cluster for tests: its own data directory, a Unix socket only.

The cluster lives in a temporary directory (data, socket and log), listens on no TCP
port and trades durability for speed (``fsync``, ``synchronous_commit`` and
``full_page_writes`` off). PostgreSQL refuses to run as root, so when the tests run as
root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

#: The database superuser that ``initdb`` creates (trust authentication, socket only).
SUPERUSER = "postgres"
#: The operating-system user that runs the server when the tests run as root.
OS_USER = "postgres"
#: Set to ``required`` (CI does) to fail instead of skipping when PostgreSQL is missing.
REQUIRED_ENV = "KARMA8_TEST_POSTGRES"

#: Appended to postgresql.conf. Tests only: a crash of the machine loses the cluster.
_SETTINGS = """
# karma8 tests
listen_addresses = ''
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
"""
#: How long pg_ctl waits for the server to start or stop (it polls by itself).
_PG_CTL_WAIT = 60
_LOG_TAIL_LINES = 30


class PostgresError(RuntimeError):
    """initdb or pg_ctl failed; the message holds their output and the server log's tail."""


def find_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, or None if PostgreSQL is not installed.

    Tries ``pg_config --bindir``, then Debian's ``/usr/lib/postgresql/<version>/bin``
    (newest first), then ``initdb`` on PATH.
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and _has_server(bindir):
            return bindir
    versions = sorted(
        (d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()),
        key=lambda d: int(d.parent.name),
        reverse=True,
    )
    for bindir in versions:
        if _has_server(bindir):
            return bindir
    initdb = shutil.which("initdb")
    if initdb is not None and _has_server(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


def _has_server(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def postgres_available() -> bool:
    """Whether a cluster can be started here: the binaries, and ``runuser`` plus the
    ``postgres`` user when running as root."""
    if find_bindir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return False
    return shutil.which("runuser") is not None


def require_postgres() -> None:
    """Skip the calling test if PostgreSQL is missing, or fail if ``KARMA8_TEST_POSTGRES=required``."""
    if postgres_available():
        return
    message = (
        "PostgreSQL is not installed (no initdb/pg_ctl found via pg_config, /usr/lib/postgresql/*/bin "
        "or PATH; as root, runuser and the postgres user are needed too): "
        "install Debian's postgresql package"
    )
    if os.environ.get(REQUIRED_ENV) == "required":
        pytest.fail(f"{message}; {REQUIRED_ENV}=required", pytrace=False)
    pytest.skip(message)


class PostgresCluster:
    """A PostgreSQL server on a fresh data directory in a temporary directory.

    Use as a context manager, or call :meth:`start` and then always :meth:`stop`.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir if bindir is not None else find_bindir()
        if found is None:
            raise PostgresError("PostgreSQL is not installed (no initdb found)")
        self._bindir = found
        self._dir: Path | None = None

    @property
    def directory(self) -> Path:
        """The temporary directory: ``data/``, the socket and ``postgres.log``."""
        if self._dir is None:
            raise PostgresError("the cluster is not started")
        return self._dir

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's Unix socket."""
        return self.directory

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` maintenance database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """A libpq/psycopg URL for ``database`` over the Unix socket."""
        return (
            f"postgresql://{SUPERUSER}@/{quote(database, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}"
        )

    def start(self) -> None:
        """Create the temporary directory, run initdb and start the server."""
        if self._dir is not None:
            raise PostgresError("the cluster is already started")
        self._dir = Path(tempfile.mkdtemp(prefix="karma8-pg-"))
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(OS_USER)
                os.chown(self._dir, user.pw_uid, user.pw_gid)
            self._pg(
                "initdb",
                "--pgdata",
                str(self._data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            )
            with (self._data / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(_SETTINGS.format(socket_dir=self._dir))
            self.start_server()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``) and delete the temporary directory."""
        if self._dir is None:
            return
        try:
            if self.running:
                self._pg_ctl("stop", "--mode", "immediate")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def running(self) -> bool:
        """Whether a server holds the data directory (its ``postmaster.pid`` exists)."""
        return self._dir is not None and (self._data / "postmaster.pid").exists()

    def start_server(self) -> None:
        """Start the server on the existing data directory; returns once it accepts connections."""
        self._pg_ctl("start", "--log", str(self.log_path))

    def stop_server(self) -> None:
        """Stop the server (``-m fast``: open sessions are ended); the data directory stays."""
        self._pg_ctl("stop", "--mode", "fast")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def _data(self) -> Path:
        return self.directory / "data"

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._pg(
            "pg_ctl", action, "--pgdata", str(self._data), "--wait", "--timeout", str(_PG_CTL_WAIT), *args
        )

    def _pg(self, program: str, *args: str) -> None:
        command = [str(self._bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        # cwd: the postgres user may not be allowed into the tests' working directory.
        result = subprocess.run(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=_PG_CTL_WAIT + 30,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{program} {' '.join(args[:1])} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"--- {self.log_path} (last {_LOG_TAIL_LINES} lines) ---\n{tail}\n"
