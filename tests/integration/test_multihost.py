"""The API server and six buckets on seven hosts (network namespaces), the test as client.

Every process is a real ``karma8 api`` / ``karma8 bucket`` in its own namespace with its
own address, configured only by ``KARMA8_*`` variables and options; they talk over real
sockets through a bridge. A round trip crosses the hosts; then one bucket's cable is
pulled mid-upload: the upload fails with a karma8 error within the configured timeouts,
nothing is committed, the reachable buckets drop their parts, and once the cable is back
the bucket is live again, the janitor deletes its leftover and all six buckets serve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from karma8.client import Client
from karma8.config import ClientConfig, MiB
from karma8.core.fragments import parse_fragment_id
from karma8.errors import RemoteError
from karma8.registry.db import RegistryDB
from tests.integration.harness import (
    FAST_API,
    TEST_SECRET,
    BucketProcess,
    karma8_cmd,
    make_file,
    stop_process,
    upload_rows,
    wait_until,
)
from tests.integration.netns import Host, Network, netns_of, why_unsupported

log = logging.getLogger(__name__)

BUCKETS = 6

#: Short limits, so that a pulled cable fails an upload in seconds, not minutes.
API_SETTINGS: dict[str, object] = {
    **FAST_API,  # heartbeats every 0.2 s, not live after 1.5 s, janitor every 0.3 s
    "idle_timeout": 2.0,  # a part that stops moving fails the upload after this
    "connect_timeout": 2.0,
    "rpc_timeout": 2.0,
    "cleanup_timeout": 5.0,
    "handshake_timeout": 5.0,
    # No fragment moves while the test counts fragments.
    "rebalance_auto": "false",
}
BUCKET_SETTINGS: dict[str, object] = {"heartbeat_interval": 0.2, "retry_max": 0.5}
CLIENT: dict[str, object] = {"connect_timeout": 5.0, "idle_timeout": 10.0}

#: Upper bound for the cut upload to fail: idle_timeout notices the stalled part, the
#: cleanup takes at most cleanup_timeout; the rest is slack for 2 busy cores.
FAIL_WITHIN = 20.0
BIG = 512 * MiB


@pytest.fixture(scope="module")
def netns_supported() -> None:
    reason = why_unsupported()
    if reason is not None:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")


@pytest.fixture
def network(netns_supported: None) -> Iterator[Network]:
    """A fresh switch; torn down (processes, namespaces, links) even if the test fails."""
    net = Network.create()
    try:
        yield net
    finally:
        net.destroy()
    assert net.leftovers() == [], "test network not torn down"


def _env(prefix: str, settings: Mapping[str, object]) -> dict[str, str]:
    """The test's environment without its own KARMA8_* variables, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARMA8_")}
    env.update({f"{prefix}{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def _start(
    net: Network, host: Host, args: list[str], env: dict[str, str], ready: Path
) -> tuple[trio.Process, dict[str, Any]]:
    """Start ``karma8 <args>`` in ``host``'s namespace; wait for its ready file."""
    ready.unlink(missing_ok=True)
    argv = karma8_cmd(*args, "--ready-file", str(ready), "--log-level", "info")
    proc = await trio.lowlevel.open_process(net.command(host, argv), env=env)

    def is_ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"{args[0]} on {host.name} exited with {proc.returncode}")
        return ready.exists()

    try:
        await wait_until(is_ready, f"{args[0]} on {host.name} ({host.address}) to start")
    except BaseException:
        await stop_process(proc, signal.SIGKILL)
        raise
    info: dict[str, Any] = json.loads(ready.read_text())
    return proc, info


@dataclass
class MultiHost:
    """The API server and buckets, each on its own host."""

    root: Path
    url: str
    procs: list[trio.Process]
    buckets: list[BucketProcess]
    hosts: dict[str, Host]  # bucket id -> its host

    @property
    def client(self) -> Client:
        return Client(ClientConfig.model_validate({"api": self.url, **CLIENT}))

    def address(self, bucket: BucketProcess) -> str:
        """Where the API should dial ``bucket``: its own host's address."""
        return f"{self.hosts[bucket.bucket_id].address}:{bucket.port}"

    def registry(self) -> RegistryDB:
        """A second connection to the API process's registry (SQLite WAL allows it)."""
        return RegistryDB(self.root / "api" / "registry.sqlite3")

    def files_of(self, upload_id: str) -> list[str]:
        return [n for b in self.buckets for n in b.files_of(upload_id)]

    async def status(self) -> dict[str, dict[str, Any]]:
        """Bucket id -> its row in ``/status``."""
        return {b["id"]: b for b in (await self.client.status())["buckets"]}

    async def live(self) -> set[str]:
        return {i for i, b in (await self.status()).items() if b["live"]}

    async def all_live(self) -> bool:
        return await self.live() == set(self.hosts)


