"""The rebalancer's plan, computed read-only in bounded memory (issue 14).

A run (:meth:`karma8.registry.db.RegistryDB.start_move`) asks for one move at a time and
records it; a plan (the dry run, and the totals a run announces) must say what such a
run would do without recording anything. It follows :func:`karma8.core.balance.plan`
over the registry as it is, with the plan's own moves kept beside it (an *overlay*: the
fragments moved, the buckets each upload received a part on), and reads the registry a
few rows at a time on a reading connection: no write transaction, so no writer waits.

What it keeps: totals (bytes, moves), the change of every bucket, the first ``shown``
moves, and the overlay, which is what bounds it: a plan stops after ``most`` moves
(:data:`PLAN_MAX`), says so (``complete`` false), and a run then goes on until the
buckets are even. The overlay costs about 200 bytes a move (20 MB at the bound).

Finding each move must not rescan what earlier moves passed over (a source's largest
fragments are often parts of files that already have a part on the destination, or
are moved already). Fragments are taken in one total order, size then upload id then
part, largest first (the index ``fragments_bucket_size``), and each (source,
destination) pair remembers where its last answer was: while neither bucket changed
sides (the source never gained, the destination never lost), its size limit only
shrinks and fragments only stop being eligible, so the next answer is at or after that
place. A run's query (:data:`karma8.registry.db._LARGEST`) takes the same order, so the
plan and a run of it agree move for move.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from karma8.core import balance
from karma8.registry.database import Database, Tx

#: Moves a plan computes at most (its overlay's bound); a run goes on until even.
PLAN_MAX = 100_000
#: Moves a plan keeps to show (``/rebalance?dry_run=1``).
PLAN_SHOWN = 1000
#: Moves planned per reading connection held (then it is given back and taken again).
CHUNK = 1000
#: Rows read per query at most while looking for a fragment to move.
BATCH = 256

# Fragments on the source (first argument) that may move to the destination, by the
# registry's rows: parts of committed files, not moving already, with no stale copy on
# the destination and (``{onto}``) no part there. ``{bound}`` limits the size, or the
# (size, upload id, part) position; ``{order}`` is the order both directions read.
MOVABLE = """
SELECT f.upload_id, f.part, f.size FROM fragments f JOIN uploads u ON u.id = f.upload_id
WHERE f.bucket_id = ? AND {bound} AND f.size > 0 AND u.state = 'committed' AND f.state = 'ok'{onto}
  AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.upload_id = f.upload_id AND (m.part = f.part OR m.dst = ?))
  AND NOT EXISTS (SELECT 1 FROM stale s WHERE s.bucket_id = ? AND s.upload_id = f.upload_id)
ORDER BY {order} LIMIT ?
"""
ONTO = "\n  AND NOT EXISTS (SELECT 1 FROM fragments g WHERE g.upload_id = f.upload_id AND g.bucket_id = ?)"
DOWN = "f.size DESC, f.upload_id DESC, f.part DESC"
UP = "f.size, f.upload_id, f.part"
KEY = "(f.size, f.upload_id, f.part)"

Found = tuple[str, int, int]


def movable_sql(bound: str, order: str, onto: bool = True) -> str:
    """:data:`MOVABLE` with its size bound and order; arguments: source, the bound's,
    [destination,] destination, destination, limit."""
    return MOVABLE.format(bound=bound, order=order, onto=ONTO if onto else "")


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """A move of a plan, with what people are shown of it."""

    upload_id: str
    part: int
    size: int
    src: str
    dst: str
    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What a rebalance run would do now (recorded nowhere)."""

    #: Bytes and moves planned.
    bytes: int
    count: int
    #: Per bucket: (bytes, fragments) it would gain (negative: lose).
    changes: Mapping[str, tuple[int, int]]
    #: The first moves, in plan order.
    shown: tuple[PlannedMove, ...]
    #: False when the plan stopped at its bound before the buckets were even (a run goes
    #: on); True when it reached balance or nothing more can move closer to it.
    complete: bool


@dataclass
class _Cursor:
    """Where a (source, destination) pair's last answer was, and when it holds."""

    #: (size, upload id, part) of the last answer; None: nothing is left for the pair.
    at: tuple[int, str, int] | None
    #: The source's gains and the destination's losses when it was set.
    version: tuple[int, int]


