"""The rebalancer's bounded, read-only plan (karma8/registry/planning.py), on SQLite and
PostgreSQL: it agrees with a run move for move, in tiny chunks and batches, and its
bounds (moves computed, moves shown) hold."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from karma8.registry import planning
from karma8.registry.db import BucketSpace, MoveRow, RegistryDB, UploadRow

GiB = 1 << 30
PARTS = 3
DIGEST = "cd" * 32


@pytest.fixture
def db(registry_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RegistryDB]:
    # Tiny chunks and batches: every boundary is crossed many times.
    monkeypatch.setattr(planning, "CHUNK", 2)
    monkeypatch.setattr(planning, "BATCH", 4)
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


def _capacities(n: int) -> dict[str, int]:
    return {f"b{i}": GiB for i in range(n)}


def _put(db: RegistryDB, n: int, part: int, buckets: int = PARTS) -> str:
    upload_id = f"{n * 7919 % 4096:03x}{n:029x}"  # ids not in insertion order
    live = [BucketSpace(f"b{i}", GiB, GiB) for i in range(buckets)]
    db.place_upload(
        UploadRow(upload_id, f"f{n}", part * PARTS, PARTS, 1, "in_progress"), [part] * PARTS, live
    )
    db.commit_upload(upload_id, DIGEST, {p: f"{p:064x}" for p in range(PARTS)}, now=1.0)
    return upload_id


def _fill(db: RegistryDB, files: int = 40) -> None:
    """Files on b0..b2: many of one size (ties in the order), some of others."""
    for n in range(files):
        _put(db, n, 100 if n % 3 else 100 + n)


def _run(db: RegistryDB, live: dict[str, int], tolerance: float) -> list[MoveRow]:
    """A run, each move finished and its stale copy deleted (what a plan assumes)."""
    done = []
    while (move := db.start_move(live, tolerance, PARTS)) is not None:
        assert db.finish_move(move)
        db.stale_deleted(move.src, move.upload_id, [move.part])
        done.append(move)
    return done


@contextlib.contextmanager
def _no_writes(db: RegistryDB) -> Iterator[None]:
    def refused() -> None:
        raise AssertionError("a plan opened a write transaction")

    db.database.transaction = refused  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del db.database.transaction


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_a_plan_is_what_a_run_does_move_for_move(db: RegistryDB, tolerance: float) -> None:
    _fill(db)
    live = _capacities(5)
    with _no_writes(db):
        plan = db.rebalance_plan(live, tolerance, PARTS)
    assert plan.complete
    assert plan.count > 20
    done = _run(db, live, tolerance)
    assert [(m.upload_id, m.part, m.src, m.dst) for m in plan.shown] == [
        (m.upload_id, m.part, m.src, m.dst) for m in done
    ]
    assert (plan.bytes, plan.count) == (sum(m.size for m in done), len(done))
    changes: dict[str, tuple[int, int]] = {}
    for m in done:
        for bucket, sign in ((m.src, -1), (m.dst, 1)):
            size, n = changes.get(bucket, (0, 0))
            changes[bucket] = (size + sign * m.size, n + sign)
    assert dict(plan.changes) == changes
    assert {m.name for m in plan.shown} <= {f"f{n}" for n in range(40)}


def test_few_large_fragments_plan_as_a_run_moves_them(db: RegistryDB) -> None:
    # A young cluster: no fragment fits the gaps, so moves may overshoot a target.
    for n, size in enumerate((900, 700, 500)):
        _put(db, n, size)
    live = _capacities(4)
    plan = db.rebalance_plan(live, 0.0, PARTS)
    done = _run(db, live, 0.0)
    assert done
    assert [(m.upload_id, m.part, m.dst) for m in plan.shown] == [(m.upload_id, m.part, m.dst) for m in done]


def test_a_plan_stops_at_its_bound_and_shows_its_first_moves(db: RegistryDB) -> None:
    _fill(db)
    live = _capacities(5)
    whole = db.rebalance_plan(live, 0.0, PARTS)
    cut = db.rebalance_plan(live, 0.0, PARTS, shown=3, most=7)
    assert not cut.complete
    assert cut.count == 7
    assert cut.shown == whole.shown[:3]
    assert cut.bytes == sum(m.size for m in whole.shown[:7])
    shown = db.rebalance_plan(live, 0.0, PARTS, shown=2)
    assert shown.complete
    assert (shown.count, shown.bytes, len(shown.shown)) == (whole.count, whole.bytes, 2)
    # Exactly as many moves as the bound: complete.
    exact = db.rebalance_plan(live, 0.0, PARTS, most=whole.count)
    assert exact.complete
    assert exact.count == whole.count


def test_a_plan_of_balanced_buckets_is_empty(db: RegistryDB) -> None:
    _fill(db, 6)
    plan = db.rebalance_plan(_capacities(3), 0.0, PARTS)
    assert (plan.count, plan.bytes, plan.shown, plan.complete) == (0, 0, (), True)
