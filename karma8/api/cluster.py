"""The set of bucket servers the API server knows, and which of them are live.

Buckets announce themselves through heartbeats (see :mod:`karma8.rpc.membership`); a
bucket is live while its last heartbeat is younger than ``bucket_timeout``. Buckets known
from the registry but not heard from since this process started are not live. With
several API servers on one registry, a bucket heartbeats to one of them; every beat is
recorded in the registry at the database's clock, and :meth:`Cluster.sync` (every
heartbeat interval) brings in the beats the other servers received, so all servers see
the same live set within a heartbeat.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from karma8.config import ApiConfig
from karma8.core.records import Heartbeat, Usage
from karma8.errors import BucketUnavailable
from karma8.registry import BucketSpace, Registry
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import Portal
from karma8.rpc.buckets import BucketClient, connect_bucket

log = logging.getLogger(__name__)


@dataclass
class BucketState:
    """What the API server knows of one bucket."""

    bucket_id: str
    address: str
    usage: Usage
    last_seen: float  # trio clock; -inf: not heard from since start
    client: BucketClient | None = None


class Cluster:
    """Bucket membership and the gRPC clients of the buckets."""

    def __init__(
        self, registry: Registry, portal: Portal, config: ApiConfig, security: ChannelSecurity
    ) -> None:
        self._security = security  # the secret and TLS of every bucket channel
        self._registry = registry
        self._portal = portal
        self._config = config
        self._buckets: dict[str, BucketState] = {}
        #: When this process began to know the buckets (a bucket silent since then has
        #: been down at least that long).
        self._since = -math.inf
        #: Set (and replaced) at every heartbeat.
        self._beat = trio.Event()
        #: Called with the id of a bucket that (re-)registered (the reconciler listens).
        self.on_hello: Callable[[str], None] = lambda bucket_id: None

    async def load(self) -> None:
        """Learn the buckets the registry knows (not live until they heartbeat)."""
        self._since = trio.current_time()
        for row in await self._registry.buckets():
            usage = Usage(row.used, row.free, row.capacity, row.fragments)
            self._buckets[row.bucket_id] = BucketState(row.bucket_id, row.address, usage, -math.inf)

    async def on_heartbeat(self, beat: Heartbeat) -> float:
        """Record a heartbeat; return the interval the bucket should use next."""
        state = self._buckets.get(beat.bucket_id)
        if state is None or state.address != beat.address or state.client is None:
            state = await self._connect(beat)
        elif not self._is_live(state):
            log.info("bucket=%s is live again at %s", beat.bucket_id, beat.address)
        state.usage = beat.usage
        state.last_seen = trio.current_time()
        self._beat.set()
        self._beat = trio.Event()
        if beat.hello:
            self.on_hello(beat.bucket_id)
        await self._registry.upsert_bucket(beat)
        return self._config.heartbeat_interval

    async def sync(self) -> None:
        """Take in the heartbeats other API servers recorded in the registry since this
        process started (a beat to this server's previous run says little: the bucket may
        be backing off, and a restart waits for beats, see :meth:`settle`)."""
        now = trio.current_time()
        for row in await self._registry.buckets():
            seen = now - max(row.age, 0.0)
            if row.age >= self._config.bucket_timeout or seen < self._since:
                continue
            usage = Usage(row.used, row.free, row.capacity, row.fragments)
            state = self._buckets.get(row.bucket_id)
            if state is None or state.address != row.address or state.client is None:
                state = await self._connect(Heartbeat(row.bucket_id, row.address, usage, hello=False))
                state.last_seen = seen
                self.on_hello(row.bucket_id)  # joined, as far as this server can tell
            elif seen > state.last_seen:
                if not self._is_live(state):
                    log.info(
                        "bucket=%s is live again at %s (seen by another API server)",
                        row.bucket_id,
                        row.address,
                    )
                    self.on_hello(row.bucket_id)
                state.usage, state.last_seen = usage, seen

    async def _connect(self, beat: Heartbeat) -> BucketState:
        client = await connect_bucket(
            self._portal,
            beat.bucket_id,
            beat.address,
            close_timeout=self._config.connect_timeout,
            security=self._security,
            stream_window=self._config.grpc_stream_window,
            connection_window=self._config.grpc_connection_window,
            call_timeout=self._config.idle_timeout,
        )
        # Another heartbeat of the same bucket may have connected while we did.
        state = self._buckets.get(beat.bucket_id)
        if state is not None and state.address == beat.address and state.client is not None:
            await client.aclose()
            return state
        old = state.client if state is not None else None
        state = BucketState(beat.bucket_id, beat.address, beat.usage, trio.current_time(), client)
        self._buckets[beat.bucket_id] = state
        if old is not None:
            await old.aclose()
        log.info(
            "bucket=%s joined at %s (%d fragments, %d bytes free)",
            beat.bucket_id,
            beat.address,
            beat.usage.fragments,
            beat.usage.free,
        )
        return state

    async def settle(self, wanted: int) -> None:
        """Wait until ``wanted`` buckets are live, for at most ``bucket_timeout`` after this
        process began to know the buckets (after that, the ones not live are down).

        Right after a restart no bucket has beaten yet; an upload placed then would go to
        the first few to beat, with less protection than it could have.
        """
        with trio.move_on_at(self._since + self._config.bucket_timeout):
            while len(self.live()) < wanted:
                await self._beat.wait()

    def _is_live(self, state: BucketState) -> bool:
        return trio.current_time() - state.last_seen < self._config.bucket_timeout

    def is_live(self, bucket_id: str) -> bool:
        """True while the bucket heartbeats in time."""
        state = self._buckets.get(bucket_id)
        return state is not None and state.client is not None and self._is_live(state)

    def live(self) -> list[BucketSpace]:
        """Live buckets with their capacity and free space, by id (for placement)."""
        return [
            BucketSpace(s.bucket_id, s.usage.capacity, s.usage.free)
            for s in self.states()
            if self.is_live(s.bucket_id)
        ]

    def lost(self, after: float) -> list[str]:
        """Buckets not live for at least ``after`` seconds (counted from this process's
        start for a bucket not heard from since), by id."""
        now = trio.current_time()
        return [
            s.bucket_id
            for s in self.states()
            if not self.is_live(s.bucket_id) and now - max(s.last_seen, self._since) >= after
        ]

    def down_for(self, bucket_id: str) -> float:
        """Seconds since the bucket was last live (0 while it is)."""
        state = self._buckets.get(bucket_id)
        if state is None:
            return math.inf
        if self.is_live(bucket_id):
            return 0.0
        return trio.current_time() - max(state.last_seen, self._since)

    def capacities(self) -> dict[str, int]:
        """Live bucket id -> capacity (for rebalancing)."""
        return {b.bucket_id: b.capacity for b in self.live()}

    def client(self, bucket_id: str) -> BucketClient:
        """The client of a live bucket.

        Raises:
            BucketUnavailable: the bucket is unknown or not live.
        """
        state = self._buckets.get(bucket_id)
        if state is None or state.client is None or not self._is_live(state):
            raise BucketUnavailable(bucket_id, "not live")
        return state.client

    def address(self, bucket_id: str) -> str:
        """Last known address of a bucket ("" if unknown)."""
        state = self._buckets.get(bucket_id)
        return state.address if state is not None else ""

    def states(self) -> list[BucketState]:
        """Every known bucket, by id."""
        return sorted(self._buckets.values(), key=lambda s: s.bucket_id)

    async def aclose(self) -> None:
        """Close every bucket client."""
        for state in self._buckets.values():
            if state.client is not None:
                await state.client.aclose()
                state.client = None