@contextlib.asynccontextmanager
async def open_multihost(net: Network, root: Path) -> AsyncIterator[MultiHost]:
    """``karma8 api`` on host "api" and BUCKETS ``karma8 bucket`` on hosts "b0".., all live."""
    api = net.add_host("api")
    bucket_hosts = [net.add_host(f"b{i}") for i in range(BUCKETS)]
    procs: list[trio.Process] = []
    try:
        api_env = _env(
            "KARMA8_API_",
            {
                **API_SETTINGS,
                "host": api.address,
                "port": 0,
                "membership_host": api.address,
                "membership_port": 0,
                "data_dir": root / "api",
                "bucket_secret": TEST_SECRET,
            },
        )
        proc, info = await _start(net, api, ["api"], api_env, root / "api.ready")
        procs.append(proc)
        cluster = MultiHost(root, f"ws://{api.address}:{info['port']}", procs, [], {})
        membership = f"{api.address}:{info['membership_port']}"

        async def start_bucket(host: Host) -> None:
            data_dir = root / host.name
            # The last bucket binds every address and advertises nothing: it must still
            # tell the API the address of its own namespace, not 127.0.0.1.
            wildcard = host is bucket_hosts[-1]
            settings = {
                **BUCKET_SETTINGS,
                "host": "0.0.0.0" if wildcard else host.address,
                "advertise_host": "" if wildcard else host.address,
                "port": 0,
                "api": membership,
                "data_dir": data_dir,
                "secret": TEST_SECRET,
            }
            ready = root / f"{host.name}.ready"
            proc, info = await _start(net, host, ["bucket"], _env("KARMA8_BUCKET_", settings), ready)
            procs.append(proc)
            bucket = BucketProcess(data_dir, proc, info["bucket_id"], info["port"])
            cluster.buckets.append(bucket)
            cluster.hosts[bucket.bucket_id] = host

        async with trio.open_nursery() as nursery:
            for host in bucket_hosts:
                nursery.start_soon(start_bucket, host)
        cluster.buckets.sort(key=lambda b: cluster.hosts[b.bucket_id].name)
        # Seven processes, seven namespaces, none of them the test's.
        assert len({netns_of(p.pid) for p in procs} | {netns_of(os.getpid())}) == BUCKETS + 2
        await wait_until(cluster.all_live, f"{BUCKETS} buckets to register across the namespaces")
        yield cluster
    finally:
        for proc in procs:
            await stop_process(proc, signal.SIGKILL)


async def _round_trip(cluster: MultiHost, tmp_path: Path, name: str, seed: int) -> None:
    """Upload random bytes from the root namespace, download them, check where parts went."""
    src, dst = tmp_path / f"{name}.src", tmp_path / f"{name}.dst"
    digest = make_file(src, 4 * MiB + 4321, seed=seed)
    client = cluster.client
    assert (await client.upload(src, name)).sha256 == digest
    assert (await client.download(name, dst)).sha256 == digest
    assert dst.read_bytes() == src.read_bytes()

    parts = [p for p in (await client.stat(name))["parts"] if p["bucket"]]  # parity owed on 6 buckets
    assert len(parts) == BUCKETS
    assert {p["bucket"] for p in parts} == set(cluster.hosts), "not one part on each of the 6 buckets"
    status = await cluster.status()
    for p in parts:
        bucket = next(b for b in cluster.buckets if b.bucket_id == p["bucket"])
        # The API dials each bucket at the address of the bucket's own namespace.
        assert p["address"] == status[p["bucket"]]["address"] == cluster.address(bucket), p
        assert p["live"] is True