@dataclass
class Overlay:
    """:class:`karma8.core.balance.Movable` over the registry plus the plan's own moves."""

    #: The reading connection the plan holds now.
    tx: Tx | None = None
    #: Upload id -> bit mask of its parts the plan moved.
    moved: dict[str, int] = field(default_factory=dict)
    #: Upload id -> buckets the plan moved one of its parts to.
    onto: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gains: dict[str, int] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)
    cursors: dict[tuple[str, str], _Cursor] = field(default_factory=dict)

    def apply(self, move: balance.Move) -> None:
        """The plan makes ``move``: later answers see the fragment on its destination."""
        self.moved[move.upload_id] = self.moved.get(move.upload_id, 0) | (1 << move.part)
        self.onto[move.upload_id] = (*self.onto.get(move.upload_id, ()), move.dst)
        self.gains[move.dst] = self.gains.get(move.dst, 0) + 1
        self.losses[move.src] = self.losses.get(move.src, 0) + 1

    def largest(self, src: str, dst: str, limit: int) -> Found | None:
        version = (self.gains.get(src, 0), self.losses.get(dst, 0))
        cursor = self.cursors.get((src, dst))
        if cursor is not None and cursor.version != version:
            cursor = None
        if cursor is not None and cursor.at is None:
            return None  # nothing was left for the pair, and nothing came back since
        if cursor is not None and cursor.at is not None and cursor.at[0] <= limit:
            found = self._first(src, dst, DOWN, f"{KEY} <= (?, ?, ?)", cursor.at)
        else:
            found = self._first(src, dst, DOWN, "f.size <= ?", (limit,))
        self.cursors[(src, dst)] = _Cursor(None if found is None else (found[2], found[0], found[1]), version)
        return found

    def smallest(self, src: str, dst: str, above: int) -> Found | None:
        # Rare (few, large fragments), and its bound moves both ways: no cursor.
        return self._first(src, dst, UP, "f.size > ?", (above,))

    def _first(self, src: str, dst: str, order: str, bound: str, args: tuple[object, ...]) -> Found | None:
        """The first fragment in ``order`` within ``bound`` that may move from ``src`` to
        ``dst`` once the plan's moves are made, read a few rows at a time (more, up to
        ``BATCH``, while rows are refused)."""
        # A destination that lost parts in the plan may take parts of their files again:
        # the registry's rows of it are then checked here instead of in the query.
        left = bool(self.losses.get(dst))
        onto: tuple[str, ...] = () if left else (dst,)
        step = "<" if order == DOWN else ">"
        batch = 4  # the first row usually answers; read more only while rows are refused
        while True:
            assert self.tx is not None
            rows = self.tx.execute(
                movable_sql(bound, order, onto=not left), (src, *args, *onto, dst, dst, batch)
            ).fetchall()
            for upload_id, part, size in rows:
                if self._eligible(str(upload_id), int(part), dst, left):
                    return str(upload_id), int(part), int(size)
            if len(rows) < batch:
                return None
            batch = min(BATCH, batch * 4)
            upload_id, part, size = rows[-1]
            bound, args = f"{KEY} {step} (?, ?, ?)", (int(size), str(upload_id), int(part))

    def _eligible(self, upload_id: str, part: int, dst: str, left: bool) -> bool:
        if self.moved.get(upload_id, 0) >> part & 1 or dst in self.onto.get(upload_id, ()):
            return False
        if not left:
            return True
        moved = self.moved.get(upload_id, 0)
        assert self.tx is not None
        there = self.tx.execute(
            "SELECT part FROM fragments WHERE upload_id = ? AND bucket_id = ?", (upload_id, dst)
        ).fetchall()
        return all(moved >> int(p) & 1 for (p,) in there)


def simulate(
    fills: list[balance.Fill], tolerance: float, parts: int, overlay: Overlay
) -> Iterator[balance.Move]:
    """The moves of a run from ``fills``, each applied to ``overlay`` once yielded."""
    for move in balance.plan(fills, tolerance, parts, overlay):
        overlay.apply(move)
        yield move


def compute(
    database: Database,
    fills: list[balance.Fill],
    tolerance: float,
    parts: int,
    *,
    shown: int = PLAN_SHOWN,
    most: int = PLAN_MAX,
) -> Plan:
    """The plan of a run from ``fills`` (the live buckets, moves under way counted as
    done), read from ``database`` ``CHUNK`` moves per reading connection held."""
    overlay = Overlay()
    moves = simulate(fills, tolerance, parts, overlay)
    total = count = 0
    changes: dict[str, tuple[int, int]] = {}
    first: list[PlannedMove] = []
    complete = True
    done = False
    while not done:
        with database.read() as tx:
            overlay.tx = tx
            for _ in range(CHUNK):
                move = next(moves, None)
                if move is None:
                    done = True
                    break
                if count == most:
                    complete, done = False, True
                    break
                total, count = total + move.size, count + 1
                for bucket, sign in ((move.src, -1), (move.dst, 1)):
                    size, n = changes.get(bucket, (0, 0))
                    changes[bucket] = (size + sign * move.size, n + sign)
                if len(first) < shown:
                    first.append(_shown(tx, move))
            overlay.tx = None
    return Plan(total, count, changes, tuple(first), complete)


def _shown(tx: Tx, move: balance.Move) -> PlannedMove:
    sha256, name = tx.execute(
        "SELECT f.sha256, u.name FROM fragments f JOIN uploads u ON u.id = f.upload_id"
        " WHERE f.upload_id = ? AND f.part = ?",
        (move.upload_id, move.part),
    ).fetchone()
    return PlannedMove(move.upload_id, move.part, move.size, move.src, move.dst, str(name), str(sha256 or ""))
