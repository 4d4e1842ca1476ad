"""The local stack (``karma8 up``): an API server and N buckets as child processes.

The API server runs as one worker process per core (``karma8 api --workers``, see
karma8/workers.py) on SQLite in ``DATA/api``, or on an existing PostgreSQL (``registry``).

Each child is the ordinary ``karma8 api`` / ``karma8 bucket`` command with its own data
directory under one root. The supervisor waits until every bucket is live and reports
where the API listens. A child that exits is restarted after a delay that doubles while
it keeps exiting (compose's ``restart: unless-stopped``); the others keep running. The
stack stops on cancellation (Ctrl-C, SIGTERM), stopping the children with SIGTERM, then
SIGKILL after ``stop_timeout``, or when a child fails to start ``start_failures`` times
in a row.

The API server and the buckets share a secret, generated at the first start and kept in
``<data>/secret`` (mode 0600) so restarts reuse it. Children get it in their environment,
never on their command line (which ``ps`` shows to every user).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from karma8.client import Client
from karma8.config import ApiConfig, ClientConfig, StackConfig, load
from karma8.core.auth import CREDENTIAL
from karma8.errors import Karma8Error

log = logging.getLogger(__name__)

POLL = 0.05

#: The shared bucket secret of a stack, under its data directory.
SECRET_FILE = "secret"


class StackError(Karma8Error):
    """The local stack could not start or lost a process."""

    code = "stack"


def stack_secret(data: Path) -> str:
    """The stack's bucket secret: read ``data/secret``, or create it (mode 0600) once.

    Raises:
        StackError: the file is readable by other users or does not hold a valid secret.
    """
    path = data / SECRET_FILE
    if not path.exists():
        # Written under a unique name, then linked into place: a concurrent start reads
        # either no file or a complete one, and the first link wins.
        tmp = data / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                log.info("generated the stack's bucket secret in %s", path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StackError(f"{path} is accessible to other users (mode {mode:o}); chmod 600 it")
    secret = path.read_text().strip()
    if not CREDENTIAL.fullmatch(secret):
        raise StackError(f"{path} does not hold a valid secret; delete it to generate a new one")
    return secret


@dataclass(frozen=True, slots=True)
class StackInfo:
    """A running local stack."""

    url: str
    data: Path
    buckets: int
    #: The API server's /metrics (None: its metrics port was taken).
    metrics_url: str | None = None


async def _wait_ready(path: Path, proc: trio.Process, what: str) -> dict[str, object]:
    """Poll for a child's ready file (the child exiting first is an error)."""
    while True:
        if proc.returncode is not None:
            raise StackError(f"{what} exited with status {proc.returncode} while starting")
        try:
            info: dict[str, object] = json.loads(await trio.Path(path).read_text())
        except FileNotFoundError:
            await trio.sleep(POLL)
            continue
        return info


async def stop_process(proc: trio.Process, sig: int, kill_after: float) -> bool:
    """Send ``sig``; SIGKILL after ``kill_after`` s if still running (shielded).

    Returns True when the process had to be killed.
    """
    killed = False
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(sig)
        with trio.move_on_after(kill_after):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            killed = True
    return killed


@dataclass
class Child:
    """One process of the stack, as the supervisor restarts it."""

    name: str
    args: list[str]
    ready: Path
    proc: trio.Process | None = None
    #: Ready-file contents of the last start.
    info: dict[str, object] = field(default_factory=dict)
    restarts: int = 0


