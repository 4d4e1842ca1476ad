"""The benchmark cases, the same for every system: a big file's round trip, small files at concurrency.

A target is the system under test behind one small interface: karma8 through its client
library, or the Swift peer (bench_swift). Each case measures the upload and the download
separately and then checks every downloaded byte against the source's sha256. In the
small-file case every single upload and download is timed as well (wall time from the
start of the call to its end, as the client sees it), for the latency percentiles. Where the
system has an outage (two processes holding data fragments that can be killed and brought
back), a big file is downloaded once more with them down: the degraded download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
from bench_meter import Groups, Meter
from bench_model import POLL, BenchError, SizeRun, SmallRun, Source, SystemRuns, Transfer, note

from karma8.client import Client

RECLAIM_TIMEOUT = 60.0


class Target(Protocol):
    name: str

    async def upload(self, src: Source, name: str) -> None: ...

    async def download(self, src: Source, name: str, dst: Path) -> None: ...

    async def upload_many(self, src: Source, names: Sequence[str], concurrency: int) -> list[float]:
        """Upload ``src`` as each of ``names``; the seconds each upload took, in the order of names."""
        ...

    async def download_many(
        self, src: Source, names: Sequence[str], dsts: Sequence[Path], concurrency: int
    ) -> list[float]:
        """Download each of ``names``; the seconds each download took, in the order of names."""
        ...

    def stored(self, names: Sequence[str], concurrency: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Around a case: delete ``names`` afterwards and wait until their space is free."""
        ...


class Outage(Protocol):
    """Processes of a system taken down for one download (bench_procs, bench_swift)."""

    #: What is down, for the report: ``2 buckets``.
    what: str

    def down(self, name: str) -> contextlib.AbstractAsyncContextManager[tuple[int, ...]]:
        """Kill processes holding data fragments of ``name``, yield their pids; back afterwards."""
        ...

    def groups(self) -> Groups:
        """The processes to measure once they are back (restarted ones have new pids)."""
        ...


@dataclass(frozen=True, slots=True)
class System:
    """One system under test: how to drive it, how to measure it, where its results go."""

    target: Target
    meter: Meter
    results: SystemRuns
    #: For the degraded download (None: not measured).
    outage: Outage | None = None


# -- karma8 ----------------------------------------------------------------------------


async def _each(
    client: Client, count: int, concurrency: int, op: Callable[[Client, int], Awaitable[object]]
) -> list[float]:
    """``await op(session, i)`` for i in range(count), ``concurrency`` tasks at a time, each
    with a session of its own (as the Swift case keeps a connection per thread); each
    op's seconds."""
    indexes = iter(range(count))
    seconds = [0.0] * count

    async def worker() -> None:
        async with client.session() as session:
            for i in indexes:  # shared: each index goes to one worker
                start = time.perf_counter()
                await op(session, i)
                seconds[i] = time.perf_counter() - start

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, count)):
            nursery.start_soon(worker)
    return seconds


async def used_bytes(client: Client) -> int:
    status = await client.status()
    return sum(int(b["used"]) for b in status["buckets"])


class Karma8Target:
    """The benchmark cases against karma8, through the client library: a connection per
    large transfer, a session per worker for the small files."""

    name = "karma8"

    def __init__(self, client: Client) -> None:
        self.client = client

    async def upload(self, src: Source, name: str, client: Client | None = None) -> None:
        info = await (client or self.client).upload(src.path, name)
        if info.sha256 != src.sha256 or info.size != src.size:
            raise BenchError(
                f"upload of {name}: server has {info.size} B sha256 {info.sha256}, source {src.sha256}"
            )

    async def download(self, src: Source, name: str, dst: Path) -> None:
        await self.client.download(name, dst)

    async def upload_many(self, src: Source, names: Sequence[str], concurrency: int) -> list[float]:
        return await _each(self.client, len(names), concurrency, lambda s, i: self.upload(src, names[i], s))

    async def download_many(
        self, src: Source, names: Sequence[str], dsts: Sequence[Path], concurrency: int
    ) -> list[float]:
        return await _each(self.client, len(names), concurrency, lambda s, i: s.download(names[i], dsts[i]))

    @contextlib.asynccontextmanager
    async def stored(self, names: Sequence[str], concurrency: int) -> AsyncIterator[None]:
        """Delete ``names`` afterwards and wait until the buckets report their space freed."""
        baseline = await used_bytes(self.client)
        yield
        await _each(self.client, len(names), concurrency, lambda s, i: s.delete(names[i]))
        with trio.move_on_after(RECLAIM_TIMEOUT) as scope:
            # Usage arrives with bucket heartbeats: there is no event to wait on.
            while await used_bytes(self.client) > baseline:  # noqa: ASYNC110
                await trio.sleep(POLL)
        if scope.cancelled_caught:
            note(f"warning: buckets still use more than before {names[0]!r}... after {RECLAIM_TIMEOUT:g} s")


