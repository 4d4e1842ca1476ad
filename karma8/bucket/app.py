"""Composition root of a bucket server: store, gRPC server, heartbeats to the API."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path

import grpclib.client
import grpclib.const
import grpclib.exceptions
from prometheus_client import CollectorRegistry

from karma8.bucket.metrics import BucketMetrics
from karma8.bucket.service import SERVICE_NAME, BucketService
from karma8.bucket.store import FragmentStore, open_store
from karma8.config import WILDCARD_HOSTS, BucketConfig
from karma8.errors import ConfigError
from karma8.metrics_http import HttpEndpoint, start_endpoint
from karma8.rpc.auth import ChannelSecurity, attach_secret
from karma8.rpc.gen.karma8 import v1 as pb
from karma8.rpc.health import HealthService, HealthState
from karma8.rpc.servers import start_grpc_server
from karma8.tls import BucketTls, bucket_tls

log = logging.getLogger(__name__)


class Readiness:
    """What ``/ready`` reports. Changed on the event loop, read by the HTTP threads."""

    def __init__(self, api: str) -> None:
        self._api = api
        self.store_open = False
        self.stopping = False
        #: The API acknowledged the last heartbeat; None: no answer yet.
        self.registered: bool | None = None
        self.problem = ""

    def not_ready(self) -> str | None:
        """None when ready, else why not (one line)."""
        if self.stopping:
            return "shutting down"
        if not self.store_open:
            return "the fragment store is not open yet"
        if self.registered is None:
            return f"no heartbeat acknowledged yet by the API at {self._api}"
        if not self.registered:
            return f"the API at {self._api} {self.problem}"
        return None


def local_address_towards(api: str) -> str | None:
    """The local IP address this host uses to reach ``api`` (``host:port``), or None.

    A UDP socket "connected" to the API makes the kernel pick the route and the source
    address; nothing is sent.
    """
    host, _, port = api.rpartition(":")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except (OSError, ValueError, IndexError):
        return None


async def _advertised_host(config: BucketConfig) -> str:
    """The host the API should dial: ``advertise_host``, the bound address, or, when bound
    to every address, the address of the interface that reaches the API (127.0.0.1 would
    be unreachable from another host, yet the API would count the bucket live)."""
    if config.advertise_host or config.host not in WILDCARD_HOSTS:
        return config.advertised_host
    found = await asyncio.to_thread(local_address_towards, config.apis[0])
    return found or config.advertised_host


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    """Atomically write ``info`` as JSON (for whoever waits for this process)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def heartbeat_forever(
    store: FragmentStore,
    config: BucketConfig,
    address: str,
    security: ChannelSecurity,
    readiness: Readiness,
    metrics: BucketMetrics,
) -> None:
    """Register with an API server, then heartbeat; retry with backoff when it is away.

    With several API servers (``config.apis``, sharing one registry), beats go to one of
    them; when it fails, the next one gets the next beat (a hello, as to any server that
    has not heard from us). Beats carry ``security.secret``; with ``security.ssl`` they go
    over TLS. Whether the last one was acknowledged goes to ``readiness``; failures are
    counted in ``metrics``.
    """
    apis = config.apis
    interval = config.heartbeat_interval
    backoff = 0.1
    hello = True
    reachable = True
    current = 0
    channel: grpclib.client.Channel | None = None
    try:
        while True:
            api = apis[current]
            if channel is None:
                host, _, port = api.rpartition(":")
                channel = grpclib.client.Channel(host.strip("[]"), int(port), ssl=security.ssl)
                attach_secret(channel, security.secret)
            u = store.usage()
            beat = pb.Heartbeat(
                bucket_id=store.bucket_id,
                address=address,
                hello=hello,
                usage=pb.Usage(used=u.used, free=u.free, capacity=u.capacity, fragments=u.fragments),
            )
            try:
                reply = await pb.MembershipStub(channel).beat(beat, timeout=max(interval, 1.0))
            except (
                TimeoutError,
                OSError,
                grpclib.exceptions.GRPCError,
                grpclib.exceptions.StreamTerminatedError,
            ) as exc:
                refused = (
                    isinstance(exc, grpclib.exceptions.GRPCError)
                    and exc.status is grpclib.const.Status.UNAUTHENTICATED
                )
                problem = "refused our secret" if refused else "cannot be reached"
                if reachable:
                    log.warning(
                        "bucket=%s the API at %s %s (%s); retrying", store.bucket_id, api, problem, exc
                    )
                reachable = False
                readiness.registered, readiness.problem = False, problem
                metrics.heartbeat_failures.inc()
                if len(apis) > 1:
                    channel.close()
                    channel, current, hello = None, (current + 1) % len(apis), True
                    if current:  # went round the list once: back off before the next round
                        continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, config.retry_max)
                continue
            if hello or not reachable:
                log.info("bucket=%s registered with the API at %s as %s", store.bucket_id, api, address)
            hello, reachable, backoff = False, True, 0.1
            readiness.registered = True
            interval = reply.interval or interval
            await asyncio.sleep(interval)
    finally:
        if channel is not None:
            channel.close()


