"""The end of a chaos run: wait for reconciliation, then check the registry against the disks.

Reconciled means: every bucket live, no pending deletion and no upload in progress in the
registry, the fragment files on all bucket disks exactly the fragments of committed files
(each with the size and checksum the registry records), and no temporary file. The wait
ends when the differences stop shrinking for ``--settle-timeout`` seconds; whatever still
differs then is reported, one violation per fragment.
"""

from __future__ import annotations

import dataclasses

import trio
from chaos_ops import Chaos
from chaos_store import Comparison, Disks, Snapshot, compare, scan_disks

from karma8.errors import Karma8Error

POLL = 0.5
#: The longest the end of a run waits for reconciliation, progress or not.
SETTLE_CAP = 900.0


async def look(ctx: Chaos) -> tuple[Snapshot, Disks, Comparison]:
    """The registry, then the disks, and how they differ.

    Deletions pending on a bucket lost for good can never happen (nor need to): they are
    left out, and counted.
    """
    snapshot = await ctx.registry.snapshot()
    dirs = [ctx.stack.bucket_dir(i) for i in range(len(ctx.stack.buckets))]
    disks = await trio.to_thread.run_sync(scan_disks, dirs)
    comparison = compare(snapshot, disks)
    lost = ctx.stack.lost_ids
    ctx.stats.pending_on_lost = sum(b in lost for _, b in comparison.pending)
    comparison = dataclasses.replace(
        comparison, pending=[(u, b) for u, b in comparison.pending if b not in lost]
    )
    return snapshot, disks, comparison


async def wait_reconciled(ctx: Chaos) -> tuple[Snapshot, Disks, Comparison, float]:
    """Poll until reconciled; return the last look and how long it took.

    Gives up when the differences have not shrunk for ``--settle-timeout`` seconds (a
    backlog that is still being worked off is waited for), or after ``SETTLE_CAP``.
    """
    started = trio.current_time()
    want = len(ctx.stack.buckets)
    best: int | None = None
    last_progress = started
    with trio.move_on_after(max(SETTLE_CAP, ctx.options.settle_timeout)):
        while True:
            snapshot, disks, comparison = await look(ctx)
            if best is None:
                # What the janitor and the reconciliation still had to clean when chaos stopped.
                ctx.stats.backlog_fragments = len(comparison.orphans)
                ctx.stats.backlog_pending = len(comparison.pending)
            if comparison.clean and await ctx.stack.live_count() == want:
                break
            now = trio.current_time()
            if best is None or comparison.size < best:
                best, last_progress = comparison.size, now
            elif now - last_progress > ctx.options.settle_timeout:
                break
            await trio.sleep(POLL)
    ctx.stats.settle_seconds = trio.current_time() - started
    return snapshot, disks, comparison, ctx.stats.settle_seconds


async def report(ctx: Chaos, snapshot: Snapshot, disks: Disks, comparison: Comparison) -> None:
    """Turn every difference into a violation with what the registry says about it."""
    stats = ctx.stats
    stats.orphans = len(comparison.orphans)
    stats.missing = len(comparison.missing)
    stats.tmp_files = len(comparison.tmp)
    for key in comparison.orphans:
        frag = disks.fragments[key]
        stats.violation(
            f"orphan: {frag.bucket} (bucket {key[0]}) holds {key[1]} ({frag.size} bytes,"
            f" {frag.age:.0f} s old) that no committed file uses; {await ctx.registry.explain(key)}"
        )
    for key in comparison.missing:
        want = snapshot.committed[key]
        stats.violation(
            f"missing: bucket {key[0]} lacks {key[1]} ({want.size} bytes) of committed file"
            f" {want.name!r} (upload {want.upload_id})"
        )
    for line in comparison.damaged:
        stats.violation(f"damaged fragment: {line}")
    for path in comparison.tmp:
        stats.violation(f"temporary file left: {path}")
    for upload_id, bucket_id in comparison.pending:
        stats.violation(f"deletion still pending: fragments of upload {upload_id} on bucket {bucket_id}")
    for upload_id, name in comparison.in_progress:
        stats.violation(f"upload {upload_id} of {name!r} still in progress")
    for line in comparison.inconsistent:
        stats.violation(f"registry: {line}")
    for line in comparison.repairs:
        stats.violation(f"not repaired: {line}")


async def scrub(ctx: Chaos, final: bool) -> int:
    """``verify`` every file (queues damaged fragments for repair); with ``final``, each
    damaged fragment is a violation. Returns how many were damaged."""
    try:
        report = await ctx.client.verify()
    except Karma8Error as exc:
        if final:
            ctx.stats.violation(f"the final scrub failed: {exc!r}")
        return 0
    damaged = report["damaged"]
    if final:
        ctx.stats.damaged_after_repair = len(damaged)
        for d in damaged:
            ctx.stats.violation(
                f"damaged after repair: {d['name']!r} part {d['part']} on {d['bucket']}: {d['problem']}"
            )
    return len(damaged)
