"""The one bridge between trio and asyncio (grpclib is asyncio-only).

An asyncio event loop (uvloop when available) runs on a dedicated thread for the life of
the :class:`Portal`. Trio code calls coroutine functions on it with :meth:`Portal.run`;
asyncio code (a grpclib servicer) calls trio functions with :meth:`Portal.run_trio`.

Cancellation is the subtle part. When the trio caller of :meth:`Portal.run` is cancelled,
the asyncio task is cancelled too, and the caller waits *shielded* until that task has
really finished: when :meth:`Portal.run` returns or raises, nothing it started is still
running on the other loop. Closing a gRPC stream relies on that: see
:mod:`karma8.rpc.buckets`, whose stream exits run shielded so that a cancelled upload
resets its gRPC streams before the cleanup deletes what was stored.

Nothing outside ``karma8.rpc`` imports asyncio on behalf of trio code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


class PortalClosed(RuntimeError):
    """The asyncio side went away (shutdown) while a call was running."""


def new_event_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    """A fresh asyncio loop; uvloop's when asked for and installed."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using the default asyncio loop")
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


@dataclass
class _Call:
    """One Portal.run call, as the asyncio side sees it."""

    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    outcome: tuple[bool, Any] | None = None


class Portal:
    """Calls across the trio/asyncio boundary. Create with :func:`open_portal`."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, nursery: trio.Nursery
    ) -> None:
        self._loop = loop
        self._token = token
        self._nursery = nursery

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the asyncio loop; return its result to trio.

        Like any trio function, it raises :class:`trio.Cancelled` without starting
        anything when called in a cancelled scope. If the caller is cancelled while the
        coroutine runs, its asyncio task is cancelled and awaited (shielded) before
        ``Cancelled`` propagates: when this returns or raises, nothing it started is
        still running. Completion comes from the task's done-callback, which fires even
        for a task cancelled before its first step (its coroutine body never runs then).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        token = self._token
        done = trio.Event()
        call = _Call()

        async def body() -> None:
            try:
                call.outcome = (True, await fn(*args))
            except BaseException as exc:  # handed to the trio side below
                call.outcome = (False, exc)

        def finished(_: object = None) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def start() -> None:  # on the asyncio loop
            if call.cancelled:
                finished()
                return
            call.task = loop.create_task(body())
            call.task.add_done_callback(finished)

        def cancel() -> None:  # on the asyncio loop, always after start()
            call.cancelled = True
            if call.task is not None:
                call.task.cancel()

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            raise PortalClosed("the asyncio loop is closed") from None
        try:
            await done.wait()
        finally:
            if not done.is_set():
                loop.call_soon_threadsafe(cancel)
                with trio.CancelScope(shield=True):
                    await done.wait()
        if call.outcome is None:
            raise PortalClosed("the asyncio loop dropped the call")
        ok, value = call.outcome
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, asyncio.CancelledError):
            raise PortalClosed("the asyncio loop cancelled the call") from value
        raise value

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """From trio: run ``fn()`` as a task of the portal's own, which no caller's
        cancellation reaches (it ends with the portal). For work done on behalf of
        several callers, such as a batched call: it must bound its own time.

        Raises:
            PortalClosed: the portal is closing.
        """
        try:
            self._nursery.start_soon(fn)
        except RuntimeError:
            raise PortalClosed("the portal is closing") from None

    async def run_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From the asyncio loop: run ``await fn(*args)`` in trio and return its result.

        The trio task runs in the portal's nursery; if the asyncio caller is cancelled the
        trio task is cancelled as well.
        """
        result: asyncio.Future[T] = self._loop.create_future()
        cancel_scope = trio.CancelScope()

        def settle(outcome: Callable[[], object]) -> None:
            if not result.done():
                outcome()

        async def in_trio() -> None:
            with cancel_scope:
                try:
                    value = await fn(*args)
                except Exception as exc:
                    self._loop.call_soon_threadsafe(settle, partial(result.set_exception, exc))
                    return
                self._loop.call_soon_threadsafe(settle, partial(result.set_result, value))
            if cancel_scope.cancelled_caught:
                self._loop.call_soon_threadsafe(settle, result.cancel)

        def spawn() -> None:  # in trio; an exception here would crash the trio run
            try:
                self._nursery.start_soon(in_trio)
            except RuntimeError:  # the portal is closing: its nursery takes no new task
                failure = PortalClosed("the trio side is shutting down")
                self._loop.call_soon_threadsafe(settle, partial(result.set_exception, failure))

        self._token.run_sync_soon(spawn)
        try:
            return await result
        except asyncio.CancelledError:
            self._token.run_sync_soon(cancel_scope.cancel)
            raise


@contextlib.asynccontextmanager
async def open_portal(*, use_uvloop: bool = True, stop_timeout: float = 5.0) -> AsyncIterator[Portal]:
    """Start an asyncio loop on its own thread; stop it (after its tasks) on exit.

    Stopping waits at most ``stop_timeout`` seconds for the loop thread; a loop that does
    not stop in time (uvloop's close can block on a transport that was never cleaned up)
    is abandoned with a warning: it is a daemon thread and dies with the process.
    """
    loop = new_event_loop(use_uvloop)
    ready = threading.Event()

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        # Let cancelled tasks and async generators finish before the loop closes.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run_loop, name="karma8-asyncio", daemon=True)
    thread.start()
    await trio.to_thread.run_sync(ready.wait)
    try:
        async with trio.open_nursery() as nursery:
            yield Portal(loop, trio.lowlevel.current_trio_token(), nursery)
            nursery.cancel_scope.cancel()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        with trio.move_on_after(stop_timeout, shield=True):
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        if thread.is_alive():
            log.warning("the asyncio loop did not stop within %g s; abandoning it", stop_timeout)
