"""Composition root of a bucket server: store, gRPC server, heartbeats to the API."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import grpclib.client
import grpclib.const
import grpclib.exceptions

from karma8.bucket.service import BucketService
from karma8.bucket.store import FragmentStore, open_store
from karma8.config import BucketConfig
from karma8.errors import ConfigError
from karma8.rpc.auth import ChannelSecurity, attach_secret
from karma8.rpc.gen.karma8 import v1 as pb
from karma8.rpc.servers import start_grpc_server
from karma8.tls import bucket_tls

log = logging.getLogger(__name__)


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    """Atomically write ``info`` as JSON (for whoever waits for this process)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def heartbeat_forever(
    store: FragmentStore, config: BucketConfig, address: str, security: ChannelSecurity
) -> None:
    """Register with the API server, then heartbeat; retry with backoff when it is away.

    Beats carry ``security.secret``; with ``security.ssl`` they go over TLS.
    """
    host, _, port = config.api.rpartition(":")
    interval = config.heartbeat_interval
    backoff = 0.1
    hello = True
    reachable = True
    channel = grpclib.client.Channel(host.strip("[]"), int(port), ssl=security.ssl)
    attach_secret(channel, security.secret)
    try:
        stub = pb.MembershipStub(channel)
        while True:
            u = store.usage()
            beat = pb.Heartbeat(
                bucket_id=store.bucket_id,
                address=address,
                hello=hello,
                usage=pb.Usage(used=u.used, free=u.free, capacity=u.capacity, fragments=u.fragments),
            )
            try:
                reply = await stub.beat(beat, timeout=max(interval, 1.0))
            except (
                TimeoutError,
                OSError,
                grpclib.exceptions.GRPCError,
                grpclib.exceptions.StreamTerminatedError,
            ) as exc:
                if reachable:
                    refused = (
                        isinstance(exc, grpclib.exceptions.GRPCError)
                        and exc.status is grpclib.const.Status.UNAUTHENTICATED
                    )
                    log.warning(
                        "bucket=%s the API at %s %s (%s); retrying",
                        store.bucket_id,
                        config.api,
                        "refused our secret" if refused else "cannot be reached",
                        exc,
                    )
                reachable = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, config.retry_max)
                continue
            if hello or not reachable:
                log.info(
                    "bucket=%s registered with the API at %s as %s", store.bucket_id, config.api, address
                )
            hello, reachable, backoff = False, True, 0.1
            interval = reply.interval or interval
            await asyncio.sleep(interval)
    finally:
        channel.close()


async def serve_bucket(config: BucketConfig) -> None:
    """Run a bucket server until SIGINT/SIGTERM.

    Raises:
        ConfigError: no ``secret`` (and not ``insecure``), or unusable TLS files; both are
            checked before anything is created on disk.
    """
    secret = config.secret.get_secret_value()
    if not secret and not config.insecure:
        raise ConfigError(
            "[bucket] secret is not set: set it (KARMA8_BUCKET_SECRET) to the API server's "
            "bucket_secret, or set insecure = true to let anyone who reaches the port read and write"
        )
    tls = bucket_tls(config)
    store = await open_store(config.data_dir, capacity=config.capacity, fsync=config.fsync)
    service = BucketService(store, max_chunk=config.max_chunk, read_chunk_max=config.read_chunk_max)
    server, port = await start_grpc_server(
        [service],
        config.host,
        config.port,
        secret=secret,
        who=f"bucket={store.bucket_id}",
        ssl_context=tls.server,
    )
    address = f"{config.advertised_host}:{port}"
    log.info(
        "bucket=%s serving %s on %s:%d (%s)",
        store.bucket_id,
        config.data_dir,
        config.host,
        port,
        "TLS" if tls.server else "no TLS",
    )
    if not secret:
        log.warning(
            "bucket=%s insecure = true: no secret, anyone who reaches %s:%d can read and write",
            store.bucket_id,
            config.host,
            port,
        )
    if config.ready_file is not None:
        write_ready_file(config.ready_file, {"bucket_id": store.bucket_id, "port": port})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tasks:
            beats = tasks.create_task(
                heartbeat_forever(store, config, address, ChannelSecurity(secret, tls.heartbeat))
            )
            await stop.wait()
            log.info("bucket=%s shutting down", store.bucket_id)
            beats.cancel()
    finally:
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), config.shutdown_timeout)
        except TimeoutError:
            log.warning("bucket=%s calls still running at shutdown were dropped", store.bucket_id)


def run_bucket(config: BucketConfig) -> None:
    """Entry point of ``karma8 bucket``."""
    from karma8.rpc.bridge import new_event_loop

    loop = new_event_loop(config.uvloop)
    try:
        loop.run_until_complete(serve_bucket(config))
    finally:
        loop.close()
