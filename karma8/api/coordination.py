"""This API server's part in sharing one registry with others (docs/scaling.md).

Every heartbeat interval, :meth:`Coordinator.run` records this server alive, reaps the
servers silent for ``server_timeout`` (their uploads in progress fail, their moves are
abandoned), takes in the bucket heartbeats the others received (:meth:`Cluster.sync`),
publishes the uploads this server's downloads read (so no other janitor deletes them),
fails its own uploads whose commit or cleanup could not reach the registry,
and takes or renews the leases of the background jobs (:class:`JobLeases`): the janitor,
the rebalancer, reconciliation and repair each run on one server at a time, and move to
another within ``job_lease`` seconds when it dies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from karma8.api.cluster import Cluster
from karma8.config import ApiConfig
from karma8.errors import RegistryUnavailable
from karma8.registry import Registry
from karma8.registry.leases import JOBS, Fence

log = logging.getLogger(__name__)


class JobLeases:
    """The jobs whose lease this server holds, with the epoch to fence their writes."""

    def __init__(self, registry: Registry, ttl: float) -> None:
        self._registry = registry
        self._ttl = ttl
        self._held: dict[str, Fence] = {}
        #: Called with a job's name when this server takes its lease.
        self.on_acquired: Callable[[str], None] = lambda job: None

    def fence(self, job: str) -> Fence | None:
        """The lease held on ``job`` (None: another server runs it)."""
        return self._held.get(job)

    def holds(self, job: str) -> bool:
        return job in self._held

    async def renew(self) -> None:
        """Take or renew every job's lease; a lease that could not be renewed is let go."""
        for job in JOBS:
            try:
                epoch = await self._registry.hold_lease(job, self._ttl)
            except RegistryUnavailable:
                epoch = None  # it will lapse anyway: stop before another server can take it
            before = self._held.get(job)
            if epoch is None:
                if before is not None:
                    log.warning("lost the lease on %s (epoch %d)", job, before.epoch)
                    del self._held[job]
                continue
            self._held[job] = Fence(job, epoch)
            if before is None or before.epoch != epoch:
                log.info("holding the lease on %s (epoch %d)", job, epoch)
                self.on_acquired(job)

    async def release(self) -> None:
        """Give every lease up (stopping): another server takes the jobs at once."""
        for job in list(self._held):
            del self._held[job]
            try:
                await self._registry.release_lease(job)
            except RegistryUnavailable:
                return


class Coordinator:
    """Runs this server's heartbeat in the registry and what goes with it."""

    def __init__(
        self,
        registry: Registry,
        cluster: Cluster,
        jobs: JobLeases,
        reading: Callable[[], set[str]],
        config: ApiConfig,
        address: str,
    ) -> None:
        self._registry = registry
        self._cluster = cluster
        self._jobs = jobs
        self._reading = reading
        self._config = config
        self._address = address
        #: Other servers heard from within ``server_timeout`` (their downloads may read
        #: uploads this server's janitor is about to delete).
        self.others = 0

    async def beat(self) -> None:
        """One round (also run once at start, before the server takes requests)."""
        registry, config = self._registry, self._config
        await registry.server_alive(self._address)
        for server, uploads, moves in await registry.reap_servers(config.server_timeout):
            log.warning(
                "API server %s silent for %g s: %d upload(s) it had in progress failed, %d move(s) abandoned",
                server,
                config.server_timeout,
                uploads,
                moves,
            )
        servers = await registry.servers()
        self.others = sum(1 for _, _, age in servers if age < config.server_timeout) - 1
        await self._cluster.sync()
        await registry.publish_reads(self._reading())
        abandoned = await registry.fail_abandoned(older_than=10.0)
        if abandoned:
            log.warning("%d upload(s) whose end the registry missed are failed now", abandoned)
        await self._jobs.renew()

    async def run(self) -> None:
        """Forever, every heartbeat interval; the registry being away is logged once."""
        reachable = True
        while True:
            await trio.sleep(self._config.heartbeat_interval)
            try:
                await self.beat()
                reachable = True
            except RegistryUnavailable as exc:
                if reachable:
                    log.warning("registry unavailable: %s", exc.message)
                reachable = False
                await self._jobs.renew()  # lets the leases go: they cannot be renewed
