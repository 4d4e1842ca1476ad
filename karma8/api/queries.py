"""The one-frame endpoints: /files, /stat, /delete, /status."""

from __future__ import annotations

import trio

from karma8.api.cluster import BucketState
from karma8.api.reconcile import Inventory
from karma8.api.session import Session
from karma8.core.fragments import fragment_id
from karma8.core.protocol import encode_ok
from karma8.errors import NotFound


async def handle_files(session: Session, prefix: str) -> None:
    """``/files?prefix=``: committed files, by name."""
    rows = await session.services.registry.list_files(prefix)
    files = [{"name": n, "size": s, "sha256": h, "created": c} for n, s, h, c in rows]
    await session.send(encode_ok(files=files))


async def handle_stat(session: Session, name: str) -> None:
    """``/stat/{name}``: a file and where each of its parts lives."""
    services = session.services
    found = await services.registry.lookup(name)
    if found is None:
        raise NotFound(name)
    missing = services.reconciler.missing()
    corrupt = services.reconciler.corrupt
    parts = []
    for f in found.fragments:
        fid = fragment_id(f.upload_id, f.part)
        problem = "missing" if fid in missing else "corrupt" if fid in corrupt else None
        parts.append(
            {
                "part": f.part,
                "bucket": f.bucket_id,
                "address": services.cluster.address(f.bucket_id),
                "live": services.cluster.is_live(f.bucket_id),
                "size": f.size,
                "sha256": f.sha256,
                "problem": problem,
            }
        )
    await session.send(
        encode_ok(
            name=found.name,
            size=found.size,
            sha256=found.sha256,
            created=found.created,
            upload_id=found.upload.upload_id,
            stripe_unit=found.upload.unit,
            damaged=any(p["problem"] for p in parts),
            parts=parts,
        )
    )


async def handle_delete(session: Session, name: str) -> None:
    """``/delete/{name}``: forget the file now; its fragments go in the background."""
    services = session.services
    upload_id = await services.registry.delete_file(name)
    if upload_id is None:
        raise NotFound(name)
    session.log.info("deleted name=%r upload=%s", name, upload_id)
    services.janitor.poke()
    await session.send(encode_ok(name=name, deleted=True))


async def handle_status(session: Session) -> None:
    """``/status``: every known bucket, live or not, with its usage and last reconciliation."""
    cluster = session.services.cluster
    inventories = session.services.reconciler.inventories
    buckets = [
        _bucket_row(s, cluster.is_live(s.bucket_id), inventories.get(s.bucket_id)) for s in cluster.states()
    ]
    await session.send(
        encode_ok(
            parts=session.config.parts,
            live=sum(b["live"] is True for b in buckets),
            buckets=buckets,
        )
    )


def _bucket_row(s: BucketState, live: bool, inv: Inventory | None) -> dict[str, object]:
    seen = None if s.last_seen == float("-inf") else round(trio.current_time() - s.last_seen, 3)
    return {
        "id": s.bucket_id,
        "address": s.address,
        "live": live,
        "used": s.usage.used,
        "free": s.usage.free,
        "capacity": s.usage.capacity,
        "fragments": s.usage.fragments,
        # From the last reconciliation (None until the first one).
        "unknown_fragments": inv.unknown if inv else None,
        "missing_fragments": len(inv.missing) if inv else None,
        "orphans_deleted": inv.orphans_deleted if inv else None,
        "last_seen_ago": seen,
    }
