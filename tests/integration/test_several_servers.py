"""Several API servers on one PostgreSQL registry: real processes, a real database.

Three ``karma8 api`` processes share a throwaway PostgreSQL (tests/pg.py); eight buckets
heartbeat to all three (``--api a,b,c``: one at a time, the next when it fails). Any
server serves any request; what one server does, the others see.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from karma8.client import Client
from karma8.config import ClientConfig
from karma8.core.fragments import fragment_id
from karma8.errors import Karma8Error
from karma8.registry.db import RegistryDB
from tests.integration.harness import (
    FAST_API,
    TEST_SECRET,
    BucketProcess,
    free_port,
    karma8_cmd,
    make_file,
    open_raw,
    sha256_of,
    stop_process,
    wait_until,
)
from tests.pg import PostgresCluster

#: Quick to notice a dead server or lease holder; the janitor sweeps often.
SETTINGS = {**FAST_API, "server_timeout": 3.0, "job_lease": 2.0, "repair_interval": 0.5}


@dataclass
class ApiProcess:
    """One ``karma8 api`` process with a fixed identity and ports (kept across restarts)."""

    name: str
    root: Path
    port: int
    membership_port: int
    registry_url: str
    settings: dict[str, object] = field(default_factory=dict)
    proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def client(self) -> Client:
        return Client(ClientConfig(api=self.url, connect_timeout=5.0))

    async def start(self) -> None:
        ready = self.root / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        settings = {**SETTINGS, **self.settings}
        env = {**os.environ, **{f"KARMA8_API_{k.upper()}": str(v) for k, v in settings.items()}}
        env |= {
            "KARMA8_API_BUCKET_SECRET": TEST_SECRET,
            "KARMA8_API_REGISTRY_URL": self.registry_url,
            "KARMA8_API_SERVER_ID": self.name,
        }
        with (self.root / f"{self.name}.log").open("ab") as log:  # the child keeps its own copy
            self.proc = await self._open(env, ready, log)
        proc = self.proc

        def up() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"API server {self.name} exited with {proc.returncode}")
            return ready.exists()

        await wait_until(up, f"API server {self.name} to start")

    async def _open(self, env: dict[str, str], ready: Path, log: BinaryIO) -> trio.Process:
        return await trio.lowlevel.open_process(
            karma8_cmd(
                "api",
                "--data-dir",
                str(self.root / self.name),
                "--port",
                str(self.port),
                "--membership-port",
                str(self.membership_port),
                "--ready-file",
                str(ready),
                "--log-level",
                "info",
            ),
            env=env,
            stderr=log,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await stop_process(self.proc)


@dataclass
class Servers:
    apis: list[ApiProcess]
    buckets: list[BucketProcess] = field(default_factory=list)
    registry_url: str = ""
    #: The membership endpoints every bucket heartbeats to (one at a time).
    endpoints: str = ""

    def registry(self) -> RegistryDB:
        return RegistryDB(self.registry_url, "test")

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        db = self.registry()
        try:
            return [tuple(r) for r in db._query(sql, args)]
        finally:
            db.close()

    async def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows of the shared registry (read on a thread: trio's loop keeps running)."""
        return await trio.to_thread.run_sync(self._query, sql, args)

    async def rows_are(
        self, sql: str, expected: list[tuple[object, ...]], args: tuple[object, ...] = ()
    ) -> bool:
        return await self.query(sql, args) == expected

    def files_of(self, upload_id: str) -> list[str]:
        return [n for b in self.buckets for n in b.files_of(upload_id)]

    async def disks_match(self) -> bool:
        """Every disk holds exactly its fragments; no move or stale copy is pending."""
        if await self.query("SELECT (SELECT COUNT(*) FROM moves) + (SELECT COUNT(*) FROM stale)") != [(0,)]:
            return False
        homes: dict[str, set[str]] = {}
        for upload_id, part, bucket_id in await self.query(
            "SELECT f.upload_id, f.part, f.bucket_id FROM fragments f JOIN uploads u ON u.id = f.upload_id"
            " WHERE u.state = 'committed'"
        ):
            homes.setdefault(str(bucket_id), set()).add(fragment_id(str(upload_id), int(str(part))))
        return all(
            set(b.fragment_ids()) == homes.get(b.bucket_id, set()) and not b.tmp_files() for b in self.buckets
        )

    async def intact(self, client: Client, digests: dict[str, str], root: Path) -> None:
        for name, digest in digests.items():
            await client.download(name, root / "back.bin")
            assert sha256_of(root / "back.bin") == digest, name


