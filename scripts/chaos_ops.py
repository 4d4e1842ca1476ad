"""The workload of a chaos run: workers uploading, downloading and deleting through the
client library, with every outcome recorded in the ledger.

Operations on one name are serialised by a lock per name, so the ledger knows the order in
which a name's versions were made. An operation whose outcome is unknown keeps the lock
until the registry shows no upload of the name in progress: an upload the API may still
commit must not overtake the next operation on that name.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import trio
from chaos_model import Content, Ledger, Options, Stats, log_uniform_size, sha256_file, short, write_content
from chaos_stack import Stack
from chaos_store import RegistryView

from karma8.client import Client
from karma8.errors import ChecksumMismatch, ConnectionFailed, Karma8Error, RemoteError

#: Share of upload and download among a worker's operations (deletes get the rest).
UPLOAD_SHARE, DOWNLOAD_SHARE = 0.50, 0.42
#: An interrupted upload must be settled (committed or failed) by the API within this.
SETTLE_DEADLINE = 60.0
#: Pause after a failed operation, so workers do not spin while the API is down.
FAILURE_PAUSE = 0.05
POLL = 0.02


def pool_names(count: int) -> list[str]:
    """The names the workers use: few, so that overwrites and deletes hit stored files."""
    return [f"chaos/d{i % 4}/file-{i:03d}.bin" for i in range(count)]


@dataclass
class Chaos:
    """Everything the workers and fault injectors share."""

    options: Options
    stack: Stack
    registry: RegistryView
    ledger: Ledger
    stats: Stats
    work: Path
    stopping: trio.Event = field(default_factory=trio.Event)
    locks: dict[str, trio.Lock] = field(default_factory=dict)
    _ops: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.locks = {name: trio.Lock() for name in self.ledger.names}

    @property
    def client(self) -> Client:
        return self.stack.client()

    def next_op(self) -> str:
        return f"#{next(self._ops)}"

    async def sleep_or_stop(self, seconds: float) -> bool:
        """Sleep; True if the run is stopping (at once or during the sleep)."""
        with trio.move_on_after(seconds):
            await self.stopping.wait()
        return self.stopping.is_set()

    async def settle(self, name: str, why: str) -> None:
        """Wait until no upload of ``name`` is in progress (the API decided its fate)."""
        with trio.move_on_after(SETTLE_DEADLINE):
            while await self.registry.in_progress(name):  # noqa: ASYNC110 (another process)
                await trio.sleep(POLL)
            return
        self.stats.violation(
            f"an upload of {name!r} interrupted by {why} was still in progress"
            f" {SETTLE_DEADLINE:g} s later (registry uploads {sorted(await self.registry.in_progress(name))})"
        )

    def observe(self, name: str, found: Content, op: str) -> None:
        problem = self.ledger.observe(name, found, op)
        if problem is not None:
            self.stats.violation(problem)


def not_started(exc: Karma8Error) -> bool:
    """True for a client error that means the request never reached the server."""
    return isinstance(exc, ConnectionFailed) and exc.message.startswith("cannot reach")


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "client_timeout"
    if isinstance(exc, Karma8Error):
        return exc.code
    return type(exc).__name__


# -- operations ----------------------------------------------------------------------------


async def upload(ctx: Chaos, rng: random.Random, worker: int) -> None:
    """Upload a new version of a random name with the client library."""
    name = rng.choice(ctx.ledger.names)
    size = log_uniform_size(rng, ctx.options.max_size)
    seed = rng.getrandbits(64)
    op = ctx.next_op()
    async with ctx.locks[name]:
        src = ctx.work / f"worker-{worker}.up"
        sha = await trio.to_thread.run_sync(write_content, src, seed, size)
        recorded = False
        try:
            info = await ctx.client.upload(src, name)
        except ChecksumMismatch as exc:
            # The client compares the server's digest with its own after the commit.
            ctx.stats.op("upload", "checksum_mismatch")
            ctx.stats.violation(f"{op} upload of {name!r}: the server stored other data: {exc.message}")
            ctx.ledger.upload_unknown(name, sha, op, "stored data differs")
            recorded = True
        except RemoteError as exc:
            # An error frame: the server did not commit.
            ctx.stats.op("upload", exc.code)
            ctx.ledger.upload_failed(name, sha, op, exc.code)
            recorded = True
        except (Karma8Error, trio.TooSlowError) as exc:
            ctx.stats.op("upload", outcome_of(exc))
            if isinstance(exc, Karma8Error) and not_started(exc):
                ctx.ledger.upload_failed(name, sha, op, exc.code)
            else:
                ctx.stats.unknown_outcomes += 1
                ctx.ledger.upload_unknown(name, sha, op, outcome_of(exc))
                recorded = True
                await ctx.settle(name, outcome_of(exc))
            recorded = True
        else:
            ctx.stats.op("upload", "ok")
            ctx.stats.acknowledged += 1
            ctx.stats.bytes_uploaded += size
            if info.sha256 != sha or info.size != size:
                ctx.stats.violation(f"{op} upload of {name!r}: acknowledged as {info}, sent {size} / {sha}")
            ctx.ledger.upload_acked(name, sha, op)
            recorded = True
        finally:
            if not recorded:  # cancelled at the end of the run: it may still commit
                ctx.ledger.upload_unknown(name, sha, op, "cancelled")
                ctx.stats.op("upload", "cancelled")
            with contextlib.suppress(FileNotFoundError):
                src.unlink()
    if ctx.ledger.states[name].acked != sha:
        await trio.sleep(FAILURE_PAUSE)


async def download(ctx: Chaos, rng: random.Random, worker: int) -> bool:
    """Download a random name and check it is one of the versions it may be.

    Returns True when the download succeeded.
    """
    name = rng.choice(ctx.ledger.names)
    op = ctx.next_op()
    dst = ctx.work / f"worker-{worker}.down"
    async with ctx.locks[name]:
        try:
            info = await ctx.client.download(name, dst)
            sha = await trio.to_thread.run_sync(sha256_file, dst)
        except RemoteError as exc:
            ctx.stats.op("download", exc.code)
            if exc.code == "not_found":
                ctx.observe(name, None, f"{op} download")
            elif exc.code == "checksum_mismatch":
                ctx.stats.violation(
                    f"{op} download of {name!r}: the server found damaged data: {exc.message}"
                )
            return False
        except ChecksumMismatch as exc:
            ctx.stats.op("download", "bad_data")
            ctx.stats.violation(f"{op} download of {name!r} ended as complete with wrong data: {exc.message}")
            return False
        except (Karma8Error, trio.TooSlowError) as exc:
            ctx.stats.op("download", outcome_of(exc))
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        ctx.stats.op("download", "ok")
        if sha != info.sha256:
            ctx.stats.violation(f"{op} download of {name!r}: header sha256 {info.sha256}, data {sha}")
        ctx.observe(name, sha, f"{op} download")
        return True


async def delete(ctx: Chaos, rng: random.Random) -> None:
    """Delete a random name."""
    name = rng.choice(ctx.ledger.names)
    op = ctx.next_op()
    async with ctx.locks[name]:
        try:
            await ctx.client.delete(name)
        except RemoteError as exc:
            ctx.stats.op("delete", exc.code)
            if exc.code == "not_found":
                ctx.observe(name, None, f"{op} delete")
            return
        except (Karma8Error, trio.TooSlowError) as exc:
            ctx.stats.op("delete", outcome_of(exc))
            if not (isinstance(exc, Karma8Error) and not_started(exc)):
                ctx.stats.unknown_outcomes += 1
                ctx.ledger.delete_unknown(name, op, outcome_of(exc))
            return
        except BaseException:
            ctx.ledger.delete_unknown(name, op, "cancelled")
            raise
        ctx.stats.op("delete", "ok")
        ctx.ledger.delete_acked(name, op)


async def worker(ctx: Chaos, index: int, rng: random.Random) -> None:
    """Operations one after another until the run stops."""
    while not ctx.stopping.is_set():
        draw = rng.random()
        if draw < UPLOAD_SHARE:
            await upload(ctx, rng, index)
        elif draw < UPLOAD_SHARE + DOWNLOAD_SHARE:
            if not await download(ctx, rng, index):
                await trio.sleep(FAILURE_PAUSE)
        else:
            await delete(ctx, rng)


async def verify_listing(ctx: Chaos) -> None:
    """The end check through the API: the listing matches the ledger, every file reads back.

    Raises:
        Karma8Error: the listing itself failed.
    """
    listed = {f["name"]: str(f["sha256"]) for f in await ctx.client.list()}
    for name in sorted(set(listed) - set(ctx.ledger.names)):
        ctx.stats.violation(f"listed {name!r} ({short(listed[name])}) was never uploaded")
    for name in ctx.ledger.names:
        acknowledged = ctx.ledger.acknowledged(name)
        found = listed.get(name)
        ctx.observe(name, found, "final listing")
        if found is None:
            continue
        dst = ctx.work / "verify.down"
        try:
            info = await ctx.client.download(name, dst)
            sha = await trio.to_thread.run_sync(sha256_file, dst)
        except (Karma8Error, trio.TooSlowError) as exc:
            ctx.stats.violation(
                f"listed {name!r} ({short(found)}) cannot be downloaded: {outcome_of(exc)} {exc}"
            )
            ctx.stats.lost_files += 1
            continue
        finally:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        if sha != found or info.sha256 != found:
            ctx.stats.violation(f"{name!r} is listed as {found} but downloads as {sha}")
            continue
        ctx.stats.files_verified += 1
        ctx.stats.acknowledged_verified += acknowledged
