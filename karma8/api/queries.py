"""The one-frame endpoints: /files, /stat, /delete, /status, /rebalance."""

from __future__ import annotations

import math

import trio

from karma8.api.cluster import BucketState, Cluster
from karma8.api.reconcile import Inventory
from karma8.api.session import Session
from karma8.config import ApiConfig
from karma8.core import balance
from karma8.core.balance import Fill
from karma8.core.fragments import fragment_id
from karma8.core.health import file_health, fragment_state
from karma8.core.listing import MAX_PAGE, ListQuery
from karma8.core.protocol import encode_ok
from karma8.errors import NotFound, TooLarge
from karma8.registry.planning import PLAN_SHOWN  # moves listed in a dry run's reply


async def handle_files(session: Session, query: ListQuery) -> None:
    """``/files``: one page of committed files by name (and common prefixes under a
    delimiter) with the token of the next; without paging parameters (the old form), the
    whole listing when it fits one page, else ``too_large``."""
    page = await session.services.registry.list_page(query)
    files = [{"name": n, "size": s, "sha256": h, "created": c} for n, s, h, c in page.files]
    if not query.paged:
        if page.next is not None:
            raise TooLarge(
                f"more than {MAX_PAGE} files match: too many for one reply; ask page by page"
                " with limit= and continuation= (see docs/protocol.md; karma8 clients since 0.3 do)"
            )
        await session.send(encode_ok(files=files))
        return
    token = None if page.next is None else page.next.token()
    reply = encode_ok(files=files, prefixes=page.prefixes, truncated=token is not None, next=token)
    await session.send(reply)