async def _start_bucket(root: Path, i: int, apis: str) -> BucketProcess:
    data = root / f"bucket-{i}"
    ready = root / f"bucket-{i}.ready"
    with (root / f"bucket-{i}.log").open("ab") as log:  # the child keeps its own copy
        proc = await trio.lowlevel.open_process(
            karma8_cmd(
                "bucket", "--data-dir", str(data), "--port", "0", "--api", apis, "--ready-file", str(ready)
            ),
            env={**os.environ, "KARMA8_BUCKET_SECRET": TEST_SECRET, "KARMA8_BUCKET_METRICS_PORT": "0"},
            stderr=log,
        )
    await wait_until(ready.exists, f"bucket {i} to start")
    info = json.loads(ready.read_text())
    return BucketProcess(data, proc, info["bucket_id"], info["port"])


@contextlib.asynccontextmanager
async def open_servers(
    root: Path, registry_url: str, apis: int = 3, buckets: int = 8, **settings: object
) -> AsyncIterator[Servers]:
    servers = Servers(
        [ApiProcess(f"api-{i}", root, free_port(), free_port(), registry_url, settings) for i in range(apis)],
        registry_url=registry_url,
    )
    try:
        await servers.apis[0].start()  # creates the schema; the others open it as it is
        async with trio.open_nursery() as nursery:
            for api in servers.apis[1:]:
                nursery.start_soon(api.start)
        servers.endpoints = ",".join(f"127.0.0.1:{a.membership_port}" for a in servers.apis)

        async def add(i: int) -> None:
            servers.buckets.append(await _start_bucket(root, i, servers.endpoints))

        async with trio.open_nursery() as nursery:
            for i in range(buckets):
                nursery.start_soon(add, i)
        for api in servers.apis:  # every server sees every bucket, whichever it beats to
            await wait_until(
                lambda api=api: _live(api, buckets),  # type: ignore[misc]
                f"{buckets} live buckets on {api.name}",
            )
        yield servers
    finally:
        with trio.CancelScope(shield=True):
            for b in servers.buckets:
                await stop_process(b.proc)
            for api in servers.apis:
                await api.stop()


async def _live(api: ApiProcess, n: int) -> bool:
    return int((await api.client.status())["live"]) == n


@pytest.fixture
def registry(postgres_url: str) -> str:
    return postgres_url


async def test_any_server_serves_any_request(tmp_path: Path, registry: str) -> None:
    async with open_servers(tmp_path, registry) as s:
        a, b, c = s.apis
        src = tmp_path / "src.bin"
        digest = make_file(src, 3 << 20, seed=1)
        await a.client.upload(src, "docs/one.bin")
        await b.client.download("docs/one.bin", tmp_path / "back-b.bin")
        assert sha256_of(tmp_path / "back-b.bin") == digest
        assert [f["name"] for f in await c.client.list("docs/")] == ["docs/one.bin"]
        assert (await c.client.stat("docs/one.bin"))["sha256"] == digest
        st = await c.client.status()
        assert st["server"] == "api-2"
        assert sorted(x["id"] for x in st["servers"] if x["alive"]) == ["api-0", "api-1", "api-2"]
        assert sorted(st["jobs"]) == ["janitor", "rebalancer", "reconciler", "repair"]
        assert all(j["valid"] and j["holder"] in ("api-0", "api-1", "api-2") for j in st["jobs"].values())
        ((upload_id,),) = await s.query("SELECT id FROM uploads WHERE name = 'docs/one.bin'")
        assert s.files_of(str(upload_id))
        await c.client.delete("docs/one.bin")
        with pytest.raises(Karma8Error) as gone:
            await a.client.download("docs/one.bin", tmp_path / "gone.bin")
        assert gone.value.code == "not_found"
        # The deleted version's fragments leave the disks, whichever server holds the janitor.
        await wait_until(lambda: not s.files_of(str(upload_id)), "the deleted file's fragments to go")


