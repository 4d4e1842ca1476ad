"""The faults of a chaos run, each on its own schedule drawn from its own generator.

- ``socket_kill``: an upload over a raw WebSocket whose TCP connection is closed mid-stream
  (FIN or RST), never sending the final empty frame, so it can never commit.
- ``client_kill``: ``python -m karma8 upload`` as a subprocess, SIGKILLed once the
  registry shows its upload in progress. Its outcome is unknown: it may have committed.
- ``bucket_kill``: SIGKILL of a random bucket, restarted after a downtime.
- ``api_kill``: SIGKILL of an API server (a random one when there are several), restarted
  on the same ports after a downtime.
- ``bucket_loss``: a bucket lost for good: SIGKILLed, its data directory wiped, an empty
  bucket (a new identity) started in its place. Its fragments must be rebuilt elsewhere.
- ``bit_flip``: one bit flipped in a fragment on a bucket's disk: in a fragment file (data,
  checksums or footer), or in the data of a needle in a volume (a flip in a needle's header
  would make the bucket drop the volume's rest at its next start, as a torn write: more
  than one fragment). Reads must go around it and repair must rewrite it. At most one flip per
  version of a file, and only on a file with every fragment written and nothing queued
  for repair, so that a flip and a lost bucket never exceed the 2 losses a 6+2 file is
  promised to survive (a file acknowledged with a fragment owed has one loss already).

A fault that could not be injected (the upload failed or completed before the cut) is
counted as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import trio
from chaos_model import Interval, content, log_uniform_size, write_content
from chaos_ops import Chaos
from chaos_stack import Child
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from karma8.bucket.volumes import Needle, scan
from karma8.core.names import encode_name
from karma8.core.needles import HEADER_SIZE, decode_header
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.wsfix import close_transport

#: Uploads cut by a fault are at least this big (capped by --max-size), so there is a stream to cut.
KILL_FLOOR = 64 * 1024
FRAME = 256 * 1024
#: How long a killed client's upload may take to show up in the registry.
CLIENT_START_TIMEOUT = 20.0
#: Delay between seeing the client's upload in progress and killing the client.
CLIENT_KILL_DELAY = Interval(0.0, 0.03)
POLL = 0.005


async def socket_kill(ctx: Chaos, rng: random.Random) -> None:
    """One upload whose connection dies after a random number of bytes."""
    name = rng.choice(ctx.ledger.names)
    size = log_uniform_size(rng, ctx.options.max_size, KILL_FLOOR)
    seed = rng.getrandbits(64)
    cut = rng.randint(0, size)
    reset = rng.random() < 0.5
    op = ctx.next_op()
    async with ctx.locks[name]:
        data = await trio.to_thread.run_sync(content, seed, size)
        sha = hashlib.sha256(data).hexdigest()
        how = "RST" if reset else "FIN"
        try:
            async with open_websocket_url(
                ctx.stack.pick_url() + "/upload/" + encode_name(name),
                connect_timeout=5.0,
                disconnect_timeout=1.0,
            ) as ws:
                try:
                    await ws.send_message(encode_upload_header(UploadHeader(size)))
                    for start in range(0, cut, FRAME):
                        await ws.send_message(data[start : min(cut, start + FRAME)])
                    stream = ws._stream  # trio-websocket keeps no public handle
                    if reset and isinstance(stream, trio.SocketStream):
                        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    await close_transport(ws)
        except (HandshakeError, OSError) as exc:
            ctx.stats.op("socket_kill_upload", "connect_failed")
            ctx.stats.fault_misses["socket_kill"] += 1
            ctx.ledger.upload_failed(name, sha, op, f"socket kill could not connect: {type(exc).__name__}")
            await trio.sleep(0.05)
            return
        except ConnectionClosed:
            # The server refused it first (an error frame); it was never complete.
            ctx.stats.op("socket_kill_upload", "server_closed_first")
            ctx.stats.fault_misses["socket_kill"] += 1
            ctx.ledger.upload_failed(name, sha, op, "server closed first")
            return
        ctx.stats.op("socket_kill_upload", f"cut ({how})")
        ctx.stats.faults["socket_kill"] += 1
        ctx.ledger.upload_failed(name, sha, op, f"socket closed ({how}) after {cut} of {size} bytes")


def _parse_cli_error(text: str) -> str:
    """The error code from ``karma8: error: CODE: message``."""
    for line in text.splitlines():
        if line.startswith("karma8: error: "):
            return line.removeprefix("karma8: error: ").split(":", 1)[0].strip() or "error"
    return "error"


async def client_kill(ctx: Chaos, rng: random.Random) -> None:
    """One ``karma8 upload`` process, SIGKILLed while its upload is in progress."""
    name = rng.choice(ctx.ledger.names)
    size = log_uniform_size(rng, ctx.options.max_size, KILL_FLOOR)
    seed = rng.getrandbits(64)
    delay = CLIENT_KILL_DELAY.draw(rng)
    op = ctx.next_op()
    src, out = ctx.work / "client-kill.up", ctx.work / "client-kill.out"
    async with ctx.locks[name]:
        sha = await trio.to_thread.run_sync(write_content, src, seed, size)
        before = await ctx.registry.in_progress(name)
        api = ctx.stack.pick_url()
        with out.open("wb") as output:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "karma8", "upload", str(src), "--name", name, "--api", api],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=ctx.stack.env,
            )
        killed = False
        try:
            with trio.move_on_after(CLIENT_START_TIMEOUT):
                # Polling another process's registry: there is no event to wait on.
                while proc.returncode is None and not (await ctx.registry.in_progress(name)) - before:  # noqa: ASYNC110
                    await trio.sleep(POLL)
                await trio.sleep(delay)
            if proc.returncode is None:
                proc.kill()
                killed = True
            await proc.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()
            ctx.ledger.upload_unknown(name, sha, op, "client killed at the end of the run")
            raise
        text = out.read_text(errors="replace")
        with contextlib.suppress(FileNotFoundError):
            src.unlink()
        if killed and proc.returncode == -9:
            ctx.stats.op("client_kill_upload", "killed")
            ctx.stats.faults["client_kill"] += 1
            ctx.stats.unknown_outcomes += 1
            ctx.ledger.upload_unknown(name, sha, op, "client SIGKILLed")
            await ctx.settle(name, "a SIGKILLed client")
            return
        ctx.stats.fault_misses["client_kill"] += 1
        if proc.returncode == 0:
            ctx.stats.op("client_kill_upload", "ok")
            ctx.stats.acknowledged += 1
            ctx.stats.bytes_uploaded += size
            if sha not in text:
                ctx.stats.violation(f"{op} karma8 upload of {name!r} printed {text.strip()!r}, sent {sha}")
            ctx.ledger.upload_acked(name, sha, op)
            return
        code = _parse_cli_error(text)
        ctx.stats.op("client_kill_upload", code)
        if code == "connection_failed" and "cannot reach" not in text:
            ctx.stats.unknown_outcomes += 1
            ctx.ledger.upload_unknown(name, sha, op, code)
            await ctx.settle(name, "a lost connection")
        else:
            ctx.ledger.upload_failed(name, sha, op, code)
        await trio.sleep(0.05)


async def _cycle(ctx: Chaos, child: Child, kind: str, downtime: float) -> None:
    """SIGKILL ``child``, wait ``downtime``, start it again."""
    async with child.lock:
        if not child.running:
            return
        await ctx.stack.kill(child)
        ctx.stats.faults[kind] += 1
        await trio.sleep(downtime)
        await ctx.stack.start(child)


async def kill_buckets(ctx: Chaos, rng: random.Random) -> None:
    """Kill a random bucket every ``--bucket-kill-every`` seconds (one at a time)."""
    while True:
        wait = ctx.options.bucket_kill_every.draw(rng)
        victim = rng.randrange(len(ctx.stack.buckets))
        downtime = ctx.options.bucket_downtime.draw(rng)
        if await ctx.sleep_or_stop(wait):
            return
        await _cycle(ctx, ctx.stack.buckets[victim], "bucket_kill", downtime)


async def kill_api(ctx: Chaos, rng: random.Random) -> None:
    """Kill an API server (a random one of several) every ``--api-kill-every`` seconds."""
    while True:
        wait = ctx.options.api_kill_every.draw(rng)
        apis = ctx.stack.apis
        victim = apis[rng.randrange(len(apis))] if len(apis) > 1 else apis[0]
        downtime = ctx.options.api_downtime.draw(rng)
        if await ctx.sleep_or_stop(wait):
            return
        await _cycle(ctx, victim, "api_kill", downtime)


async def lose_buckets(ctx: Chaos, rng: random.Random) -> None:
    """Replace a random bucket by an empty one every ``--bucket-loss-every`` seconds."""
    every = ctx.options.bucket_loss_every
    if every is None:
        return
    while True:
        wait = every.draw(rng)
        victim = ctx.stack.buckets[rng.randrange(len(ctx.stack.buckets))]
        if await ctx.sleep_or_stop(wait):
            return
        async with victim.lock:
            if victim.running:
                await ctx.stack.replace(victim)
                ctx.stats.faults["bucket_loss"] += 1


async def flip_bits(ctx: Chaos, rng: random.Random) -> None:
    """Flip one bit of a random fragment (file or needle) every ``--bit-flip-every`` seconds."""
    every = ctx.options.bit_flip_every
    if every is None:
        return
    flipped: set[str] = set()  # upload ids: one flip per version of a file
    while True:
        wait = every.draw(rng)
        pick = rng.random()
        if await ctx.sleep_or_stop(wait):
            return
        dirs = [ctx.stack.bucket_dir(i) for i in range(len(ctx.stack.buckets))]
        spots = await trio.to_thread.run_sync(_fragments, dirs)
        candidates = [s for s in spots if s.upload_id not in flipped]
        if not candidates:
            ctx.stats.fault_misses["bit_flip"] += 1
            continue
        spot = candidates[int(pick * len(candidates))]
        if not await ctx.registry.fully_protected(spot.upload_id):
            ctx.stats.fault_misses["bit_flip"] += 1  # owed a fragment, in repair, or not committed
            continue
        if await trio.to_thread.run_sync(_flip, spot, rng.getrandbits(64)):
            flipped.add(spot.upload_id)
            ctx.stats.faults["bit_flip"] += 1
        else:
            ctx.stats.fault_misses["bit_flip"] += 1


class Spot(NamedTuple):
    """Where a fragment lies: a file (``start`` 0, ``size`` None: the whole file may be hit)
    or a needle's data in a volume (``size`` bytes from ``start``)."""

    fragment_id: str
    path: Path
    start: int
    size: int | None

    @property
    def upload_id(self) -> str:
        return self.fragment_id.split(".")[0]


