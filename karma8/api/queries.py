"""The one-frame endpoints: /files, /stat, /delete, /status."""

from __future__ import annotations

import trio

from karma8.api.session import Session
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
    parts = [
        {
            "part": f.part,
            "bucket": f.bucket_id,
            "address": services.cluster.address(f.bucket_id),
            "live": services.cluster.is_live(f.bucket_id),
            "size": f.size,
            "sha256": f.sha256,
        }
        for f in found.fragments
    ]
    await session.send(
        encode_ok(
            name=found.name,
            size=found.size,
            sha256=found.sha256,
            created=found.created,
            upload_id=found.upload.upload_id,
            stripe_unit=found.upload.unit,
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
    """``/status``: every known bucket, live or not, with its usage."""
    cluster = session.services.cluster
    now = trio.current_time()
    buckets = [
        {
            "id": s.bucket_id,
            "address": s.address,
            "live": cluster.is_live(s.bucket_id),
            "used": s.usage.used,
            "free": s.usage.free,
            "capacity": s.usage.capacity,
            "fragments": s.usage.fragments,
            "unknown_fragments": None if s.inventory is None else s.inventory.unknown,
            "missing_fragments": None if s.inventory is None else s.inventory.missing,
            "last_seen_ago": None if s.last_seen == float("-inf") else round(now - s.last_seen, 3),
        }
        for s in cluster.states()
    ]
    await session.send(
        encode_ok(
            parts=session.config.parts,
            live=sum(b["live"] is True for b in buckets),
            buckets=buckets,
        )
    )