async def test_a_name_in_progress_on_one_server_is_refused_on_another(tmp_path: Path, registry: str) -> None:
    async with open_servers(tmp_path, registry) as s:
        a, b, _ = s.apis
        async with open_raw(a.url, "/upload/same.bin") as ws:
            await ws.send_message(json.dumps({"size": 4 << 20}))
            await ws.send_message(b"x" * (1 << 20))
            await wait_until(
                lambda: s.rows_are("SELECT COUNT(*) FROM uploads WHERE name = 'same.bin'", [(1,)]),
                "the first upload to be placed",
            )
            src = tmp_path / "src.bin"
            make_file(src, 1000)
            with pytest.raises(Karma8Error, match="already in progress"):
                await b.client.upload(src, "same.bin")
            for _ in range(3):  # frames of at most max_frame (1 MiB)
                await ws.send_message(b"x" * (1 << 20))
            await ws.send_message(b"")  # the end
            reply = json.loads(await ws.get_message())
            assert reply["ok"] is True
        assert await s.query("SELECT state FROM uploads WHERE name = 'same.bin'") == [("committed",)]


async def test_a_killed_server_s_upload_is_reaped_and_nothing_else(tmp_path: Path, registry: str) -> None:
    async with open_servers(tmp_path, registry) as s:
        a, b, _ = s.apis
        src = tmp_path / "src.bin"
        digest = make_file(src, 2 << 20, seed=2)
        async with open_raw(a.url, "/upload/cut.bin") as ws:
            await ws.send_message(json.dumps({"size": 8 << 20}))
            for _ in range(2):
                await ws.send_message(b"y" * (1 << 20))
            await wait_until(
                lambda: s.rows_are("SELECT COUNT(*) FROM uploads WHERE name = 'cut.bin'", [(1,)]),
                "the upload to be placed",
            )
            ((cut,),) = await s.query("SELECT id FROM uploads WHERE name = 'cut.bin'")
            await wait_until(lambda: bool(s.files_of(str(cut))), "fragments of the cut upload on disk")
            a.kill()  # mid-upload
            await b.client.upload(src, "whole.bin")  # meanwhile, through another server
        await wait_until(
            lambda: s.rows_are("SELECT state FROM uploads WHERE id = ?", [("failed",)], (cut,)),
            "the dead server's upload to be reaped",
        )
        await wait_until(lambda: not s.files_of(str(cut)), "the reaped upload's fragments to go")
        assert await s.query("SELECT state FROM uploads WHERE name = 'whole.bin'") == [("committed",)]
        await b.client.download("whole.bin", tmp_path / "back.bin")
        assert sha256_of(tmp_path / "back.bin") == digest


async def test_jobs_have_one_holder_and_move_when_it_dies(tmp_path: Path, registry: str) -> None:
    async with open_servers(tmp_path, registry) as s:

        async def holders() -> dict[str, str]:
            return {str(job): str(h) for job, h in await s.query("SELECT job, holder FROM leases")}

        async def all_held() -> bool:
            return len(await holders()) == 4

        await wait_until(all_held, "every job to have a holder")
        first = await holders()
        victim = next(api for api in s.apis if api.name == first["repair"])
        victim.kill()

        async def moved() -> bool:
            return all(h != victim.name for h in (await holders()).values())

        await wait_until(moved, "the dead holder's jobs to move to another server", within=20.0)
        epochs = {str(job): int(str(epoch)) for job, epoch in await s.query("SELECT job, epoch FROM leases")}
        assert all(epochs[job] >= 2 for job, h in first.items() if h == victim.name)


async def test_the_registry_down_for_a_while_loses_nothing(
    tmp_path: Path, registry: str, postgres_cluster: PostgresCluster
) -> None:
    async with open_servers(tmp_path, registry) as s:
        a, b, _ = s.apis
        src = tmp_path / "src.bin"
        digest = make_file(src, 1 << 20, seed=3)
        await a.client.upload(src, "before.bin")
        postgres_cluster.stop_server()
        try:
            with pytest.raises(Karma8Error) as failed:
                await b.client.upload(src, "during.bin")
            assert failed.value.code in ("unavailable", "connection_failed"), failed.value
        finally:
            postgres_cluster.start_server()

        async def serves() -> bool:
            try:
                await b.client.upload(src, "after.bin")
            except Karma8Error:
                return False
            return True

        await wait_until(serves, "uploads to work again once the registry is back")
        for name in ("before.bin", "after.bin"):
            await a.client.download(name, tmp_path / "back.bin")
            assert sha256_of(tmp_path / "back.bin") == digest


MiB = 1 << 20