async def handle_stat(session: Session, name: str) -> None:
    """``/stat/{name}``: a file and where each of its parts lives."""
    services = session.services
    found, repairing = await services.registry.lookup_repairing(name)
    if found is None:
        raise NotFound(name)
    corrupt = services.reconciler.corrupt
    parts: list[dict[str, object]] = []
    scheme = found.upload.scheme
    rows = {f.part: f for f in found.fragments}
    for part in range(max(scheme.width, len(rows))):
        f = rows.get(part)
        role = "data" if part < scheme.data else "parity"
        if f is None:  # never placed: too few buckets were live
            state = "repairing" if part in repairing else "owed"
            parts.append(
                {
                    "part": part,
                    "role": role,
                    "state": state,
                    "bucket": None,
                    "address": "",
                    "live": False,
                    "size": 0,
                    "sha256": None,
                    "problem": None,
                }
            )
            continue
        fid = fragment_id(f.upload_id, f.part)
        live = services.cluster.is_live(f.bucket_id)
        missing = services.reconciler.is_missing(f.bucket_id, fid)
        problem = "missing" if missing else "corrupt" if fid in corrupt else None
        state = fragment_state(
            f.state, live=live, missing=missing, corrupt=fid in corrupt, repairing=part in repairing
        )
        parts.append(
            {
                "part": f.part,
                "role": role,
                "state": state,
                "bucket": f.bucket_id,
                "address": services.cluster.address(f.bucket_id),
                "live": live,
                "size": f.size,
                "sha256": f.sha256,
                "problem": problem,
            }
        )
    health, tolerates = file_health((str(p["state"]) for p in parts), scheme.data, scheme.width)
    await session.send(
        encode_ok(
            name=found.name,
            size=found.size,
            sha256=found.sha256,
            created=found.created,
            upload_id=found.upload.upload_id,
            stripe_unit=found.upload.unit,
            scheme=str(scheme),
            data_parts=scheme.data,
            parity=scheme.parity,
            format=found.upload.format,
            health=health,
            tolerates=tolerates,
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
    services = session.services
    cluster = services.cluster
    inventories = services.reconciler.inventories
    placed = await services.registry.placed()
    buckets = [
        _bucket_row(s, cluster.is_live(s.bucket_id), inventories.get(s.bucket_id), placed.get(s.bucket_id))
        for s in cluster.states()
    ]
    fills = [
        Fill(s.bucket_id, s.usage.used, s.usage.capacity)
        for s in cluster.states()
        if cluster.is_live(s.bucket_id)
    ]
    rebalancer = services.rebalancer
    repairs = await services.registry.repair_summary()
    holders = await services.registry.lease_holders()
    servers = [
        {
            "id": server,
            "address": address,
            "seen_ago": round(age, 3),
            "alive": age < session.config.server_timeout,
        }
        for server, address, age in await services.registry.servers()
    ]
    await session.send(
        encode_ok(
            server=services.registry.db.server_id,
            servers=servers,
            jobs={
                job: {"holder": h, "epoch": e, "valid": left > 0}
                for job, (h, e, left) in sorted(holders.items())
            },
            parts=session.config.parts,
            live=len(fills),
            spread=_finite(balance.spread(fills)),
            buckets=buckets,
            rebalancer={
                **rebalancer.progress.as_dict(),
                "threshold": session.config.rebalance_threshold,
                "auto": session.config.rebalance_auto,
                "last": rebalancer.last.as_dict() if rebalancer.last else None,
            },
            protection=_protection(session.config, len(fills)),
            repair={
                **repairs,
                **services.repairer.progress.as_dict(),
                "eta": services.repairer.progress.eta(repairs["bytes"]),
                "lost_after": session.config.repair_after,
                "down": _down(cluster, session.config.repair_after),
            },
        )
    )


def _down(cluster: Cluster, repair_after: float) -> list[dict[str, object]]:
    """Buckets not live: for how long, and in how long they count as lost."""
    out: list[dict[str, object]] = []
    for s in cluster.states():
        down = cluster.down_for(s.bucket_id)
        if down > 0:
            lost_in = max(0.0, repair_after - down)
            out.append({"id": s.bucket_id, "down_for": round(down, 1), "lost_in": round(lost_in, 1)})
    return out


def _protection(config: ApiConfig, live: int) -> dict[str, object]:
    """The scheme configured, and what new files get with ``live`` buckets."""
    width = config.parts + config.parity
    now = max(0, min(live, width) - config.parts)
    out: dict[str, object] = {
        "configured": f"{config.parts}+{config.parity}",
        "new_files": f"{config.parts}+{now}" if live >= config.parts else "refused (not enough buckets)",
        "write_quorum": config.quorum,
    }
    if live < width:
        out["warning"] = (
            f"only {live} live bucket(s): new files get {now} of {config.parity} parity fragments"
            f" now and survive the loss of {now} bucket(s); the rest is owed to repair"
        )
    return out


async def handle_rebalance(session: Session, dry_run: bool) -> None:
    """``/rebalance``: start a rebalance now; with ``dry_run``, only show its plan."""
    services = session.services
    rebalancer = services.rebalancer
    fills = await rebalancer.fills()
    plan = await rebalancer.plan()
    fills_after = [
        Fill(f.bucket_id, f.used + plan.changes.get(f.bucket_id, (0, 0))[0], f.capacity) for f in fills
    ]
    summary = {
        "dry_run": dry_run,
        "bytes": plan.bytes,
        "count": plan.count,
        "complete": plan.complete,
        "minimum": balance.minimum_to_move(fills, rebalancer.spread_parts(len(fills))),
        "spread": _finite(balance.spread(fills)),
        "spread_after": _finite(balance.spread(fills_after)),
    }
    if dry_run:
        shown = [
            {"name": m.name, "part": m.part, "size": m.size, "from": m.src, "to": m.dst}
            for m in plan.shown[:PLAN_SHOWN]
        ]
        changes = {b: {"bytes": n, "fragments": k} for b, (n, k) in sorted(plan.changes.items())}
        truncated = len(shown) < plan.count or not plan.complete
        await session.send(encode_ok(**summary, changes=changes, moves=shown, truncated=truncated))
        return
    if plan.count:
        rebalancer.request("requested by a client")
        session.log.info("rebalance requested: %d move(s), %d bytes", plan.count, plan.bytes)
    await session.send(encode_ok(**summary, started=bool(plan.count)))


async def handle_repair(session: Session) -> None:
    """``/repair``: look at the repair queue now, every waiting file included."""
    services = session.services
    services.repairer.joined()
    session.log.info("repair requested")
    await session.send(encode_ok(**await services.registry.repair_summary(), started=True))


def _finite(value: float) -> float | None:
    """JSON has no infinity: an empty bucket next to a used one makes the spread None."""
    return None if math.isinf(value) else round(value, 4)


def _bucket_row(
    s: BucketState, live: bool, inv: Inventory | None, placed: tuple[int, int] | None
) -> dict[str, object]:
    seen = None if s.last_seen == float("-inf") else round(trio.current_time() - s.last_seen, 3)
    return {
        "id": s.bucket_id,
        "address": s.address,
        "live": live,
        "used": s.usage.used,
        "free": s.usage.free,
        "capacity": s.usage.capacity,
        "fill": round(s.usage.used / s.usage.capacity, 6) if s.usage.capacity else None,
        "fragments": s.usage.fragments,
        # What the registry places there (the bucket's own figures lag a heartbeat and
        # include copies still waiting for deletion).
        "placed": placed[0] if placed else 0,
        "placed_fragments": placed[1] if placed else 0,
        # From the last reconciliation (None until the first one).
        "unknown_fragments": inv.unknown if inv else None,
        "missing_fragments": inv.missing_count if inv else None,
        "orphans_deleted": inv.orphans_deleted if inv else None,
        "last_seen_ago": seen,
    }
