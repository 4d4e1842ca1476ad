"""Real processes and sockets for integration tests.

Buckets always run as real ``karma8 bucket`` processes. The API server runs in-process
on port 0 (so tests can look at its registry and inject faults) or, where a test is about
the process itself, as a real ``karma8 api`` process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

import karma8.stack
from karma8.api.app import ApiEndpoints, serve_api
from karma8.bucket.store import _data_size
from karma8.bucket.volumes import Needle, scan
from karma8.client import Client
from karma8.config import ApiConfig, ClientConfig
from karma8.registry.db import RegistryDB
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import Portal
from karma8.rpc.buckets import BucketClient, connect_bucket
from karma8.wsfix import close_transport

DEADLINE = 30.0
POLL = 0.02

#: Fast membership so tests see joins and deaths quickly; metrics on free ports, so that
#: test servers (and concurrent test runs) never share the default metrics port.
FAST_API = {"heartbeat_interval": 0.2, "bucket_timeout": 1.5, "janitor_interval": 0.3, "metrics_port": 0}

#: The shared bucket secret of every test cluster (buckets refuse to start without one).
TEST_SECRET = secrets.token_urlsafe(24)


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float = DEADLINE
) -> None:
    """Poll ``check`` until it is true; fail the test after ``within`` seconds."""
    with trio.move_on_after(within):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(POLL)
    raise AssertionError(f"timed out after {within:g} s waiting for {what}")


def free_port() -> int:
    """A port that was free a moment ago (for servers that must keep their port).

    Taken below the kernel's ephemeral range: a port from that range can be handed to an
    outgoing connection between a server's stop and its restart on the same port.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    rnd = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            chunk = rnd.randbytes(min(left, 1 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """Flip the bits ``mask`` of the byte at ``offset`` of ``path`` (bit rot, in place)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert len(byte) == 1, f"{path} has no byte at {offset}"
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def karma8_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "karma8", *args]


@dataclass
class BucketProcess:
    """A running ``karma8 bucket`` process."""

    data_dir: Path
    proc: trio.Process
    bucket_id: str = ""
    port: int = 0

    def fragment_files(self) -> list[Path]:
        """The fragment files under ``fragments/`` (fragments streamed in pieces); the
        fragments that arrived whole are needles in ``volumes/``: see :meth:`fragment_ids`."""
        root = self.data_dir / "fragments"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def needles(self) -> dict[str, Needle]:
        """The live needles of the bucket's volumes, by fragment id (read, never changed)."""
        root = self.data_dir / "volumes"
        return scan(root) if root.exists() else {}

    def fragment_ids(self) -> list[str]:
        """The ids of every fragment the bucket's disk holds, as a needle or as a file."""
        return sorted({p.name for p in self.fragment_files()} | self.needles().keys())

    def fragment_at(self, fragment_id: str) -> tuple[Path, int, int]:
        """Where a fragment's data lies on disk: (volume or fragment file, offset of its first
        data byte, data size). A needle shadows a file of the same id, as in the store."""
        needle = self.needles().get(fragment_id)
        if needle is not None:
            return needle.path, needle.data_offset, needle.size
        path = self.data_dir / "fragments" / fragment_id[:2] / fragment_id
        if not path.exists():
            raise AssertionError(f"no fragment {fragment_id} on {self.data_dir}")
        return path, 0, _data_size(path)

    def flip(self, fragment_id: str, at: int = 0, mask: int = 0xFF) -> None:
        """Flip the bits ``mask`` of byte ``at`` of a fragment's data, wherever it lies on disk."""
        path, offset, size = self.fragment_at(fragment_id)
        if not 0 <= at < size:
            raise AssertionError(f"{fragment_id} has {size} data bytes, none at {at}")
        flip_byte(path, offset + at, mask)

    def tmp_files(self) -> list[Path]:
        root = self.data_dir / "tmp"
        return sorted(root.iterdir()) if root.exists() else []

    def files_of(self, upload_id: str) -> list[str]:
        """Names of one upload's committed fragments (needles or files: their ids) and of its
        in-progress files on this bucket."""
        tmp = [p.name for p in self.tmp_files()]
        return [n for n in self.fragment_ids() + tmp if n.startswith(upload_id)]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def start_bucket(
    data_dir: Path, membership_port: int, env: dict[str, str] | None = None, port: int = 0
) -> BucketProcess:
    """Start a bucket process and wait until it serves (``env``: extra variables; ``port``
    0: any free one)."""
    ready = data_dir.with_name(data_dir.name + ".ready")
    ready.unlink(missing_ok=True)
    proc = await trio.lowlevel.open_process(
        karma8_cmd(
            "bucket",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--api",
            f"127.0.0.1:{membership_port}",
            "--ready-file",
            str(ready),
            "--log-level",
            "warning",
        ),
        env={
            **os.environ,
            "KARMA8_BUCKET_SECRET": TEST_SECRET,
            "KARMA8_BUCKET_METRICS_PORT": "0",
            **(env or {}),
        },
    )
    bucket = BucketProcess(data_dir, proc)

    def is_ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"bucket exited with {proc.returncode}")
        return ready.exists()

    await wait_until(is_ready, f"bucket {data_dir} to start")
    info = json.loads(ready.read_text())
    bucket.bucket_id, bucket.port = info["bucket_id"], info["port"]
    return bucket


