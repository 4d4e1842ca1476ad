"""What every WebSocket session handler gets: its connection, context and services."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from trio_websocket import WebSocketConnection

from karma8.api.cluster import Cluster
from karma8.api.janitor import Janitor, ReadLeases
from karma8.api.metrics import ApiMetrics
from karma8.api.pool import Limits
from karma8.api.rebalance import Rebalancer
from karma8.api.reconcile import Reconciler
from karma8.api.repair import Repairer
from karma8.api.streams import bucket_step, open_bucket_stream
from karma8.config import ApiConfig
from karma8.errors import BadRequest, Timeout
from karma8.registry import Registry
from karma8.rpc.buckets import BucketClient

T = TypeVar("T")


@dataclass
class Services:
    """The long-lived components sessions use (built once in the composition root)."""

    config: ApiConfig
    registry: Registry
    cluster: Cluster
    janitor: Janitor
    leases: ReadLeases
    reconciler: Reconciler
    rebalancer: Rebalancer
    repairer: Repairer
    metrics: ApiMetrics


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Starts every line of a session with its context: ``session=N``, then ``upload=ID``
    once the session knows which upload it serves (karma8/logs.py turns both into fields).
    """

    def __init__(self, logger: logging.Logger, session_id: int) -> None:
        super().__init__(logger, {"session": session_id})
        self.session_id = session_id
        #: The upload the session writes or reads ("" until known).
        self.upload_id = ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        context = f"session={self.session_id}"
        if self.upload_id:
            context += f" upload={self.upload_id}"
        return f"{context} {msg}", kwargs


@dataclass
class Session:
    """One WebSocket connection being served (one operation, or several in a session)."""

    ws: WebSocketConnection
    services: Services
    session_id: int
    log: SessionLog
    #: File bytes that crossed the WebSocket so far (the edge counts them when it ends).
    transferred: int = 0
    #: Frames sent so far (of the current operation, in a session).
    frames: int = 0

    @property
    def config(self) -> ApiConfig:
        return self.services.config

    @property
    def limits(self) -> Limits:
        """Deadlines and sizes of this session's fragment transfers."""
        return Limits.of(self.config)

    async def receive(self) -> str | bytes:
        """The client's next frame, within the idle timeout."""
        try:
            with trio.fail_after(self.config.idle_timeout):
                return await self.ws.get_message()
        except trio.TooSlowError:
            raise Timeout(f"nothing received for {self.config.idle_timeout:g} s") from None

    async def receive_data(self) -> bytes:
        """The next binary frame of an upload."""
        message = await self.receive()
        if isinstance(message, str):
            raise BadRequest("text frame in the middle of an upload")
        return message

    async def open_stream(
        self,
        stack: contextlib.AsyncExitStack,
        client: BucketClient,
        stream: contextlib.AbstractAsyncContextManager[T],
    ) -> T:
        """Enter a bucket stream on ``stack`` within ``connect_timeout``."""
        return await open_bucket_stream(stack, client, stream, self.config.connect_timeout)

    async def bucket_step(self, client: BucketClient, step: Awaitable[T]) -> T:
        """Await one step of a bucket stream within ``idle_timeout``."""
        return await bucket_step(client, step, self.config.idle_timeout)

    async def send(self, message: str | bytes) -> None:
        """Send one frame, within the idle timeout (a client that stops reading).

        The send is shielded from outside cancellation: a frame cut off half-way would
        leave the client unable to parse anything after it, including the error frame
        that explains why the transfer stopped. Cancellation arrives once the frame is out;
        a client that stops reading still ends it through the idle timeout.
        """
        self.frames += 1
        try:
            with trio.CancelScope(shield=True), trio.fail_after(self.config.idle_timeout):
                await self.ws.send_message(message)
        except trio.TooSlowError:
            raise Timeout(f"client read nothing for {self.config.idle_timeout:g} s") from None
