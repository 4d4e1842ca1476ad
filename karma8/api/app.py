"""Composition root of the API server: everything is built here from the config."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import trio
from trio_websocket import serve_websocket

from karma8 import speedups, wsfix
from karma8.api.cluster import Cluster
from karma8.api.janitor import Janitor, ReadLeases
from karma8.api.rebalance import Rebalancer
from karma8.api.reconcile import Reconciler
from karma8.api.server import ApiHandler
from karma8.api.session import Services
from karma8.config import ApiConfig
from karma8.errors import ConfigError
from karma8.registry import open_registry
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import open_portal
from karma8.rpc.membership import serve_membership
from karma8.tls import api_tls

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApiEndpoints:
    """Where a running API server listens (the real ports, also when 0 was asked)."""

    host: str
    port: int
    membership_port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"


async def serve_api(
    config: ApiConfig, *, task_status: trio.TaskStatus[ApiEndpoints] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the API server until cancelled; ``started()`` gets its endpoints.

    Raises:
        ConfigError: no ``bucket_secret`` (and not ``insecure``), or unusable TLS files.
    """
    secret = config.bucket_secret.get_secret_value()
    if not secret and not config.insecure:
        raise ConfigError(
            "[api] bucket_secret is not set: set it (KARMA8_API_BUCKET_SECRET) to the buckets' "
            "secret, or set insecure = true to accept any bucket"
        )
    if not secret:
        log.warning("insecure = true: buckets are not authenticated, anyone can register one")
    tls = api_tls(config)
    wsfix.apply()
    speedups.apply()
    speedups.apply_websocket()
    async with (
        open_registry(config.registry_path) as registry,
        open_portal(use_uvloop=config.uvloop) as portal,
    ):
        interrupted = await registry.fail_all_in_progress()
        if interrupted:
            log.warning(
                "%d upload(s) were interrupted by a restart; their fragments will be deleted", interrupted
            )
        abandoned = await registry.abandon_all_moves()
        if abandoned:
            log.warning(
                "%d fragment move(s) were interrupted by a restart; their copies will be deleted", abandoned
            )
        cluster = Cluster(registry, portal, config, ChannelSecurity(secret, tls.buckets))
        await cluster.load()
        leases = ReadLeases()
        janitor = Janitor(
            registry, cluster, leases, config.janitor_interval, config.rpc_timeout, config.janitor_concurrency
        )
        reconciler = Reconciler(registry, cluster, config)
        rebalancer = Rebalancer(registry, cluster, janitor, config)

        def on_hello(bucket_id: str) -> None:
            reconciler.request(bucket_id)
            rebalancer.joined(bucket_id)

        cluster.on_hello = on_hello
        handler = ApiHandler(Services(config, registry, cluster, janitor, leases, reconciler, rebalancer))
        try:
            async with trio.open_nursery() as nursery:
                membership_port = await nursery.start(
                    functools.partial(
                        serve_membership,
                        portal,
                        config.membership_host,
                        config.membership_port,
                        cluster.on_heartbeat,
                        secret=secret,
                        ssl_context=tls.membership,
                    )
                )
                server = await nursery.start(
                    functools.partial(
                        serve_websocket,
                        handler.handle,
                        config.host,
                        config.port,
                        tls.websocket,
                        max_message_size=config.max_frame,
                        receive_buffer_size=config.receive_buffer,
                        connect_timeout=config.handshake_timeout,
                        disconnect_timeout=config.handshake_timeout,
                    )
                )
                nursery.start_soon(janitor.run)
                nursery.start_soon(reconciler.run)
                nursery.start_soon(rebalancer.run)
                endpoints = ApiEndpoints(
                    config.host, server.port, membership_port, tls=tls.websocket is not None
                )
                log.info(
                    "API server listening on %s (buckets register at %s:%d)",
                    endpoints.url,
                    config.membership_host,
                    membership_port,
                )
                if config.ready_file is not None:
                    _write_ready(config, endpoints)
                task_status.started(endpoints)
        finally:
            with trio.CancelScope(shield=True):
                await cluster.aclose()


def _write_ready(config: ApiConfig, endpoints: ApiEndpoints) -> None:
    assert config.ready_file is not None
    tmp = config.ready_file.with_name(config.ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"port": endpoints.port, "membership_port": endpoints.membership_port}))
    tmp.replace(config.ready_file)
