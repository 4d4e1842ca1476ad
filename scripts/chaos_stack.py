"""The processes of a chaos run: one or more ``karma8 api`` and N ``karma8 bucket``, each
killed and restarted at will (unlike ``karma8 up``, whose supervisor stops everything when a
child dies).

Each API server keeps fixed ports and its server id across restarts, so buckets find it
again and clients keep its URL. Several API servers share one registry (a SQLite file, or
the PostgreSQL database given); buckets list every server's membership endpoint, and the
traffic goes to the running servers in turn, as a load balancer that checks health would
send it. Each process logs to ``<data>/logs/<name>.log`` (appended across restarts).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from bench_procs import log_tail
from chaos_model import ChaosError

from karma8.client import Client
from karma8.config import ApiConfig, BucketConfig, ClientConfig
from karma8.errors import Karma8Error
from karma8.stack import stop_process

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
POLL = 0.05

#: Fast membership, as in the integration tests, so deaths and returns show in seconds.
FAST_API = {
    "heartbeat_interval": "0.2",
    "bucket_timeout": "1.5",
    "janitor_interval": "0.3",
}
#: Several API servers: a killed one is declared dead by the others after 5 s (its uploads
#: reaped) and its job leases pass to another server within 3 s. A bucket's beat reaches
#: the other servers through the registry (one more hop, on 2 shared cores under load):
#: buckets count as gone after 3 s rather than 1.5 s.
SHARED_API = {"server_timeout": "5.0", "job_lease": "3.0"}
SHARED_FAST_API = {"bucket_timeout": "3.0"}
#: Reconciliation and rebalancing, when this karma8 has them: frequent rounds, a short
#: orphan grace, rebalancing soon after a killed bucket returns (it missed uploads).
RECONCILE_API = {
    "reconcile_interval": "1.0",
    "orphan_grace": "3.0",
    "rebalance_delay": "1.0",
    "rebalance_interval": "5.0",
}
#: Repair, when this karma8 has it: a bucket gone for 4 s is lost (a killed bucket comes
#: back sooner), and the queue is looked at twice a second.
REPAIR_API = {"repair_after": "4.0", "repair_interval": "0.5"}
#: Buckets retry registration quickly while the API is restarting.
FAST_BUCKET = {"retry_max": "0.5"}


def free_port() -> int:
    """A port that was free a moment ago (for servers that must keep their port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def karma8_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "karma8", *args]


def child_env() -> tuple[dict[str, str], list[str]]:
    """The environment of every child, and notes on the optional settings it uses.

    Settings other developers may not have added yet (reconciliation, the bucket secret)
    are passed only when this karma8's config knows them: an unknown ``KARMA8_*``
    variable is an error.
    """
    env = dict(os.environ)
    notes: list[str] = []
    api_fields, bucket_fields = ApiConfig.model_fields, BucketConfig.model_fields
    for key, value in FAST_API.items():
        env[f"KARMA8_API_{key.upper()}"] = value
    for key, value in {**RECONCILE_API, **REPAIR_API, **SHARED_API}.items():
        if key in api_fields:
            env[f"KARMA8_API_{key.upper()}"] = value
            notes.append(f"{key}={value}")
        else:
            notes.append(f"{key} not supported by this karma8")
    for key, value in FAST_BUCKET.items():
        env[f"KARMA8_BUCKET_{key.upper()}"] = value
    if "bucket_secret" in api_fields and "secret" in bucket_fields:
        secret = secrets.token_hex(16)
        env["KARMA8_API_BUCKET_SECRET"] = env["KARMA8_BUCKET_SECRET"] = secret
        notes.append("bucket secret on")
    else:
        notes.append("bucket secret not supported by this karma8")
    return env, notes


@dataclass
class Child:
    """One server process of the stack, restartable."""

    name: str
    args: list[str]
    ready: Path
    log: Path
    proc: trio.Process | None = None
    #: True while the process is down because we killed or stopped it.
    expected_down: bool = True
    starts: int = 0
    info: dict[str, object] = field(default_factory=dict)
    #: Held by whoever kills and restarts it, so that two never do at once.
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def serving(self) -> bool:
        """Running, and ready since we last started it."""
        return self.running and not self.expected_down

    def log_tail(self) -> str:
        return log_tail(self.log)


