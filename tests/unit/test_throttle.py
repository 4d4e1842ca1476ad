"""The rebalancer's bandwidth limit, on trio's virtual clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from karma8.api.rebalance import Throttle

MiB = 1 << 20

# ``autojump_clock`` is pytest-trio's: virtual time that jumps whenever all tasks sleep.


async def test_transfers_are_paced_to_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(4 * MiB)
    start = trio.current_time()
    for _ in range(16):
        await throttle.take(MiB)
    # 16 MiB at 4 MiB/s: the first chunk goes at once, the last one 15/4 s later.
    assert trio.current_time() - start == pytest.approx(15 / 4)


async def test_concurrent_transfers_share_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(2 * MiB)
    start = trio.current_time()

    async def mover() -> None:
        for _ in range(4):
            await throttle.take(MiB)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(mover)
    # 12 MiB in all at 2 MiB/s, whatever the number of movers.
    assert trio.current_time() - start == pytest.approx(11 / 2)


async def test_zero_means_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(0)
    start = trio.current_time()
    for _ in range(100):
        await throttle.take(64 * MiB)
    assert trio.current_time() == start
