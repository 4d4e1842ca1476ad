"""``karma8 api --workers N``: N API processes on one host, one port, one registry.

One Python process uses one core (the GIL), so an API server on a machine with more
cores runs as several processes. They bind the same WebSocket and membership ports with
``SO_REUSEPORT`` (the kernel spreads connections over them) and share the registry like
API servers on different hosts (docs/scaling.md): each is a server of its own, named
``SERVER_ID/wI``, and background jobs run on whichever holds their lease. Each worker has
its own metrics port (``metrics_port + I``; 0 stays 0).

This process only supervises: it picks the shared ports (holding them, so that nothing
else takes them, until it exits), starts the workers, restarts one that exits (the same
schedule as ``karma8 up``), and stops them all on SIGINT/SIGTERM. A worker stops by
itself when its supervisor is gone (:func:`serve_worker`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import trio

from karma8.config import ApiConfig, StackConfig
from karma8.stack import Child, Supervisor

log = logging.getLogger(__name__)


async def serve_worker(config: ApiConfig) -> None:
    """Serve as one worker of ``--workers`` until cancelled or the supervisor is gone.

    A worker whose supervisor was killed (SIGKILL skips its cleanup) would keep the port
    forever; it notices that its parent changed (``getppid``) within a second and stops.
    (``PR_SET_PDEATHSIG`` does not fit: it fires when the *thread* that started the child
    exits, and trio starts processes from worker threads that come and go.)
    """
    from karma8.api.app import serve_api

    parent = os.getppid()
    async with trio.open_nursery() as nursery:

        async def orphaned() -> None:
            while os.getppid() == parent:  # noqa: ASYNC110  (no event tells a parent died)
                await trio.sleep(1.0)
            log.warning("the supervisor (pid %d) is gone; stopping", parent)
            nursery.cancel_scope.cancel()

        nursery.start_soon(orphaned)
        await serve_api(config)
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _reserved(host: str, port: int) -> Iterator[int]:
    """Bind ``host:port`` (0: a free port) with SO_REUSEPORT and hold it: the workers bind
    it too, and nothing else can take it meanwhile. This socket never listens, so it gets
    no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield int(sock.getsockname()[1])


async def run_workers(
    config: ApiConfig,
    config_file: Path | None,
    log_level: str,
    log_format: str,
    *,
    task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``config.workers`` API processes until cancelled; ``started()`` gets the ports."""
    base = config.server_name
    with (
        _reserved(config.host, config.port) as port,
        _reserved(config.membership_host, config.membership_port) as membership_port,
    ):
        env = {**os.environ, "KARMA8_API_SHARE_PORTS": "true"}
        sup = Supervisor(StackConfig(), log_level, config_file, env, log_format)
        workers = [
            Child(
                f"api worker {i}",
                [
                    "api",
                    "--workers",
                    "1",
                    "--server-id",
                    f"{base}/w{i}",
                    "--host",
                    config.host,
                    "--port",
                    str(port),
                    "--membership-port",
                    str(membership_port),
                    "--metrics-port",
                    str(config.metrics_port + i if config.metrics_port else 0),
                    "--data-dir",
                    str(config.data_dir),
                ],
                _worker_ready(config, i),
            )
            for i in range(config.workers)
        ]
        try:
            for child in workers:  # one at a time: the first migrates the registry alone
                await sup.start(child)
            info: dict[str, object] = {
                "port": port,
                "membership_port": membership_port,
                "metrics_port": workers[0].info.get("metrics_port"),
                "workers": config.workers,
            }
            if config.ready_file is not None:
                tmp = config.ready_file.with_name(config.ready_file.name + ".tmp")
                tmp.write_text(json.dumps(info))
                tmp.replace(config.ready_file)
            log.info(
                "%d API workers on port %d (buckets register at %d)", config.workers, port, membership_port
            )
            task_status.started(info)
            async with trio.open_nursery() as nursery:
                for child in workers:
                    nursery.start_soon(sup.keep, child)
        finally:
            await sup.stop()


def _worker_ready(config: ApiConfig, i: int) -> Path:
    if config.ready_file is not None:
        return config.ready_file.with_name(f"{config.ready_file.name}.w{i}")
    return config.data_dir / f".worker-{i}.ready"