class Stack:
    """The API processes and the bucket processes of one chaos run.

    Args:
        api_servers: API server processes sharing the registry.
        registry_url: the registry of every API server; None: one SQLite file (the
            server's default with one server, ``<root>/registry.sqlite3`` with several).
    """

    def __init__(
        self,
        root: Path,
        buckets: int,
        log_level: str,
        api_servers: int = 1,
        registry_url: str | None = None,
    ) -> None:
        self.root = root
        self.log_level = log_level
        self.env, self.notes = child_env()
        if registry_url is None and api_servers > 1:
            registry_url = f"sqlite:{root / 'registry.sqlite3'}"
        self._registry_url = registry_url
        if registry_url is not None:
            self.env["KARMA8_API_REGISTRY_URL"] = registry_url
        if api_servers > 1:
            for key, value in SHARED_FAST_API.items():
                self.env[f"KARMA8_API_{key.upper()}"] = value
                self.notes.append(f"{key}={value}")
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.ports = [(free_port(), free_port()) for _ in range(api_servers)]
        self.apis = [
            self._api_child("api" if api_servers == 1 else f"api-{i}", port, membership)
            for i, (port, membership) in enumerate(self.ports)
        ]
        #: The first API server (the only one unless there are several).
        self.api = self.apis[0]
        self.port, self.membership_port = self.ports[0]
        endpoints = ",".join(f"127.0.0.1:{membership}" for _, membership in self.ports)
        self.buckets = [
            Child(
                f"bucket-{i}",
                [
                    "bucket",
                    "--data-dir",
                    str(self.bucket_dir(i)),
                    "--port",
                    "0",
                    "--api",
                    endpoints,
                ],
                root / f"bucket-{i}.ready",
                root / "logs" / f"bucket-{i}.log",
            )
            for i in range(buckets)
        ]
        #: Ids of the buckets lost for good (their copies can never be deleted).
        self.lost_ids: set[str] = set()
        #: Called with a message when a process dies without being killed by us.
        self.on_crash: Callable[[str], None] = lambda message: None
        self._turn = itertools.count()

    def _api_child(self, name: str, port: int, membership: int) -> Child:
        args = ["api", "--data-dir", str(self.root / name), "--port", str(port)]
        args += ["--membership-port", str(membership)]
        if len(self.ports) > 1:
            args += ["--server-id", f"chaos-{name}"]
        return Child(name, args, self.root / f"{name}.ready", self.root / "logs" / f"{name}.log")

    @property
    def url(self) -> str:
        """The first API server's URL."""
        return f"ws://127.0.0.1:{self.port}"

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}" for port, _ in self.ports]

    def pick_url(self) -> str:
        """The next serving API server's URL in turn (any server's when none is serving)."""
        running = [url for url, api in zip(self.urls(), self.apis, strict=True) if api.serving]
        choices = running or self.urls()
        return choices[next(self._turn) % len(choices)]

    @property
    def registry_path(self) -> Path:
        """The registry file of a single API server on its default SQLite registry."""
        return self.root / "api" / "registry.sqlite3"

    @property
    def registry_url(self) -> str:
        """What :class:`~karma8.registry.db.RegistryDB` opens to read the shared registry."""
        return self._registry_url if self._registry_url is not None else str(self.registry_path)

    def bucket_dir(self, index: int) -> Path:
        return self.root / f"bucket-{index}"

    def children(self) -> list[Child]:
        return [*self.apis, *self.buckets]

    def client(self, url: str | None = None) -> Client:
        """A client of ``url``, by default of the next running API server."""
        api = url if url is not None else self.pick_url()
        return Client(ClientConfig(api=api, connect_timeout=5.0, idle_timeout=60.0))

    # -- one process -------------------------------------------------------------------

    async def start(self, child: Child) -> None:
        """Start ``child`` and wait for its ready file.

        Raises:
            ChaosError: it exited or did not get ready in time.
        """
        if child.running:
            return
        await trio.Path(child.ready).unlink(missing_ok=True)
        with child.log.open("ab") as log:
            log.write(f"---- chaos: starting {child.name} (start {child.starts + 1})\n".encode())
            log.flush()
            child.proc = await trio.lowlevel.open_process(
                karma8_cmd(*child.args, "--ready-file", str(child.ready), "--log-level", self.log_level),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        child.starts += 1
        proc = child.proc
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise ChaosError(
                        f"{child.name} exited with status {proc.returncode} while starting;"
                        f" its log ends with:\n{child.log_tail()}"
                    )
                try:
                    child.info = json.loads(await trio.Path(child.ready).read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    await trio.sleep(POLL)
                    continue
                child.expected_down = False
                return
        proc.kill()
        raise ChaosError(f"{child.name} did not start within {START_TIMEOUT:g} s:\n{child.log_tail()}")

    async def replace(self, child: Child) -> None:
        """A bucket lost for good: SIGKILL it, wipe its data directory, and start an empty
        bucket (a new identity) in its place, as an operator replacing a dead disk would."""
        await self.kill(child)
        data = Path(child.args[child.args.index("--data-dir") + 1])
        with contextlib.suppress(OSError):
            self.lost_ids.add((data / "bucket-id").read_text().strip())
        await trio.to_thread.run_sync(shutil.rmtree, data, True)
        await self.start(child)

    async def kill(self, child: Child) -> None:
        """SIGKILL ``child`` and reap it."""
        child.expected_down = True
        if child.proc is not None:
            with trio.CancelScope(shield=True):
                if child.proc.returncode is None:
                    child.proc.send_signal(signal.SIGKILL)
                await child.proc.wait()

    async def stop(self, child: Child) -> None:
        """SIGTERM ``child``; SIGKILL it if it does not exit in time."""
        child.expected_down = True
        proc = child.proc
        if proc is None:
            return
        await stop_process(proc, signal.SIGTERM, STOP_TIMEOUT)

    # -- the whole stack ---------------------------------------------------------------

    async def start_all(self) -> None:
        """Start the API servers, then every bucket, and wait until all buckets are live."""
        for api in self.apis:
            await self.start(api)
        errors: list[str] = []

        async def start_bucket(bucket: Child) -> None:
            try:
                await self.start(bucket)
            except ChaosError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            for bucket in self.buckets:
                nursery.start_soon(start_bucket, bucket)
        if errors:
            raise ChaosError("\n".join(errors))
        await self.wait_live()

    async def aclose(self) -> None:
        """Stop every process we started (buckets first, so none logs a lost API)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for bucket in self.buckets:
                    nursery.start_soon(self.stop, bucket)
            async with trio.open_nursery() as nursery:
                for api in self.apis:
                    nursery.start_soon(self.stop, api)

    async def revive_crashed(self) -> None:
        """Restart any process that died without us killing it, reporting each crash."""
        for child in self.children():
            async with child.lock:
                if child.proc is not None and not child.running and not child.expected_down:
                    child.expected_down = True
                    self.on_crash(
                        f"{child.name} (pid {child.proc.pid}) exited on its own with status"
                        f" {child.proc.returncode}; log {child.log} ends with:\n{child.log_tail()}"
                    )
                    await self.start(child)

    async def watch(self) -> None:
        """Forever: notice crashed processes and restart them."""
        while True:
            await self.revive_crashed()
            await trio.sleep(0.5)

    async def ensure_up(self) -> None:
        """Start whatever is not running (after the faults stopped)."""
        await self.revive_crashed()

        async def up(child: Child) -> None:
            async with child.lock:
                await self.start(child)

        for api in self.apis:
            await up(api)
        async with trio.open_nursery() as nursery:
            for bucket in self.buckets:
                nursery.start_soon(up, bucket)

    async def live_count(self) -> int:
        """The fewest live buckets any API server reports (-1 if one cannot be asked)."""
        counts = []
        for url in self.urls():
            try:
                counts.append(int((await self.client(url).status())["live"]))
            except Karma8Error:
                return -1
        return min(counts)

    async def wait_live(self) -> None:
        """Wait until every API server reports every bucket live.

        Raises:
            ChaosError: not within ``START_TIMEOUT``.
        """
        with trio.move_on_after(START_TIMEOUT):
            while await self.live_count() != len(self.buckets):  # noqa: ASYNC110 (another process)
                await trio.sleep(POLL * 4)
            return
        raise ChaosError(f"the buckets did not all become live within {START_TIMEOUT:g} s")
