"""The end of a chaos run: wait for reconciliation, then check the registry against the disks.

Reconciled means: every bucket live, no pending deletion and no upload in progress in the
registry, the fragment files on all bucket disks exactly the fragments of committed files
(each with the size and checksum the registry records), and no temporary file. The wait
has a deadline; whatever still differs then is reported, one violation per fragment.
"""

from __future__ import annotations

import trio
from chaos_ops import Chaos
from chaos_store import Comparison, Disks, Snapshot, compare, scan_disks

POLL = 0.5


async def look(ctx: Chaos) -> tuple[Snapshot, Disks, Comparison]:
    """The registry, then the disks, and how they differ."""
    snapshot = await ctx.registry.snapshot()
    dirs = [ctx.stack.bucket_dir(i) for i in range(len(ctx.stack.buckets))]
    disks = await trio.to_thread.run_sync(scan_disks, dirs)
    return snapshot, disks, compare(snapshot, disks)


async def wait_reconciled(ctx: Chaos) -> tuple[Snapshot, Disks, Comparison, float]:
    """Poll until reconciled or ``--settle-timeout``; return the last look and its time."""
    started = trio.current_time()
    want = len(ctx.stack.buckets)
    with trio.move_on_after(ctx.options.settle_timeout):
        while True:
            snapshot, disks, comparison = await look(ctx)
            if comparison.clean and await ctx.stack.live_count() == want:
                return snapshot, disks, comparison, trio.current_time() - started
            await trio.sleep(POLL)
    # One more look, so the report is about the state at the deadline.
    snapshot, disks, comparison = await look(ctx)
    return snapshot, disks, comparison, trio.current_time() - started


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