def _fragments(dirs: list[Path]) -> list[Spot]:
    """Non-empty fragments on the disks, files and needles (they come and go while we look)."""
    out: list[Spot] = []
    for root in dirs:
        needles: dict[str, Needle] = {}
        with contextlib.suppress(FileNotFoundError):  # a volume compacted away meanwhile
            if (root / "volumes").exists():
                needles = scan(root / "volumes")
        for fid, needle in needles.items():
            if needle.size > 0:
                out.append(Spot(fid, needle.path, needle.data_offset, needle.size))
        for parent, _, names in os.walk(root / "fragments"):
            for name in sorted(names):
                path = Path(parent) / name
                with contextlib.suppress(FileNotFoundError):
                    if name not in needles and path.stat().st_size > 0:
                        out.append(Spot(name, path, 0, None))
    return sorted(out)


def _flip(spot: Spot, seed: int) -> bool:
    """Flip one bit of the fragment at ``spot`` in place; False if it went away meanwhile.

    A needle's volume is checked again under the flip: the needle must still start where
    the scan found it (compaction moves needles)."""
    bits = random.Random(seed)
    try:
        with spot.path.open("r+b") as f:
            if spot.size is None:
                offset = bits.randrange(f.seek(0, 2))
            else:
                f.seek(spot.start - HEADER_SIZE)
                header = decode_header(f.read(HEADER_SIZE))
                if header is None or header.fragment_id != spot.fragment_id or header.size != spot.size:
                    return False
                offset = spot.start + bits.randrange(spot.size)
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ (1 << bits.randrange(8))]))
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return True


async def kill_sockets(ctx: Chaos, rng: random.Random) -> None:
    """An upload cut mid-stream every ``--socket-kill-every`` seconds."""
    while not await ctx.sleep_or_stop(ctx.options.socket_kill_every.draw(rng)):
        await socket_kill(ctx, rng)


async def kill_clients(ctx: Chaos, rng: random.Random) -> None:
    """A ``karma8 upload`` process killed mid-upload every ``--client-kill-every`` seconds."""
    while not await ctx.sleep_or_stop(ctx.options.client_kill_every.draw(rng)):
        await client_kill(ctx, rng)