async def start_buckets(root: Path, membership_port: int, n: int = 6) -> list[BucketProcess]:
    """Start ``n`` bucket processes at once, with data in ``root / "bucket-<i>"``."""
    buckets: list[BucketProcess] = []
    try:
        async with trio.open_nursery() as nursery:

            async def start(i: int) -> None:
                buckets.append(await start_bucket(root / f"bucket-{i}", membership_port))

            for i in range(n):
                nursery.start_soon(start, i)
    except BaseException:
        for b in buckets:
            await stop_process(b.proc)
        raise
    return buckets


async def connect_test_bucket(
    portal: Portal, bucket: BucketProcess, secret: str = TEST_SECRET
) -> BucketClient:
    """A gRPC client of a test bucket, presenting ``secret``."""
    return await connect_bucket(
        portal,
        bucket.bucket_id,
        f"127.0.0.1:{bucket.port}",
        close_timeout=5,
        security=ChannelSecurity(secret),
    )


async def wait_live(client: Client, n: int) -> None:
    """Wait until the API server behind ``client`` has exactly ``n`` live buckets."""

    async def enough() -> bool:
        return int((await client.status())["live"]) == n

    await wait_until(enough, f"{n} live buckets")


async def stop_process(proc: trio.Process, sig: int = signal.SIGTERM) -> None:
    """Stop a test's process: ``sig``, then SIGKILL after 10 s."""
    await karma8.stack.stop_process(proc, sig, 10)


@dataclass
class Cluster:
    """An API server and its buckets, for one test."""

    root: Path
    membership_port: int
    url: str = ""
    buckets: list[BucketProcess] = field(default_factory=list)
    api_config: ApiConfig | None = None
    #: The in-process API server's /metrics port.
    metrics_port: int | None = None
    _started: int = 0
    #: Extra environment of every bucket, and [client] settings of ``client`` (TLS, token).
    bucket_env: dict[str, str] = field(default_factory=dict)
    client_settings: dict[str, object] = field(default_factory=dict)

    @property
    def client(self) -> Client:
        return Client(ClientConfig.model_validate({"api": self.url, **self.client_settings}))

    def registry(self) -> RegistryDB:
        """A second connection to the registry file (SQLite WAL allows it)."""
        return RegistryDB(self.root / "api" / "registry.sqlite3")

    async def add_bucket(self) -> BucketProcess:
        self._started += 1
        bucket = await start_bucket(
            self.root / f"bucket-{self._started}", self.membership_port, self.bucket_env
        )
        self.buckets.append(bucket)
        return bucket

    async def restart_bucket(self, bucket: BucketProcess) -> BucketProcess:
        """Start a stopped bucket again on its data directory (same bucket id)."""
        bucket.kill()
        await bucket.proc.wait()
        again = await start_bucket(bucket.data_dir, self.membership_port, self.bucket_env)
        self.buckets[self.buckets.index(bucket)] = again
        return again

    async def live_count(self) -> int:
        return int((await self.client.status())["live"])

    async def wait_live(self, n: int) -> None:
        await wait_live(self.client, n)

    def uploads_recorded(self) -> int:
        """How many uploads the registry has any row for (in any state)."""
        db = self.registry()
        try:
            return int(db._query("SELECT count(*) FROM uploads")[0][0])
        finally:
            db.close()

    def bucket(self, bucket_id: str) -> BucketProcess:
        return next(b for b in self.buckets if b.bucket_id == bucket_id)

    def all_files(self) -> list[str]:
        """Names of every fragment (needle or file) and in-progress file on every bucket."""
        return [n for b in self.buckets for n in b.fragment_ids() + [p.name for p in b.tmp_files()]]

    def files_of(self, upload_id: str) -> list[str]:
        return [n for b in self.buckets for n in b.files_of(upload_id)]

    async def aclose(self) -> None:
        for b in self.buckets:
            await stop_process(b.proc)


