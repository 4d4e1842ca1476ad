"""The local stack (``karma8 up``): an API server and N buckets as child processes.

Each child is the ordinary ``karma8 api`` / ``karma8 bucket`` command with its own data
directory under one root. The supervisor waits until every bucket is live, reports where
the API listens, and on cancellation (Ctrl-C, SIGTERM) stops the children with SIGTERM,
then SIGKILL after ``stop_timeout``.

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
from dataclasses import dataclass
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


class Supervisor:
    """Starts children, and stops them all when done."""

    def __init__(
        self,
        log_level: str,
        stop_timeout: float,
        config_file: Path | None,
        env: dict[str, str],
        log_format: str = "text",
    ) -> None:
        self._log_level = log_level
        self._log_format = log_format
        self._env = env
        self._stop_timeout = stop_timeout
        # Children read their own [api] / [bucket] tables from the same file.
        self._config_args = ["--config", str(config_file.absolute())] if config_file else []
        self.children: list[tuple[str, trio.Process]] = []

    async def start(self, what: str, args: list[str], ready: Path) -> dict[str, object]:
        await trio.Path(ready).unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "karma8",
            *args,
            *self._config_args,
            "--ready-file",
            str(ready),
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
        ]
        proc = await trio.lowlevel.open_process(cmd, env=self._env)
        self.children.append((what, proc))
        info = await _wait_ready(ready, proc, what)
        log.debug("%s started (pid %d): %s", what, proc.pid, info)
        return info

    async def watch(self) -> None:
        """Return when any child exits on its own."""
        async with trio.open_nursery() as nursery:

            async def one(what: str, proc: trio.Process) -> None:
                await proc.wait()
                log.error("%s (pid %d) exited with status %s", what, proc.pid, proc.returncode)
                nursery.cancel_scope.cancel()

            for what, proc in self.children:
                nursery.start_soon(one, what, proc)

    async def stop(self) -> None:
        """SIGTERM every child, SIGKILL those still running after the deadline."""

        async def one(what: str, proc: trio.Process) -> None:
            if await stop_process(proc, signal.SIGTERM, self._stop_timeout):
                log.warning("%s (pid %d) did not stop in time; killed it", what, proc.pid)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for what, proc in self.children:
                    nursery.start_soon(one, what, proc)


async def run_stack(
    config: StackConfig,
    log_level: str = "info",
    config_file: Path | None = None,
    log_format: str = "text",
    *,
    task_status: trio.TaskStatus[StackInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the local stack until cancelled; ``started()`` once every bucket is live.

    The API server keeps its configured metrics port; every bucket gets a free one, so
    that the buckets of one host never collide.
    """
    data = config.data.absolute()
    data.mkdir(parents=True, exist_ok=True)
    secret = await trio.to_thread.run_sync(stack_secret, data)
    env = {**os.environ, "KARMA8_API_BUCKET_SECRET": secret, "KARMA8_BUCKET_SECRET": secret}
    # What the API child reads besides the options given below: its token and TLS.
    api_config = load(ApiConfig, config_file)
    sup = Supervisor(log_level, config.stop_timeout, config_file, env, log_format)
    try:
        with trio.fail_after(config.start_timeout):
            api = await sup.start(
                "api",
                [
                    "api",
                    "--data-dir",
                    str(data / "api"),
                    "--port",
                    str(config.port),
                    "--membership-port",
                    str(config.membership_port),
                ],
                data / "api.ready",
            )
            async with trio.open_nursery() as starting:
                for i in range(1, config.buckets + 1):
                    starting.start_soon(
                        sup.start,
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
                            f"127.0.0.1:{api['membership_port']}",
                        ],
                        data / f"bucket-{i}.ready",
                    )
            url = f"{'wss' if api_config.tls_cert else 'ws'}://127.0.0.1:{api['port']}"
            token = api_config.client_token.get_secret_value()
            client = Client(load(ClientConfig, config_file, api=url, token=token or None))
            # Polling another process's state: there is no event to wait on.
            while (await client.status())["live"] < config.buckets:  # noqa: ASYNC110
                await trio.sleep(POLL)
        metrics = api.get("metrics_port")
        metrics_url = f"http://{api_config.metrics_host}:{metrics}/metrics" if metrics is not None else None
        info = StackInfo(url, data, config.buckets, metrics_url)
        task_status.started(info)
        await sup.watch()
        raise StackError("a process of the local stack exited; stopping the stack")
    except trio.TooSlowError:
        raise StackError(f"the local stack did not start within {config.start_timeout:g} s") from None
    finally:
        await sup.stop()
