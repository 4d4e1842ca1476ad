"""Composition root of the API server: everything is built here from the config."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio
from prometheus_client import CollectorRegistry

from karma8 import speedups, wsfix
from karma8.api.cluster import Cluster
from karma8.api.coordination import Coordinator, JobLeases
from karma8.api.janitor import Janitor, ReadLeases
from karma8.api.listener import ListenerSettings, serve_websockets
from karma8.api.metrics import MEMBERSHIP, METRICS_HTTP, WEBSOCKET, ApiMetrics, BucketSample
from karma8.api.rebalance import Rebalancer
from karma8.api.reconcile import Reconciler
from karma8.api.repair import Repairer
from karma8.api.server import ApiHandler
from karma8.api.session import Services
from karma8.config import ApiConfig
from karma8.errors import ConfigError
from karma8.metrics_http import start_endpoint
from karma8.registry import open_registry
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import open_portal
from karma8.rpc.membership import serve_membership
from karma8.tls import ApiTls, api_tls

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiEndpoints:
    """Where a running API server listens (the real ports, also when 0 was asked)."""

    host: str
    port: int
    membership_port: int
    tls: bool = False
    #: The /metrics, /healthz, /ready port; None when the default one was taken.
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"


class _Readiness:
    """What ``/ready`` reports; read on the trio thread (see :func:`_from_trio`)."""

    def __init__(self, parts: int) -> None:
        self._parts = parts
        self.cluster: Cluster | None = None
        self.stopping = False

    def not_ready(self) -> str | None:
        """None when ready, else why not (one line)."""
        if self.stopping:
            return "shutting down"
        if self.cluster is None:
            return "the registry is not open yet"
        live = len(self.cluster.live())
        if live < self._parts:
            return f"{live} live bucket(s), {self._parts} needed to store a file"
        return None


def _from_trio(token: trio.lowlevel.TrioToken, fn: Callable[[], T], default: T) -> T:
    """Run ``fn`` on the trio thread, from a scrape thread; ``default`` once trio is gone."""
    try:
        return trio.from_thread.run_sync(fn, trio_token=token)
    except trio.RunFinishedError:
        return default


async def serve_api(
    config: ApiConfig, *, task_status: trio.TaskStatus[ApiEndpoints] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the API server until cancelled; ``started()`` gets its endpoints.

    Raises:
        ConfigError: no ``bucket_secret`` (and not ``insecure``), unusable TLS files, or a
            configured metrics port that is in use.
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
    metrics = ApiMetrics(CollectorRegistry())
    readiness = _Readiness(config.parts)
    token = trio.lowlevel.current_trio_token()

    def not_ready() -> str | None:  # called on a scrape thread
        stopped: str | None = "shutting down"
        return _from_trio(token, readiness.not_ready, stopped)

    # Up before the registry opens (a restart's recovery can take a while): /ready says so.
    endpoint = start_endpoint(
        config.metrics_host,
        config.metrics_port,
        metrics.registry,
        not_ready,
        required="metrics_port" in config.model_fields_set,
        who="API server",
        on_error=metrics.connection_errors.labels(METRICS_HTTP).inc,
    )
    try:
        await _serve(
            config,
            secret,
            tls,
            metrics,
            readiness,
            endpoint.port if endpoint is not None else None,
            task_status,
        )
    finally:
        readiness.stopping = True
        if endpoint is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(endpoint.close)


async def _serve(
    config: ApiConfig,
    secret: str,
    tls: ApiTls,
    metrics: ApiMetrics,
    readiness: _Readiness,
    metrics_port: int | None,
    task_status: trio.TaskStatus[ApiEndpoints],
) -> None:
    token = trio.lowlevel.current_trio_token()
    async with (
        open_registry(config.registry, config.server_name) as registry,
        open_portal(use_uvloop=config.uvloop) as portal,
    ):
        interrupted, abandoned = await registry.start_server(f"{config.host}:{config.port}")
        if interrupted:
            log.warning(
                "%d upload(s) were interrupted by a restart; their fragments will be deleted", interrupted
            )
        if abandoned:
            log.warning(
                "%d fragment move(s) were interrupted by a restart; their copies will be deleted", abandoned
            )
        cluster = Cluster(registry, portal, config, ChannelSecurity(secret, tls.buckets))
        await cluster.load()

        def bucket_samples() -> list[BucketSample]:
            return [
                BucketSample(s.bucket_id, cluster.is_live(s.bucket_id), s.usage) for s in cluster.states()
            ]

        metrics.watch_buckets(lambda: _from_trio(token, bucket_samples, []))
        leases = ReadLeases()
        janitor = Janitor(
            registry,
            cluster,
            leases,
            config.janitor_interval,
            config.rpc_timeout,
            config.janitor_concurrency,
            metrics,
            # Longer than another server takes to publish a download it began.
            grace=2 * config.heartbeat_interval + 1.0,
        )
        reconciler = Reconciler(registry, cluster, config, metrics)
        rebalancer = Rebalancer(registry, cluster, janitor, config, metrics=metrics)
        repairer = Repairer(registry, cluster, janitor, leases, config, metrics)
        reconciler.on_damage = repairer.poke
        # Each background job runs on the server holding its lease (docs/scaling.md).
        jobs = JobLeases(registry, config.job_lease)
        coordinator = Coordinator(
            registry, cluster, jobs, leases.reading, config, f"{config.host}:{config.port}"
        )
        janitor.active = functools.partial(jobs.holds, "janitor")
        janitor.shared = lambda: coordinator.others > 0
        reconciler.active = functools.partial(jobs.holds, "reconciler")
        rebalancer.active = functools.partial(jobs.holds, "rebalancer")
        rebalancer.fence = functools.partial(jobs.fence, "rebalancer")
        repairer.active = functools.partial(jobs.holds, "repair")
        repairer.fence = functools.partial(jobs.fence, "repair")

        def acquired(job: str) -> None:
            if job == "janitor":
                janitor.poke()
            elif job == "rebalancer":
                rebalancer.wake()
            elif job == "reconciler":
                for bucket in cluster.live():
                    reconciler.request(bucket.bucket_id)
            elif job == "repair":
                repairer.poke()

        jobs.on_acquired = acquired
        await coordinator.beat()  # leases taken (or not) before the jobs start

        def on_hello(bucket_id: str) -> None:
            reconciler.request(bucket_id)
            rebalancer.joined(bucket_id)
            repairer.joined()

        cluster.on_hello = on_hello
        handler = ApiHandler(
            Services(config, registry, cluster, janitor, leases, reconciler, rebalancer, repairer, metrics)
        )
        try:
            readiness.cluster = cluster
            async with trio.open_nursery() as nursery:
                membership_port = await nursery.start(
                    functools.partial(
                        serve_membership,
                        portal,
                        config.membership_host,
                        config.membership_port,
                        cluster.on_heartbeat,
                        on_error=metrics.connection_errors.labels(MEMBERSHIP).inc,
                        secret=secret,
                        ssl_context=tls.membership,
                        reuse_port=config.share_ports,
                    )
                )
                port = await nursery.start(
                    serve_websockets,
                    handler.handle,
                    config.host,
                    config.port,
                    tls.websocket,
                    ListenerSettings(
                        config.max_frame, config.receive_buffer, config.handshake_timeout, config.share_ports
                    ),
                    metrics.connection_errors.labels(WEBSOCKET).inc,
                )
                nursery.start_soon(coordinator.run)
                nursery.start_soon(janitor.run)
                nursery.start_soon(reconciler.run)
                nursery.start_soon(rebalancer.run)
                await nursery.start(repairer.serve)
                endpoints = ApiEndpoints(
                    config.host,
                    port,
                    membership_port,
                    tls=tls.websocket is not None,
                    metrics_port=metrics_port,
                )
                log.info(
                    "API server listening on %s (buckets register at %s:%d), %s",
                    endpoints.url,
                    config.membership_host,
                    membership_port,
                    "no metrics endpoint"
                    if metrics_port is None
                    else f"metrics on http://{config.metrics_host}:{metrics_port}/metrics",
                )
                if config.ready_file is not None:
                    _write_ready(config, endpoints)
                task_status.started(endpoints)
        finally:
            readiness.stopping = True
            with trio.CancelScope(shield=True):
                with trio.move_on_after(config.handshake_timeout):
                    await jobs.release()  # another server takes the jobs at once
                await cluster.aclose()


def _write_ready(config: ApiConfig, endpoints: ApiEndpoints) -> None:
    assert config.ready_file is not None
    tmp = config.ready_file.with_name(config.ready_file.name + ".tmp")
    tmp.write_text(
        json.dumps(
            {
                "port": endpoints.port,
                "membership_port": endpoints.membership_port,
                "metrics_port": endpoints.metrics_port,
            }
        )
    )
    tmp.replace(config.ready_file)