def api_config(root: Path, **overrides: object) -> ApiConfig:
    values: dict[str, object] = {
        "port": 0,
        "membership_port": 0,
        "data_dir": root / "api",
        "uvloop": True,
        "bucket_secret": TEST_SECRET,
        **FAST_API,
    }
    values.update(overrides)
    return ApiConfig.model_validate(values)


@contextlib.asynccontextmanager
async def open_cluster(root: Path, buckets: int = 6, **api_overrides: object) -> AsyncIterator[Cluster]:
    """An in-process API server and ``buckets`` bucket processes, all live."""
    async with trio.open_nursery() as nursery:
        config = api_config(root, **api_overrides)
        endpoints: ApiEndpoints = await nursery.start(serve_api, config)
        cluster = Cluster(
            root,
            endpoints.membership_port,
            endpoints.url,
            api_config=config,
            metrics_port=endpoints.metrics_port,
        )
        try:
            async with trio.open_nursery() as starting:
                for _ in range(buckets):
                    starting.start_soon(cluster.add_bucket)
            await cluster.wait_live(buckets)
            yield cluster
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_api_process(
    root: Path, membership_port: int, settings: Mapping[str, object] | None = None
) -> AsyncIterator[str]:
    """A real ``karma8 api`` process (``settings``: extra [api] keys); yields its WebSocket URL."""
    ready = root / "api.ready"
    ready.unlink(missing_ok=True)
    api = {**FAST_API, **(settings or {})}
    env = {**os.environ, **{f"KARMA8_API_{k.upper()}": str(v) for k, v in api.items()}}
    env["KARMA8_API_BUCKET_SECRET"] = TEST_SECRET
    proc = await trio.lowlevel.open_process(
        karma8_cmd(
            "api",
            "--data-dir",
            str(root / "api"),
            "--port",
            "0",
            "--membership-port",
            str(membership_port),
            "--ready-file",
            str(ready),
            "--log-level",
            "warning",
        ),
        env=env,
    )
    try:
        await wait_until(ready.exists, "the API process to start")
        yield f"ws://127.0.0.1:{json.loads(ready.read_text())['port']}"
    finally:
        await stop_process(proc, signal.SIGKILL)


@contextlib.asynccontextmanager
async def open_raw(url: str, path: str) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket connection, for speaking the protocol frame by frame."""
    async with open_websocket_url(url + path, max_message_size=64 * 1024 * 1024) as ws:
        try:
            yield ws
        finally:
            await close_transport(ws)


async def expect_error(ws: WebSocketConnection) -> dict[str, object]:
    """Read frames until an error frame; return it (fails on a success frame)."""
    with trio.fail_after(DEADLINE):
        while True:
            message = await ws.get_message()
            if isinstance(message, str):
                reply: dict[str, object] = json.loads(message)
                assert reply["ok"] is False, reply
                return reply


def upload_rows(db: RegistryDB, name: str) -> list[tuple[str, str]]:
    """(upload id, state) of every upload of ``name``, oldest first."""
    rows = db._query("SELECT id, state FROM uploads WHERE name = ? ORDER BY created", (name,))
    return [(str(i), str(s)) for i, s in rows]
