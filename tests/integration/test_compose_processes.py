"""The image's entrypoint commands, exercised as plain processes.

Each karma8 service of compose/compose.yaml runs as ``karma8 <its command>`` with its
environment, the way its container would, on loopback: service names become 127.0.0.1,
its volume a temporary directory, each fixed port a free one, and the ``postgres``
service a throwaway PostgreSQL database (tests/pg.py). The load balancer (HAProxy, not
installed here) is left out: the client talks to one API server, then to the other.
Each service's healthcheck command must succeed, and then a file goes up through one
API server and comes back through the other. Then buckets 9 and
10 of compose.more-buckets.yaml join the running stack the same way: they register and the
next file is placed on them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import trio

from karma8.client import Client
from karma8.config import ClientConfig
from tests.integration.harness import (
    TEST_SECRET,
    free_port,
    karma8_cmd,
    make_file,
    sha256_of,
    stop_process,
    wait_live,
    wait_until,
)
from tests.unit.test_compose import (
    BASE,
    MORE,
    Service,
    apis_of,
    buckets_of,
    load_compose,
    port_fields,
    services,
)

#: Starting 9 Python processes on 2 shared cores takes a while.
START_DEADLINE = 90.0
LOOPBACK = "127.0.0.1"
_HOST_PORT = re.compile(r"([\w.-]+):(\d+)")


@dataclass
class Local:
    """How one service runs here: its ports mapped to free ones, its volume to a directory."""

    service: Service
    #: Port the container would listen on -> the port the process listens on here.
    ports: dict[int, int]
    data: Path

    def env(self, others: Mapping[str, Local], registry: str) -> dict[str, str]:
        """The service's environment, for loopback; nothing else from karma8 leaks in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KARMA8_")}
        for key, value in self.service.env.items():
            env[key] = registry if value.startswith("postgresql://") else self._value(value, others)
        config = self.service.config
        for key in port_fields(config):
            env[f"{config.env_prefix}{key.upper()}"] = str(self.ports[getattr(config, key)])
        return env

    def _value(self, value: str, others: Mapping[str, Local]) -> str:
        if value == "0.0.0.0" or value in others:
            return LOOPBACK
        if value in {target for _, target in self.service.mounts}:
            return str(self.data)
        endpoints = []
        for item in value.split(","):  # a list of host:port (buckets name every API server)
            match = _HOST_PORT.fullmatch(item)
            if match and match.group(1) in others:
                endpoints.append(f"{LOOPBACK}:{others[match.group(1)].ports[int(match.group(2))]}")
            else:
                endpoints.append(item)
        return ",".join(endpoints)

    def health(self) -> list[str]:
        """The healthcheck command, with this service's ports."""
        args = []
        for arg in self.service.health:
            parts = urlsplit(arg)
            if parts.scheme and parts.port is not None:
                args.append(urlunsplit(parts._replace(netloc=f"{LOOPBACK}:{self.ports[parts.port]}")))
            else:
                args.append(arg)
        return args


async def _start_healthy(
    names: list[str], local: Mapping[str, Local], procs: dict[str, trio.Process], registry: str
) -> None:
    """Start the services ``names`` (in order) and wait until each one's healthcheck passes."""
    for name in names:
        svc = local[name]
        procs[name] = await trio.lowlevel.open_process(
            karma8_cmd(*svc.service.argv), env=svc.env(local, registry)
        )
    for name in names:
        svc = local[name]
        said: list[bytes] = [b""]

        async def healthy(name: str = name, svc: Local = svc, said: list[bytes] = said) -> bool:
            if procs[name].returncode is not None:
                raise AssertionError(f"{name} exited with {procs[name].returncode}")
            check = await trio.run_process(
                karma8_cmd(*svc.health()),
                env=svc.env(local, registry),
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
            said[0] = check.stdout + check.stderr
            return check.returncode == 0

        try:
            await wait_until(healthy, f"{name}: karma8 {' '.join(svc.health())}", START_DEADLINE)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it said: {said[0].decode(errors='replace')}") from None


async def test_the_compose_services_run_as_processes(tmp_path: Path, postgres_url: str) -> None:
    environ = {"KARMA8_SECRET": TEST_SECRET, "KARMA8_DB_PASSWORD": "unused-here"}
    base = services(load_compose(BASE, environ=environ))
    found = services(load_compose(BASE, MORE, environ=environ))
    apis, buckets = apis_of(base), buckets_of(base)
    assert len(apis) == 2
    more = [b.name for b in buckets_of(found) if b.name not in base]
    assert more == ["bucket-9", "bucket-10"]
    local = {
        s.name: Local(
            s, {getattr(s.config, k): free_port() for k in port_fields(s.config)}, tmp_path / s.name
        )
        for s in found.values()
    }
    procs: dict[str, trio.Process] = {}
    try:
        await _start_healthy(list(base), local, procs, postgres_url)  # API servers first (depends_on)

        # Each bucket's identity lives in its volume.
        for bucket in buckets:
            assert (local[bucket.name].data / "bucket-id").read_text().strip()

        clients = [
            Client(
                ClientConfig.model_validate({"api": f"ws://{LOOPBACK}:{local[a.name].ports[a.config.port]}"})
            )
            for a in apis
        ]
        for c in clients:  # buckets beat to the first; the second sees them through the registry
            await wait_live(c, len(buckets))
        client, other = clients
        src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
        digest = make_file(src, 3 * 1024 * 1024 + 17, seed=6)
        uploaded = await client.upload(src, "compose/file.bin")
        assert uploaded.sha256 == digest
        await other.download("compose/file.bin", dst)  # through the other API server
        assert sha256_of(dst) == digest
        assert dst.read_bytes() == src.read_bytes()

        # Buckets 9 and 10 join the running stack: they register and the next file uses
        # them (placement fills the emptiest buckets first). How the rebalancer evens out a
        # cluster with more data is tested in test_rebalance.py and by scripts/balance.py;
        # one file's eight whole fragments cannot be spread more evenly over ten buckets.
        await _start_healthy(more, local, procs, postgres_url)
        await wait_live(client, len(buckets) + len(more))
        new_ids = {(local[name].data / "bucket-id").read_text().strip() for name in more}
        await client.upload(src, "compose/second.bin")
        placed = {p["bucket"] for p in (await client.stat("compose/second.bin"))["parts"]}
        assert new_ids <= placed, (new_ids, placed)
        for name in ("compose/file.bin", "compose/second.bin"):
            await client.download(name, dst)
            assert dst.read_bytes() == src.read_bytes()

        # docker stop: SIGTERM, and each service exits cleanly well within its grace period.
        for name in reversed(local):
            await stop_process(procs[name])
            assert procs[name].returncode == 0, f"{name} exited with {procs[name].returncode}"
    finally:
        for proc in procs.values():
            await stop_process(proc)
