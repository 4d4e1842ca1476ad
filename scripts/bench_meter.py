"""Measuring one transfer: wall time, CPU seconds and peak RSS of each group of processes."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from bench_model import Transfer
from bench_procs import cpu_seconds, reset_peak, status_bytes

T = TypeVar("T")

SAMPLE_INTERVAL = 0.05

#: Role -> the pids playing it (``api``, ``buckets``, ``client``; ``proxy``, ``objects``, ...).
Groups = Mapping[str, tuple[int, ...]]


def _all_pids(groups: Groups) -> tuple[int, ...]:
    return tuple(pid for pids in groups.values() for pid in pids)


def _cpu_snapshot(pids: Sequence[int]) -> dict[int, float | None]:
    return {pid: cpu_seconds(pid) for pid in pids}


def _cpu_by_role(
    groups: Groups, before: dict[int, float | None], after: dict[int, float | None]
) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for role, pids in groups.items():
        deltas = [(after[p], before[p]) for p in pids]
        ok = pids and all(a is not None and b is not None for a, b in deltas)
        result[role] = sum(a - b for a, b in deltas if a is not None and b is not None) if ok else None
    return result


def _rss_now(pids: Sequence[int]) -> dict[int, int]:
    return {pid: rss for pid in pids if (rss := status_bytes(pid, "VmRSS")) is not None}


def _rss_by_role(groups: Groups, peaks: dict[int, int]) -> dict[str, int | None]:
    return {role: max((peaks[p] for p in pids if p in peaks), default=None) for role, pids in groups.items()}


async def sample_rss(pids: Sequence[int], peaks: dict[int, int]) -> None:
    """Record each process's largest VmRSS, every SAMPLE_INTERVAL, until cancelled."""
    while True:
        for pid, rss in _rss_now(pids).items():
            peaks[pid] = max(rss, peaks.get(pid, 0))
        await trio.sleep(SAMPLE_INTERVAL)


def _add_hwm(pids: Iterable[int], peaks: dict[int, int]) -> None:
    """Fold in VmHWM, which also sees the peaks between samples."""
    for pid in pids:
        hwm = status_bytes(pid, "VmHWM")
        if hwm is not None:
            peaks[pid] = max(hwm, peaks.get(pid, 0))


async def settle() -> None:
    """Flush dirty pages, so that an fsync in the next measurement pays only for its own data."""
    await trio.to_thread.run_sync(os.sync)


@dataclass(slots=True)
class Meter:
    """Measures transfers; keeps each process's lifetime VmHWM across the per-transfer resets."""

    groups: Groups
    lifetime: dict[int, int] = field(default_factory=dict)
    #: Processes that were killed and replaced, by role: their lifetime peaks still count.
    retired: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def _reset_peaks(self, pids: Sequence[int]) -> list[int]:
        """Reset VmHWM (keeping the lifetime peak it held); the pids where that worked."""
        _add_hwm(pids, self.lifetime)
        return [pid for pid in pids if reset_peak(pid)]

    def lifetime_peaks(self) -> dict[str, int | None]:
        _add_hwm(_all_pids(self.groups), self.lifetime)
        everyone = {role: (*pids, *self.retired.get(role, ())) for role, pids in self.groups.items()}
        return _rss_by_role(everyone, self.lifetime)

    def without(self, gone: Iterable[int]) -> Meter:
        """A meter of the processes but ``gone`` (killed for a measurement), sharing lifetime peaks."""
        dead = set(gone)
        groups = {role: tuple(p for p in pids if p not in dead) for role, pids in self.groups.items()}
        return Meter(groups, self.lifetime, self.retired)

    def regroup(self, groups: Groups) -> None:
        """Measure ``groups`` from now on (killed processes were restarted with new pids)."""
        current = set(_all_pids(groups))
        for role, pids in self.groups.items():
            gone = tuple(p for p in pids if p not in current)
            self.retired[role] = (*self.retired.get(role, ()), *gone)
        self.groups = groups

    async def measure(
        self, size: int, transfer: Callable[[], Awaitable[T]], count: int = 1
    ) -> tuple[Transfer, T]:
        """Run ``transfer`` (``count`` files, ``size`` bytes); its time, CPU and peak RSS by role."""
        await settle()
        groups, pids = self.groups, _all_pids(self.groups)
        reset = self._reset_peaks(pids)
        rss_before = _rss_by_role(groups, _rss_now(pids))
        peaks: dict[int, int] = {}
        before = _cpu_snapshot(pids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss, pids, peaks)
            start = time.perf_counter()
            result = await transfer()
            seconds = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        cpu = _cpu_by_role(groups, before, _cpu_snapshot(pids))
        _add_hwm(reset, peaks)
        rss_after = _rss_by_role(groups, _rss_now(pids))
        peak_rss = _rss_by_role(groups, peaks)
        return Transfer(size, seconds, cpu, rss_before, peak_rss, rss_after, count), result