class Supervisor:
    """Starts children, restarts those that exit, and stops them all when done."""

    def __init__(
        self,
        config: StackConfig,
        log_level: str,
        config_file: Path | None,
        env: dict[str, str],
        log_format: str = "text",
    ) -> None:
        self._config = config
        self._log_level = log_level
        self._log_format = log_format
        self._env = env
        # Children read their own [api] / [bucket] tables from the same file.
        self._config_args = ["--config", str(config_file.absolute())] if config_file else []
        self.children: list[Child] = []

    async def start(self, child: Child) -> dict[str, object]:
        """Start ``child`` and wait for its ready file (it exiting first is an error)."""
        if child not in self.children:
            self.children.append(child)
        await trio.Path(child.ready).unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "karma8",
            *child.args,
            *self._config_args,
            "--ready-file",
            str(child.ready),
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
        ]
        child.proc = await trio.lowlevel.open_process(cmd, env=self._env)
        child.info = await _wait_ready(child.ready, child.proc, child.name)
        log.debug("%s started (pid %d): %s", child.name, child.proc.pid, child.info)
        return child.info

    async def keep(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, with a growing delay, like compose's
        ``restart: unless-stopped``.

        Raises:
            StackError: it failed to start ``start_failures`` times in a row.
        """
        config = self._config
        failures = 0
        delay = 0.5
        while True:
            assert child.proc is not None
            started = trio.current_time()
            await child.proc.wait()
            if trio.current_time() - started > 2 * config.restart_delay_max:
                delay = 0.5  # it ran a good while: this is a new crash, not a crash loop
            log.error(
                "%s (pid %d) exited with status %s; restarting it in %.1f s",
                child.name,
                child.proc.pid,
                child.proc.returncode,
                delay,
            )
            while True:
                await trio.sleep(delay)
                delay = min(delay * 2, config.restart_delay_max)
                try:
                    with trio.fail_after(config.start_timeout):
                        await self.start(child)
                except (StackError, trio.TooSlowError) as exc:
                    failures += 1
                    if child.proc is not None and child.proc.returncode is None:
                        await stop_process(child.proc, signal.SIGKILL, config.stop_timeout)
                    if failures >= config.start_failures:
                        raise StackError(
                            f"{child.name} failed to start {failures} times in a row; stopping the stack"
                        ) from None
                    log.error("%s did not start (%s); trying again in %.1f s", child.name, exc, delay)
                    continue
                failures = 0
                child.restarts += 1
                log.warning("%s restarted (pid %d)", child.name, child.proc.pid if child.proc else -1)
                break

    async def stop(self) -> None:
        """SIGTERM every child, SIGKILL those still running after the deadline."""

        async def one(child: Child) -> None:
            if child.proc is None:
                return
            if await stop_process(child.proc, signal.SIGTERM, self._config.stop_timeout):
                log.warning("%s (pid %d) did not stop in time; killed it", child.name, child.proc.pid)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for child in self.children:
                    nursery.start_soon(one, child)


async def run_stack(
    config: StackConfig,
    log_level: str = "info",
    config_file: Path | None = None,
    log_format: str = "text",
    *,
    task_status: trio.TaskStatus[StackInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the local stack until cancelled; ``started()`` once every bucket is live.

    A child that exits is restarted (see :meth:`Supervisor.keep`); the stack stops only
    when cancelled or when a child keeps failing to start. Internal ports (membership,
    metrics) are picked free unless configured, and kept across restarts; every bucket
    gets free ports, so that several stacks run side by side.
    """
    data = config.data.absolute()
    data.mkdir(parents=True, exist_ok=True)
    secret = await trio.to_thread.run_sync(stack_secret, data)
    env = {**os.environ, "KARMA8_API_BUCKET_SECRET": secret, "KARMA8_BUCKET_SECRET": secret}
    if registry := config.registry.get_secret_value():
        env["KARMA8_API_REGISTRY_URL"] = registry  # in the environment: ps shows command lines
    # What the API child reads besides the options given below: its token and TLS.
    api_config = load(ApiConfig, config_file)
    sup = Supervisor(config, log_level, config_file, env, log_format)
    try:
        with trio.fail_after(config.start_timeout):
            api = Child(
                "api",
                _api_args(data, config.port, config.membership_port, config.metrics_port, config.workers),
                data / "api.ready",
            )
            info = await sup.start(api)
            # A restarted API server must come back where the buckets and clients look.
            ports = int(str(info["port"])), int(str(info["membership_port"]))
            metrics = info.get("metrics_port")
            api.args = _api_args(
                data,
                *ports,
                int(str(metrics)) if metrics is not None else config.metrics_port,
                config.workers,
            )
            buckets = [
                Child(
                    f"bucket-{i}",
                    [
                        "bucket",
                        "--data-dir",
                        str(data / f"bucket-{i}"),
                        "--port",
                        "0",
                        "--metrics-port",
                        "0",
                        "--api",
                        f"127.0.0.1:{ports[1]}",
                    ],
                    data / f"bucket-{i}.ready",
                )
                for i in range(1, config.buckets + 1)
            ]
            async with trio.open_nursery() as starting:
                for child in buckets:
                    starting.start_soon(sup.start, child)
            url = f"{'wss' if api_config.tls_cert else 'ws'}://127.0.0.1:{ports[0]}"
            token = api_config.client_token.get_secret_value()
            client = Client(load(ClientConfig, config_file, api=url, token=token or None))
            # Polling another process's state: there is no event to wait on.
            while (await client.status())["live"] < config.buckets:  # noqa: ASYNC110
                await trio.sleep(POLL)
            if config.workers > 1:
                # That worker saw every bucket; each other worker takes the beats in from
                # the registry within a heartbeat interval (karma8/api/cluster.py: sync).
                await trio.sleep(api_config.heartbeat_interval + 0.5)
        metrics_url = f"http://{api_config.metrics_host}:{metrics}/metrics" if metrics is not None else None
        task_status.started(StackInfo(url, data, config.buckets, metrics_url))
        async with trio.open_nursery() as nursery:
            for child in sup.children:
                nursery.start_soon(sup.keep, child)
    except trio.TooSlowError:
        raise StackError(f"the local stack did not start within {config.start_timeout:g} s") from None
    except BaseExceptionGroup as group:
        stack_errors, rest = group.split(StackError)
        if stack_errors is not None and rest is None:
            raise stack_errors.exceptions[0] from None
        raise
    finally:
        await sup.stop()


def _api_args(data: Path, port: int, membership_port: int, metrics_port: int, workers: int) -> list[str]:
    return [
        "api",
        "--workers",
        str(workers),
        "--data-dir",
        str(data / "api"),
        "--port",
        str(port),
        "--membership-port",
        str(membership_port),
        "--metrics-port",
        str(metrics_port),
    ]