# -- the cases -------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def _check_and_remove(src: Source, what: str, paths: Sequence[Path]) -> None:
    for path in paths:
        got = await trio.to_thread.run_sync(sha256_file, path)
        await trio.Path(path).unlink()
        if got != src.sha256:
            raise BenchError(f"{what}: {path.name} has sha256 {got}, source {src.sha256}")


async def degraded_download(system: System, outage: Outage, src: Source, name: str, dst: Path) -> Transfer:
    """Download ``name`` with ``outage`` down; measured over the processes still running."""
    target = system.target
    async with outage.down(name) as killed:
        degraded, _ = await system.meter.without(killed).measure(
            src.size, lambda: target.download(src, name, dst)
        )
    system.meter.regroup(outage.groups())
    await _check_and_remove(src, f"{target.name} download of {name} with {outage.what} down", [dst])
    return degraded


async def round_trip(system: System, run: SizeRun, src: Source, workdir: Path) -> str:
    """Upload ``src``, download it (and again degraded), check it, delete it; a progress line."""
    target, meter, outage = system.target, system.meter, system.outage
    name = f"bench/{src.path.name}"
    dst = workdir / f"download-{target.name}-{src.path.name}"
    async with target.stored([name], 1):
        up, _ = await meter.measure(src.size, lambda: target.upload(src, name))
        down, _ = await meter.measure(src.size, lambda: target.download(src, name, dst))
        await _check_and_remove(src, f"{target.name} download of {name}", [dst])
        degraded = None if outage is None else await degraded_download(system, outage, src, name, dst)
    run.upload.append(up)
    run.download.append(down)
    line = f"{target.name:<6} upload {up.mb_per_s:7.1f} MB/s, download {down.mb_per_s:7.1f} MB/s"
    if degraded is not None and outage is not None:
        run.degraded.append(degraded)
        line += f", with {outage.what} down {degraded.mb_per_s:7.1f} MB/s"
    return line + ", sha256 ok"


async def small_round(system: System, run: SmallRun, src: Source, workdir: Path) -> str:
    """``run.files`` uploads of ``src`` then as many downloads, ``run.concurrency`` at a time;
    each single upload and download timed too (``Transfer.latencies``).
    """
    target, meter = system.target, system.meter
    names = [f"bench-small/{i:05d}" for i in range(run.files)]
    folder = workdir / f"small-{target.name}"
    await trio.Path(folder).mkdir(exist_ok=True)
    dsts = [folder / f"{i:05d}" for i in range(run.files)]
    total = run.files * run.size
    async with target.stored(names, run.concurrency):
        up, up_seconds = await meter.measure(
            total, lambda: target.upload_many(src, names, run.concurrency), count=run.files
        )
        down, down_seconds = await meter.measure(
            total, lambda: target.download_many(src, names, dsts, run.concurrency), count=run.files
        )
        await _check_and_remove(src, f"{target.name} small-file downloads", dsts)
    up = dataclasses.replace(up, latencies=tuple(up_seconds))
    down = dataclasses.replace(down, latencies=tuple(down_seconds))
    run.upload.append(up)
    run.download.append(down)
    return (
        f"{target.name:<6} {up.files_per_s:7.1f} uploads/s (p50 {up.latency_ms(50):.1f} ms, "
        f"p99 {up.latency_ms(99):.1f} ms), {down.files_per_s:7.1f} downloads/s (p50 "
        f"{down.latency_ms(50):.1f} ms, p99 {down.latency_ms(99):.1f} ms), sha256 ok"
    )
