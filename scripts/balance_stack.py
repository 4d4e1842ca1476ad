"""The processes of a balance run: one ``karma8 api`` and buckets started one by one.

``karma8 up`` starts a fixed number of buckets with one capacity; the benchmark adds
buckets while the stack runs, with a capacity each, so it starts the processes itself:
the API first (ports 0, its ready file gives the real ones), then each bucket pointed at
the API's membership port, all sharing a fresh secret. Each process logs to
``<root>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from balance_model import BalanceError
from bench_procs import log_tail
from chaos_stack import karma8_cmd

from karma8.client import Client
from karma8.config import ClientConfig
from karma8.errors import Karma8Error
from karma8.stack import stop_process

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
POLL = 0.1
PROBLEMS_SHOWN = 10

#: API settings that only shorten waits (the bucket figures in /status follow heartbeats,
#: stale copies go at the janitor's pace); the rebalancer's own settings stay as given.
FAST_API = {"heartbeat_interval": "0.5", "janitor_interval": "0.5"}


@dataclass
class Child:
    """One server process."""

    name: str
    proc: trio.Process
    log: Path
    info: dict[str, Any] = field(default_factory=dict)

    def log_tail(self) -> str:
        return log_tail(self.log)


class Stack:
    """The API process and the bucket processes of one balance run."""

    def __init__(self, root: Path, api_settings: Mapping[str, str], log_level: str = "info") -> None:
        self.root = root
        self.log_level = log_level
        secret = secrets.token_urlsafe(32)
        self.env = {**os.environ, "KARMA8_API_BUCKET_SECRET": secret, "KARMA8_BUCKET_SECRET": secret}
        for key, value in {**FAST_API, **api_settings}.items():
            self.env[f"KARMA8_API_{key.upper()}"] = value
        self.api: Child | None = None
        self.buckets: list[Child] = []
        (root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        if self.api is None:
            raise BalanceError("the API server is not started")
        return f"ws://127.0.0.1:{self.api.info['port']}"

    def client(self) -> Client:
        return Client(ClientConfig(api=self.url, connect_timeout=10.0, idle_timeout=120.0))

    async def _start(self, name: str, args: list[str]) -> Child:
        ready = self.root / f"{name}.ready"
        log = self.root / "logs" / f"{name}.log"
        await trio.Path(ready).unlink(missing_ok=True)
        cmd = karma8_cmd(*args, "--ready-file", str(ready), "--log-level", self.log_level)
        with log.open("ab") as out:
            proc = await trio.lowlevel.open_process(
                cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        child = Child(name, proc, log)
        with trio.move_on_after(START_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise BalanceError(
                        f"{name} exited with status {proc.returncode} while starting:\n{child.log_tail()}"
                    )
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    child.info = json.loads(await trio.Path(ready).read_text())
                    return child
                await trio.sleep(POLL)
        await stop_process(proc, signal.SIGTERM, STOP_TIMEOUT)
        raise BalanceError(f"{name} did not start within {START_TIMEOUT:g} s:\n{child.log_tail()}")

    async def start_api(self) -> None:
        args = ["api", "--data-dir", str(self.root / "api"), "--port", "0", "--membership-port", "0"]
        self.api = await self._start("api", args)

    async def add_buckets(self, count: int, capacity: int) -> list[Child]:
        """Start ``count`` buckets of ``capacity`` bytes at once; returns them in start order."""
        if self.api is None:
            raise BalanceError("start the API server first")
        membership = f"127.0.0.1:{self.api.info['membership_port']}"
        first = len(self.buckets) + 1
        started: dict[int, Child] = {}

        async def one(index: int) -> None:
            name = f"bucket-{index:02d}"
            args = [
                "bucket",
                "--data-dir",
                str(self.root / name),
                "--port",
                "0",
                "--api",
                membership,
                "--capacity",
                str(capacity),
            ]
            started[index] = await self._start(name, args)

        try:
            async with trio.open_nursery() as nursery:
                for index in range(first, first + count):
                    nursery.start_soon(one, index)
        finally:
            # Whatever started is ours to stop, even if a sibling failed.
            self.buckets.extend(started[i] for i in sorted(started))
        return self.buckets[-count:]

    async def status(self) -> dict[str, Any]:
        """The API's /status (a lost API is a failed run)."""
        self.check_running()
        try:
            return await self.client().status()
        except Karma8Error as exc:
            raise BalanceError(f"/status failed: {exc}") from exc

    async def wait_live(self, count: int) -> None:
        """Wait until ``count`` buckets are live."""
        with trio.move_on_after(START_TIMEOUT):
            while (await self.status())["live"] != count:  # noqa: ASYNC110 (another process)
                await trio.sleep(POLL)
            return
        raise BalanceError(f"not {count} live buckets within {START_TIMEOUT:g} s")

    def check_running(self) -> None:
        """Raises BalanceError if a process of the stack has exited."""
        for child in self.children():
            if child.proc.returncode is not None:
                raise BalanceError(
                    f"{child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}"
                )

    def children(self) -> list[Child]:
        return [*self.buckets, *([self.api] if self.api else [])]

    async def aclose(self) -> list[str]:
        """Stop every process (buckets first, then the API); returns what did not stop cleanly."""
        problems: list[str] = []

        async def stop(child: Child) -> None:
            if await stop_process(child.proc, signal.SIGTERM, STOP_TIMEOUT):
                problems.append(f"{child.name} did not stop within {STOP_TIMEOUT:g} s; killed it")
            elif child.proc.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{child.name} exited with status {child.proc.returncode}")

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for child in self.buckets:
                    nursery.start_soon(stop, child)
            if self.api is not None:
                await stop(self.api)
        return problems

    def logged_problems(self) -> list[str]:
        """Warnings and errors in the processes' logs (a clean run has none)."""
        found = []
        for child in self.children():
            with contextlib.suppress(OSError):
                for line in child.log.read_text(errors="replace").splitlines():
                    if " ERROR " in line or " WARNING " in line or "Traceback" in line:
                        found.append(f"{child.name}: {line}")
        return found


@contextlib.asynccontextmanager
async def open_stack(
    root: Path, api_settings: Mapping[str, str], log_level: str = "info"
) -> AsyncIterator[Stack]:
    """A stack whose processes are all stopped on the way out."""
    stack = Stack(root, api_settings, log_level)
    try:
        yield stack
    finally:
        for problem in await stack.aclose():
            print(f"stack: {problem}", file=sys.stderr, flush=True)