async def compact_forever(store: FragmentStore, config: BucketConfig) -> None:
    """Every ``compact_interval``, compact the sealed volumes that are ``compact_garbage`` dead."""
    while True:
        await asyncio.sleep(config.compact_interval)
        try:
            reclaimed = await store.compact(config.compact_garbage)
        except OSError as exc:  # a full disk, say: the volumes stay as they are, whole
            log.error("bucket=%s compaction failed: %s", store.bucket_id, exc)
            continue
        if reclaimed:
            log.info("bucket=%s compaction reclaimed %d bytes", store.bucket_id, reclaimed)


async def serve_bucket(config: BucketConfig) -> None:
    """Run a bucket server until SIGINT/SIGTERM.

    Raises:
        ConfigError: no ``secret`` (and not ``insecure``), unusable TLS files, or a
            configured metrics port that is in use; all three are found before anything
            is created on disk.
    """
    secret = config.secret.get_secret_value()
    if not secret and not config.insecure:
        raise ConfigError(
            "[bucket] secret is not set: set it (KARMA8_BUCKET_SECRET) to the API server's "
            "bucket_secret, or set insecure = true to let anyone who reaches the port read and write"
        )
    tls = bucket_tls(config)
    registry = CollectorRegistry()
    metrics = BucketMetrics(registry)
    readiness = Readiness(config.api)
    metrics.registered.set_function(lambda: float(readiness.registered is True))
    # Up before the store opens (its scan can take long): /ready says why it is not ready.
    endpoint = start_endpoint(
        config.metrics_host,
        config.metrics_port,
        registry,
        readiness.not_ready,
        required="metrics_port" in config.model_fields_set,
        who="bucket",
        on_error=metrics.metrics_http_errors.inc,
    )
    try:
        await _serve(config, secret, tls, metrics, readiness, endpoint)
    finally:
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)


async def _serve(
    config: BucketConfig,
    secret: str,
    tls: BucketTls,
    metrics: BucketMetrics,
    readiness: Readiness,
    endpoint: HttpEndpoint | None,
) -> None:
    store = await open_store(
        config.data_dir, capacity=config.capacity, fsync=config.fsync, volume_size=config.volume_size
    )
    metrics.watch_store(store)
    readiness.store_open = True
    service = BucketService(
        store,
        max_chunk=config.max_chunk,
        read_chunk_max=config.read_chunk_max,
        metrics=metrics,
        idle_timeout=config.idle_timeout,
    )
    health = HealthState([SERVICE_NAME])
    server, port = await start_grpc_server(
        [service, HealthService(health)],
        config.host,
        config.port,
        secret=secret,
        who=f"bucket={store.bucket_id}",
        ssl_context=tls.server,
    )
    health.set_serving(True)
    metrics_port = endpoint.port if endpoint is not None else None
    address = f"{await _advertised_host(config)}:{port}"
    log.info(
        "bucket=%s serving %s on %s:%d (%s), %s",
        store.bucket_id,
        config.data_dir,
        config.host,
        port,
        "TLS" if tls.server else "no TLS",
        "no metrics endpoint"
        if metrics_port is None
        else f"metrics on http://{config.metrics_host}:{metrics_port}/metrics",
    )
    if not secret:
        log.warning(
            "bucket=%s insecure = true: no secret, anyone who reaches %s:%d can read and write",
            store.bucket_id,
            config.host,
            port,
        )
    if config.ready_file is not None:
        write_ready_file(
            config.ready_file, {"bucket_id": store.bucket_id, "port": port, "metrics_port": metrics_port}
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tasks:
            beats = tasks.create_task(
                heartbeat_forever(
                    store, config, address, ChannelSecurity(secret, tls.heartbeat), readiness, metrics
                )
            )
            compaction = tasks.create_task(compact_forever(store, config))
            await stop.wait()
            log.info("bucket=%s shutting down", store.bucket_id)
            beats.cancel()
            compaction.cancel()
    finally:
        readiness.stopping = True
        health.set_serving(False)
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), config.shutdown_timeout)
        except TimeoutError:
            log.warning("bucket=%s calls still running at shutdown were dropped", store.bucket_id)
        store.close()


def run_bucket(config: BucketConfig) -> None:
    """Entry point of ``karma8 bucket``."""
    from karma8.rpc.bridge import new_event_loop

    loop = new_event_loop(config.uvloop)
    try:
        loop.run_until_complete(serve_bucket(config))
    finally:
        loop.close()