async def _upload_files(client: Client, root: Path, n: int, size: int) -> dict[str, str]:
    digests = {}
    for i in range(n):
        src = root / f"file-{i}.bin"
        digests[f"f/{i}"] = make_file(src, size, seed=100 + i)
        await client.upload(src, f"f/{i}")
    return digests


async def test_the_rebalancer_s_holder_killed_mid_move(tmp_path: Path, registry: str) -> None:
    # 1 MiB/s: a fragment takes seconds to copy, time enough to kill the holder mid-move.
    async with open_servers(tmp_path, registry, buckets=6, rebalance_bandwidth=MiB, rebalance_delay=0.5) as s:
        a = s.apis[0]
        digests = await _upload_files(a.client, tmp_path, 6, 12 * MiB)
        for i in (6, 7):  # two buckets join: the rebalancer's holder starts moving fragments
            s.buckets.append(await _start_bucket(tmp_path, i, s.endpoints))

        async def moving() -> bool:
            return bool(await s.query("SELECT server FROM moves"))

        await wait_until(moving, "a move to be under way")
        ((holder,),) = (await s.query("SELECT server FROM moves LIMIT 1"))[:1]
        victim = next(api for api in s.apis if api.name == holder)
        victim.kill()
        others = [api for api in s.apis if api is not victim]

        async def taken_over() -> bool:
            rows = await s.query("SELECT holder FROM leases WHERE job = 'rebalancer'")
            return rows not in ([], [(victim.name,)]) and not await s.query(
                "SELECT 1 FROM moves WHERE server = ?", (victim.name,)
            )

        await wait_until(taken_over, "another server to take the rebalancer over and reap the moves", 30.0)

        # Nothing lost, nothing duplicated: each fragment has one home, and the disks hold
        # exactly the homes once the interrupted copies are deleted.
        # (The files were written on 6 buckets: repair raises them to 8 fragments meanwhile.)
        async def settled() -> bool:
            return await s.query("SELECT COUNT(*) FROM repairs") == [(0,)] and await s.disks_match()

        await wait_until(settled, "repairs done and the disks to match the registry", 90.0)
        await s.intact(others[0].client, digests, tmp_path)
        placed = await s.query("SELECT COUNT(*), COUNT(DISTINCT upload_id || '.' || part) FROM fragments")
        assert placed[0][0] == placed[0][1] == 6 * 8


async def test_the_repair_holder_killed_mid_repair(tmp_path: Path, registry: str) -> None:
    # One bucket lost for good: each file keeps a fragment to spare, so its repair is
    # throttled (1 MiB/s: seconds each), time enough to kill the holder mid-repair.
    async with open_servers(
        tmp_path,
        registry,
        buckets=10,
        repair_bandwidth=MiB,
        repair_after=2.0,
        repair_interval=0.3,
        repair_concurrency=1,
    ) as s:
        a = s.apis[0]
        digests = await _upload_files(a.client, tmp_path, 4, 12 * MiB)
        lost = s.buckets[:1]
        for b in lost:
            b.kill()

        async def repairing() -> bool:
            return bool(await s.query("SELECT server FROM moves WHERE src = ''"))

        await wait_until(repairing, "a repair to be under way", 30.0)
        ((holder,),) = (await s.query("SELECT server FROM moves WHERE src = '' LIMIT 1"))[:1]
        victim = next(api for api in s.apis if api.name == holder)
        victim.kill()
        others = [api for api in s.apis if api is not victim]

        async def repaired() -> bool:
            if await s.query("SELECT COUNT(*) FROM repairs") != [(0,)]:
                return False
            rows = await s.query(
                "SELECT f.bucket_id FROM fragments f JOIN uploads u ON u.id = f.upload_id"
                " WHERE u.state = 'committed' AND f.state = 'ok'"
            )
            gone = {b.bucket_id for b in lost}
            return len(rows) == 4 * 8 and not any(str(r[0]) in gone for r in rows)

        await wait_until(repaired, "another server to finish the repairs", 90.0)
        await s.intact(others[0].client, digests, tmp_path)
        placed = await s.query(
            "SELECT COUNT(*), COUNT(DISTINCT upload_id || '.' || part) FROM fragments f"
            " JOIN uploads u ON u.id = f.upload_id WHERE u.state = 'committed'"
        )
        assert placed[0][0] == placed[0][1] == 4 * 8
