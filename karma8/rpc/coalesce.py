"""Coalescing small calls to one bucket: whatever queued while a call was under way goes
in the next call, as soon as that one returns.

Nothing waits for a batch to fill: a lone request is sent at once, alone. Under load the
requests that arrive during one round trip share the next one, so the number of calls
(and of HTTP/2 streams and bucket-side tasks) per fragment falls as the load rises; the
bucket then writes a PutMany's fragments with one fdatasync.

The calls run in a task of the portal's (:meth:`~karma8.rpc.bridge.Portal.start_soon`),
not in any caller's: a call answers several callers, and one of them being cancelled
must not stop it for the others. A cancelled caller's request is taken out of the queue
if it has not gone yet. If it has, the caller waits (shielded, at most ``cancel_wait``)
for its call to end, as a cancelled stream waits for its reset: when the caller is back,
what the call stores is stored, and a cleanup that follows deletes it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from karma8.errors import BucketUnavailable

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(eq=False)
class _Pending(Generic[Req, Res]):
    request: Req
    size: int
    done: trio.Event = field(default_factory=trio.Event)
    result: Res | None = None
    error: BaseException | None = None


class Coalescer(Generic[Req, Res]):
    """Runs ``send(requests)`` (a result or an exception per request, in order) for
    batches of the requests given to :meth:`call`.

    Args:
        send: the batched call.
        spawn: starts the task that sends (``Portal.start_soon``).
        bucket_id: for errors.
        max_items: requests per call, at most.
        max_bytes: request bytes per call, at most (a bigger request goes alone).
        timeout: a call still running after this long fails every request in it.
        cancel_wait: how long a cancelled caller whose request has gone waits for its call.
    """

    def __init__(
        self,
        send: Callable[[list[Req]], Awaitable[Sequence[Res | BaseException]]],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        *,
        bucket_id: str,
        max_items: int,
        max_bytes: int,
        timeout: float,
        cancel_wait: float,
    ) -> None:
        self._send = send
        self._spawn = spawn
        self._bucket_id = bucket_id
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._cancel_wait = cancel_wait
        self._queue: deque[_Pending[Req, Res]] = deque()
        self._sending = False
        #: Calls made and requests sent (for tests and benchmarks).
        self.calls = 0
        self.requests = 0

    async def call(self, request: Req, size: int) -> Res:
        """The result of ``request`` (``size``: its bytes), sent with whatever else queued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        pending: _Pending[Req, Res] = _Pending(request, size)
        self._queue.append(pending)
        if not self._sending:
            self._sending = True
            try:
                self._spawn(self._drain)
            except BaseException:
                self._sending = False
                self._queue.remove(pending)
                raise
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set():
                try:
                    self._queue.remove(pending)  # not sent: it never will be
                except ValueError:  # sent: its result is dropped, once its call ended
                    with trio.move_on_after(self._cancel_wait, shield=True):
                        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    async def _drain(self) -> None:
        batch: list[_Pending[Req, Res]] = []
        try:
            while self._queue:
                batch = self._take()
                outcomes: Sequence[Res | BaseException] = []
                with trio.move_on_after(self._timeout) as scope:
                    try:
                        outcomes = await self._send([p.request for p in batch])
                    except Exception as exc:  # every request of the call fails with it
                        outcomes = [exc] * len(batch)
                if scope.cancelled_caught:
                    late = BucketUnavailable(self._bucket_id, f"no answer in {self._timeout:g} s")
                    outcomes = [late] * len(batch)
                self.calls += 1
                self.requests += len(batch)
                for p, outcome in zip(batch, outcomes, strict=False):
                    if isinstance(outcome, BaseException):
                        p.error = outcome
                    else:
                        p.result = outcome
                    p.done.set()
                self._settle(batch, "the batched call gave no answer for it")
        finally:
            self._sending = False
            # Cancelled (the portal closing): nobody may wait for an answer forever.
            self._settle(batch, "the call was cut short")
            self._settle(list(self._queue), "the call was cut short")
            self._queue.clear()

    def _settle(self, batch: list[_Pending[Req, Res]], why: str) -> None:
        for p in batch:
            if not p.done.is_set():
                p.error = BucketUnavailable(self._bucket_id, why)
                p.done.set()

    def _take(self) -> list[_Pending[Req, Res]]:
        batch: list[_Pending[Req, Res]] = []
        total = 0
        while self._queue and len(batch) < self._max_items:
            size = self._queue[0].size
            if batch and total + size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            total += size
        return batch
