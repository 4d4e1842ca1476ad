"""The standard gRPC health service (``grpc.health.v1.Health``) and a client check of it.

A server holds one :class:`HealthState` for the whole process (the empty service name)
and its services; :class:`HealthService` reports it through ``Check``, ``List`` and
``Watch``. Health calls need no shared secret (see :mod:`karma8.rpc.auth`), so container
probes can make them. Everything here runs on the asyncio side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpclib.client
import grpclib.exceptions
from grpclib import GRPCError
from grpclib.const import Status

from karma8.errors import Karma8Error
from karma8.rpc.gen.grpc.health import v1 as pb

ServingStatus = pb.HealthCheckResponseServingStatus


class Unhealthy(Karma8Error):
    """A health check did not find the server serving (or could not ask it)."""

    code = "unhealthy"


class HealthState:
    """The serving status of one server: the process ("") and each of its services."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = frozenset(("", *services))
        self._status = ServingStatus.NOT_SERVING
        # Set (and replaced) on every change; Watch calls wait on it.
        self._changed = asyncio.Event()

    @property
    def status(self) -> ServingStatus:
        return self._status

    def current(self) -> tuple[ServingStatus, asyncio.Event]:
        """The status now, and an event set by the next change."""
        return self._status, self._changed

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING, for every service at once."""
        status = ServingStatus.SERVING if serving else ServingStatus.NOT_SERVING
        if status != self._status:
            self._status = status
            self._changed.set()
            self._changed = asyncio.Event()


class HealthService(pb.HealthBase):
    """``grpc.health.v1.Health`` over a :class:`HealthState`."""

    def __init__(self, state: HealthState) -> None:
        self._state = state

    async def check(self, message: pb.HealthCheckRequest) -> pb.HealthCheckResponse:
        if message.service not in self._state.services:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {message.service[:200]!r}")
        return pb.HealthCheckResponse(status=self._state.status)

    async def list(self, message: pb.HealthListRequest) -> pb.HealthListResponse:
        status = self._state.status
        return pb.HealthListResponse(
            statuses={s: pb.HealthCheckResponse(status=status) for s in sorted(self._state.services)}
        )

    async def watch(self, message: pb.HealthCheckRequest) -> AsyncIterator[pb.HealthCheckResponse]:
        if message.service not in self._state.services:
            # The standard asks to keep the call open; our services never change.
            yield pb.HealthCheckResponse(status=ServingStatus.SERVICE_UNKNOWN)
            await asyncio.Event().wait()
        while True:
            # Taken before the reply goes out: a change while it is sent is not missed.
            status, changed = self._state.current()
            yield pb.HealthCheckResponse(status=status)
            await changed.wait()


async def check_health(host: str, port: int, service: str = "") -> str:
    """Ask ``host:port`` for the status of ``service`` ("": the whole server).

    Returns the status name (``SERVING``, ``NOT_SERVING``, ...). The caller bounds the
    time it may take.

    Raises:
        Unhealthy: the server cannot be reached, has no health service or does not know
            ``service``.
    """
    channel = grpclib.client.Channel(host, port)
    try:
        reply = await pb.HealthStub(channel).check(pb.HealthCheckRequest(service=service))
    except GRPCError as exc:
        raise Unhealthy(exc.status.name + (f": {exc.message}" if exc.message else "")) from None
    except OSError as exc:
        raise Unhealthy(f"cannot connect ({exc.strerror or exc})") from None
    except grpclib.exceptions.StreamTerminatedError as exc:
        raise Unhealthy(f"connection lost ({exc})") from None
    finally:
        channel.close()
    return reply.status.name