async def test_cluster_across_namespaces(network: Network, tmp_path: Path) -> None:
    async with open_multihost(network, tmp_path) as cluster:
        await _round_trip(cluster, tmp_path, "first", seed=1)

        # -- pull one bucket's cable while a big upload streams through it --------------
        victim = cluster.buckets[3]
        victim_host = cluster.hosts[victim.bucket_id]
        big = tmp_path / "big"
        with big.open("wb") as f:
            f.truncate(BIG)  # sparse: costs the client no disk
        sent = 0
        errors: list[RemoteError] = []

        def progress(done: int, total: int) -> None:
            nonlocal sent
            sent = done

        async def upload() -> None:
            with pytest.raises(RemoteError) as info:
                await cluster.client.upload(big, "big", progress=progress)
            errors.append(info.value)

        def victim_writing() -> bool:
            return sent >= 8 * MiB and any(p.stat().st_size > 0 for p in victim.tmp_files())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await wait_until(victim_writing, "the upload to stream into the buckets")
            # A Put in progress is tmp/<upload id>.<part>.<random>.
            upload_id, _ = parse_fragment_id(victim.tmp_files()[0].name.rsplit(".", 1)[0])
            await network.set_link(victim_host, up=False)
            cut_at, sent_at_cut = time.monotonic(), sent
            await wait_until(lambda: bool(errors), "the cut upload to fail", within=FAIL_WITHIN)
        failed_after = time.monotonic() - cut_at
        assert errors[0].code == "bucket_unavailable", errors[0]
        assert victim.bucket_id in errors[0].message, errors[0]
        assert sent < BIG, "the upload finished before the cable was pulled"

        # Nothing committed: the name does not exist.
        assert [f["name"] for f in await cluster.client.list()] == ["first"]
        with pytest.raises(RemoteError) as missing:
            await cluster.client.stat("big")
        assert missing.value.code == "not_found"

        # Every reachable bucket dropped its part; only the victim's deletion is pending.
        reachable = [b for b in cluster.buckets if b is not victim]
        await wait_until(
            lambda: not any(b.files_of(upload_id) for b in reachable),
            "the failed upload's parts to go from the reachable buckets",
        )
        db = cluster.registry()
        try:
            assert upload_rows(db, "big") == [(upload_id, "failed")]
            await wait_until(
                lambda: db.pending_deletions() == [(upload_id, victim.bucket_id)],
                "only the cut bucket's deletion to be pending",
            )
        finally:
            db.close()
        # The victim cannot hear the stream reset: its partial part is still there.
        assert victim.files_of(upload_id), "the cut bucket's partial part vanished while unreachable"

        async def victim_gone() -> bool:
            return victim.bucket_id not in await cluster.live()

        await wait_until(victim_gone, "the cut bucket to stop being live")

        # -- plug the cable back in -----------------------------------------------------
        await network.set_link(victim_host, up=True)
        plugged_at = time.monotonic()
        await wait_until(cluster.all_live, "the cut bucket to be live again")
        live_after = time.monotonic() - plugged_at
        assert (await cluster.status())[victim.bucket_id]["address"] == cluster.address(victim)

        def janitor_done() -> bool:
            db = cluster.registry()
            try:
                return db.pending_deletions() == [] and db.fragments(upload_id) == []
            finally:
                db.close()

        await wait_until(janitor_done, "the janitor to confirm the deletion on the cut bucket")
        # The partial part is a Put in progress; it goes when the stream reset, held up in
        # the API's TCP connection while the cable was out, reaches the bucket.
        leftover = victim.files_of(upload_id)
        await wait_until(lambda: victim.files_of(upload_id) == [], f"the cut bucket's {leftover} to go")
        cleaned_after = time.monotonic() - plugged_at

        # The file stored before the cut is whole, the victim's part included.
        first = tmp_path / "first.again"
        await cluster.client.download("first", first)
        assert first.read_bytes() == (tmp_path / "first.src").read_bytes()
        await _round_trip(cluster, tmp_path, "after", seed=2)
        assert [f["name"] for f in await cluster.client.list()] == ["after", "first"]
        assert cluster.files_of(upload_id) == []
        assert not any(b.tmp_files() for b in cluster.buckets)
        log.info(
            "cable pulled after %d MiB sent (%d MiB in all); the upload failed %.2f s later;"
            " with the cable back the bucket was live in %.2f s and its leftover gone in %.2f s",
            sent_at_cut // MiB,
            sent // MiB,
            failed_after,
            live_after,
            cleaned_after,
        )
