"""The per-bucket coalescer: what queues during a call goes in the next one."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from karma8.errors import BucketUnavailable, ChecksumMismatch
from karma8.rpc.coalesce import Coalescer


class FakeCall:
    """A batched call that records its batches; when held, each waits for ``release``
    (or, if there is one, for its own gate in ``gates``: batch number -> event)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = False
        self.release = trio.Event()
        self.gates: dict[int, trio.Event] = {}
        self.fail: Exception | None = None

    async def __call__(self, requests: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(requests))
        gate = self.gates.get(len(self.batches) - 1)
        if gate is not None:
            await gate.wait()
        elif self.hold:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [ChecksumMismatch(f"item {r}") if r < 0 else r * 10 for r in requests]


def _coalescer(nursery: trio.Nursery, send: FakeCall, **limits: int) -> Coalescer[int, int]:
    return Coalescer(
        send,
        nursery.start_soon,
        bucket_id="b1",
        max_items=limits.get("max_items", 64),
        max_bytes=limits.get("max_bytes", 1000),
        timeout=limits.get("timeout", 30),
        cancel_wait=limits.get("cancel_wait", 5),
    )


async def test_a_lone_request_goes_at_once_alone() -> None:
    send = FakeCall()
    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send)
        assert await co.call(7, 1) == 70
    assert send.batches == [[7]]


async def test_what_queues_during_a_call_shares_the_next() -> None:
    send = FakeCall()
    send.hold = True
    results: dict[int, int] = {}

    async def one(co: Coalescer[int, int], r: int) -> None:
        results[r] = await co.call(r, 1)

    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send)
        nursery.start_soon(one, co, 0)
        await trio.testing.wait_all_tasks_blocked()
        for r in range(1, 11):
            nursery.start_soon(one, co, r)
        await trio.testing.wait_all_tasks_blocked()
        send.release.set()
    assert [sorted(b) for b in send.batches] == [[0], list(range(1, 11))]
    assert results == {r: r * 10 for r in range(11)}
    assert (co.calls, co.requests) == (2, 11)


async def test_batches_are_capped_by_items_and_bytes() -> None:
    send = FakeCall()
    send.hold = True

    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send, max_items=3, max_bytes=250)
        nursery.start_soon(co.call, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        for r, size in [(1, 100), (2, 100), (3, 100), (4, 10), (5, 10), (6, 10), (7, 500)]:
            nursery.start_soon(co.call, r, size)
            await trio.testing.wait_all_tasks_blocked()
        send.release.set()
    assert send.batches == [[0], [1, 2], [3, 4, 5], [6], [7]]


async def test_errors_reach_their_callers_only() -> None:
    send = FakeCall()
    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send)
        with pytest.raises(ChecksumMismatch, match="item -1"):
            await co.call(-1, 1)
        assert await co.call(2, 1) == 20
        send.fail = BucketUnavailable("b1", "gone")
        with pytest.raises(BucketUnavailable, match="gone"):
            await co.call(3, 1)


async def test_a_caller_cancelled_while_queued_is_never_sent() -> None:
    send = FakeCall()
    send.hold = True
    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send)
        nursery.start_soon(co.call, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01) as scope:
            await co.call(1, 1)
        assert scope.cancelled_caught
        send.release.set()
    assert send.batches == [[0]]


async def test_a_caller_cancelled_during_its_call_is_back_when_the_call_ended() -> None:
    send = FakeCall()
    send.gates = {0: trio.Event(), 1: trio.Event()}
    results: list[int] = []
    scopes: list[trio.CancelScope] = []
    cancelled: list[bool] = []

    async def keep(co: Coalescer[int, int], r: int) -> None:
        results.append(await co.call(r, 1))

    async def give_up(co: Coalescer[int, int], r: int) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await co.call(r, 1)
        cancelled.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send)
        nursery.start_soon(keep, co, 0)
        await trio.testing.wait_all_tasks_blocked()  # call 0 under way: 1 and 2 queue
        nursery.start_soon(keep, co, 1)
        nursery.start_soon(give_up, co, 2)
        await trio.testing.wait_all_tasks_blocked()
        send.gates[0].set()
        await trio.testing.wait_all_tasks_blocked()  # call [1, 2] under way, held
        assert sorted(send.batches[1]) == [1, 2]
        scopes[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == []  # waits for its call: what it stores is there when it is back
        send.gates[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == [True]
    assert sorted(results) == [0, 10]


async def test_a_cancelled_caller_waits_for_a_hung_call_only_so_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = FakeCall()
    send.hold = True
    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send, cancel_wait=2, timeout=60)
        with trio.move_on_after(1) as scope:
            await co.call(1, 1)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(3)  # 1 s, then 2 s of cancel_wait
        send.release.set()


async def test_a_call_past_its_timeout_fails_its_requests(autojump_clock: trio.testing.MockClock) -> None:
    send = FakeCall()
    send.hold = True
    async with trio.open_nursery() as nursery:
        co = _coalescer(nursery, send, timeout=5)
        with pytest.raises(BucketUnavailable, match="no answer in 5 s"):
            await co.call(1, 1)
        send.hold = False
        assert await co.call(2, 1) == 20  # the next call goes on


async def test_shutdown_answers_everyone() -> None:
    send = FakeCall()
    send.hold = True
    errors: list[BaseException] = []

    async def one(co: Coalescer[int, int], r: int) -> None:
        try:
            await co.call(r, 1)
        except BucketUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers, trio.open_nursery() as portal:  # portal: closing
        co = _coalescer(portal, send)
        callers.start_soon(one, co, 1)
        await trio.testing.wait_all_tasks_blocked()
        callers.start_soon(one, co, 2)
        await trio.testing.wait_all_tasks_blocked()
        portal.cancel_scope.cancel()
    assert len(errors) == 2
