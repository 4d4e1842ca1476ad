"""When the rebalancer starts a run: joins (postponed by further joins), requests."""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from karma8.api.rebalance import Progress, Rebalancer
from karma8.config import ApiConfig


def _rebalancer(**settings: object) -> tuple[Rebalancer, list[tuple[float, str]]]:
    config = ApiConfig.model_validate({"rebalance_delay": 5, "rebalance_interval": 10_000, **settings})
    rebalancer = Rebalancer(cast(Any, None), cast(Any, None), cast(Any, None), config)
    runs: list[tuple[float, str]] = []

    async def record(reason: str) -> Progress:
        runs.append((trio.current_time(), reason))
        return Progress()

    rebalancer.rebalance = record  # type: ignore[method-assign]
    return rebalancer, runs


async def test_buckets_joining_together_get_one_run(autojump_clock: trio.testing.MockClock) -> None:
    rebalancer, runs = _rebalancer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rebalancer.run)
        start = trio.current_time()
        rebalancer.joined("b7")
        await trio.sleep(3)
        rebalancer.joined("b8")  # postpones the run to 5 s after this join
        await trio.sleep(20)
        assert runs == [(start + 8, "bucket b7 joined")]
        rebalancer.request("by hand")
        await trio.sleep(1)
        assert runs[1:] == [(start + 23, "by hand")]
        nursery.cancel_scope.cancel()


async def test_a_join_does_not_postpone_a_run_asked_for(autojump_clock: trio.testing.MockClock) -> None:
    rebalancer, runs = _rebalancer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rebalancer.run)
        start = trio.current_time()
        rebalancer.request("by hand")
        rebalancer.joined("b7")
        await trio.sleep(20)
        assert runs == [(start, "by hand")]
        nursery.cancel_scope.cancel()


async def test_joins_start_nothing_when_automatic_runs_are_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rebalancer, runs = _rebalancer(rebalance_auto=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rebalancer.run)
        rebalancer.joined("b7")
        await trio.sleep(60)
        assert runs == []
        nursery.cancel_scope.cancel()
