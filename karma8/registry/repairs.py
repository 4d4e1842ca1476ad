"""The repair queue: committed files with fewer good fragments than their scheme.

One row per file (``repairs``), kept in the registry so it survives restarts. ``spare``
is how many fragments beyond the data parts the file was last known to have (negative:
it cannot be read now); the repairer takes the lowest first. ``bad`` lists the parts
known to be damaged or gone (a failed read, a lost bucket, reconciliation, scrub), which
the registry's fragment rows alone do not show. A repair writes its new copies as moves
(``moves`` rows with no source), so a crash turns them into stale copies the janitor
deletes, exactly like an interrupted rebalancer move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from karma8.core.checksums import FORMAT
from karma8.registry import ledger
from karma8.registry.database import Database, Tx
from karma8.registry.leases import Fence, LeaseLost, check_fence, fence_holds
from karma8.registry.passes import PAGE, page_end

_UPSERT = """
INSERT INTO repairs (upload_id, spare, reason, since, next_try, bad) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (upload_id) DO UPDATE SET
    reason = CASE WHEN excluded.spare < repairs.spare THEN excluded.reason ELSE repairs.reason END,
    spare = CASE WHEN excluded.spare < repairs.spare THEN excluded.spare ELSE repairs.spare END,
    next_try = CASE WHEN excluded.next_try < repairs.next_try
               THEN excluded.next_try ELSE repairs.next_try END,
    bad = excluded.bad
"""


# Committed files with a fragment on a lost bucket, a page of its uploads at a time: their
# data parts, their parts on any lost bucket, their good fragments. Files also on a lost
# bucket walked before (``{earlier}``) were queued then.
_LOST = """
SELECT DISTINCT f.upload_id, u.parts,
    (SELECT {parts} FROM fragments g WHERE g.upload_id = f.upload_id AND g.state = 'ok'
     AND g.bucket_id IN ({lost})),
    (SELECT COUNT(*) FROM fragments g WHERE g.upload_id = f.upload_id AND g.state = 'ok')
FROM fragments f JOIN uploads u ON u.id = f.upload_id
WHERE f.bucket_id = ? AND f.upload_id > ?{upto} AND f.state = 'ok' AND u.state = 'committed'{earlier}
"""
_EARLIER = """ AND NOT EXISTS (SELECT 1 FROM fragments h WHERE h.upload_id = f.upload_id
     AND h.state = 'ok' AND h.bucket_id IN ({}))"""


@dataclass(frozen=True, slots=True)
class RepairRow:
    """A file waiting for repair."""

    upload_id: str
    spare: int
    reason: str
    since: float
    attempts: int
    bad: frozenset[int]


def _parts(text: str) -> frozenset[int]:
    return frozenset(int(p) for p in text.split(",") if p)


def _text(parts: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(set(parts)))


def _upsert(c: Tx, upload_id: str, reason: str, spare: int, now: float, bad: Iterable[int] = ()) -> None:
    row = c.execute("SELECT bad FROM repairs WHERE upload_id = ?", (upload_id,)).fetchone()
    known = _parts(row[0]) if row else frozenset()
    c.execute(_UPSERT, (upload_id, spare, reason, now, now, _text(known | set(bad))))


def queue_if_short(c: Tx, upload_id: str, reason: str, now: float) -> None:
    """Queue ``upload_id`` if it has fewer good fragments than its scheme."""
    parts, parity, good = c.execute(
        "SELECT u.parts, u.parity, (SELECT COUNT(*) FROM fragments f WHERE f.upload_id = u.id"
        " AND f.state = 'ok') FROM uploads u WHERE u.id = ?",
        (upload_id,),
    ).fetchone()
    if good < parts + parity:
        _upsert(c, upload_id, reason, good - parts, now)


class _DB(Protocol):
    _db: Database
    server_id: str

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]: ...

    def stored(self) -> tuple[int, int]: ...


class RepairQueue:
    """The repair queue's queries (mixed into :class:`karma8.registry.db.RegistryDB`)."""

    def queue_repair(
        self: _DB, upload_id: str, reason: str, spare: int, now: float, bad: Iterable[int] = ()
    ) -> None:
        """Queue a committed upload (or move it up, if ``spare`` is lower); add ``bad`` parts."""
        with self._db.transaction() as c:
            if c.execute(
                "SELECT 1 FROM uploads WHERE id = ? AND state = 'committed'", (upload_id,)
            ).fetchone():
                _upsert(c, upload_id, reason, spare, now, bad)

    def queue_bad_fragments(self: _DB, fragments: Iterable[tuple[str, int]], reason: str, now: float) -> int:
        """Queue the committed files of these (upload id, part) fragments, found missing or
        damaged; returns how many files were queued."""
        bad: dict[str, set[int]] = {}
        for upload_id, part in fragments:
            bad.setdefault(upload_id, set()).add(part)
        queued = 0
        with self._db.transaction() as c:
            for upload_id, parts in sorted(bad.items()):
                row = c.execute(
                    "SELECT u.parts, (SELECT COUNT(*) FROM fragments f WHERE f.upload_id = u.id"
                    " AND f.state = 'ok') FROM uploads u WHERE u.id = ? AND u.state = 'committed'",
                    (upload_id,),
                ).fetchone()
                if row is not None:
                    _upsert(c, upload_id, reason, row[1] - len(parts) - row[0], now, parts)
                    queued += 1
        return queued

    def queue_lost_buckets(self: _DB, bucket_ids: Iterable[str], now: float, limit: int = 1000) -> int:
        """Queue every committed file with a fragment on these buckets (declared lost).

        Each bucket's fragments are walked in upload order, ``limit`` uploads per
        transaction (an index range each). A file with fragments on several of the
        buckets is queued once, on the first of them, with all its lost parts.
        """
        ids = sorted(set(bucket_ids))
        queued = 0
        for i, bucket_id in enumerate(ids):
            earlier = ids[:i]
            after = ""
            while True:
                with self._db.transaction() as c:
                    where = "bucket_id = ? AND upload_id > ?"
                    end = page_end(c, "fragments", where, "upload_id", (bucket_id, after), limit)
                    sql = _LOST.format(
                        parts=self._db.group_concat("g.part"),
                        lost=",".join("?" * len(ids)),
                        upto="" if end is None else " AND f.upload_id <= ?",
                        earlier=_EARLIER.format(",".join("?" * len(earlier))) if earlier else "",
                    )
                    upto = () if end is None else (end,)
                    rows = c.execute(sql, (*ids, bucket_id, after, *upto, *earlier)).fetchall()
                    for upload_id, data, parts, good in rows:
                        lost = _parts(str(parts))
                        _upsert(c, upload_id, "bucket_lost", good - len(lost) - data, now, lost)
                queued += len(rows)
                if end is None:
                    break
                after = end
        return queued

    def queue_upgrades(self: _DB, parity: int, now: float, limit: int = PAGE) -> int:
        """Queue committed files stored with less protection than ``parity`` or in a format
        before today's; returns how many were queued.

        The registry remembers the protection the last complete queueing was done for
        (``upgrades``): with no more parity than then and the same format, nothing can
        have become under-protected and the walk is skipped (a normal start costs one
        row). A start with less parity lowers the record, so that a later start with
        more walks again and finds the files written meanwhile. The walk goes through the
        committed uploads in id order, ``limit`` per transaction (an index range each).
        """
        with self._db.transaction() as c:
            row = c.execute("SELECT parity, format FROM upgrades WHERE id = 1").fetchone()
            if row is not None and int(row[0]) >= parity and int(row[1]) >= FORMAT:
                if int(row[0]) > parity:
                    c.execute("UPDATE upgrades SET parity = ? WHERE id = 1", (parity,))
                return 0
        queued = 0
        after = ""
        while True:
            with self._db.transaction() as c:
                end = page_end(c, "uploads", "state = 'committed' AND id > ?", "id", (after,), limit)
                upto = "" if end is None else " AND id <= ?"
                queued += c.execute(
                    "INSERT INTO repairs (upload_id, spare, reason, since, next_try)"
                    " SELECT id, parity, 'upgrade', ?, ? FROM uploads"
                    f" WHERE state = 'committed' AND id > ?{upto} AND (format < ? OR parity < ?)"
                    " ON CONFLICT DO NOTHING",
                    (now, now, after, *(() if end is None else (end,)), FORMAT, parity),
                ).rowcount
                if end is None:
                    c.execute(
                        "INSERT INTO upgrades (id, parity, format) VALUES (1, ?, ?) ON CONFLICT (id)"
                        " DO UPDATE SET parity = excluded.parity, format = excluded.format",
                        (parity, FORMAT),
                    )
                    return queued
            after = end

    def repairs(self: _DB) -> list[RepairRow]:
        """The whole queue, most at risk first."""
        rows = self._query(
            "SELECT upload_id, spare, reason, since, attempts, bad FROM repairs"
            " ORDER BY spare, next_try, upload_id"
        )
        return [RepairRow(str(u), int(s), str(r), float(t), int(a), _parts(b)) for u, s, r, t, a, b in rows]

    def repair_counts(self: _DB) -> tuple[int, int]:
        """(files in the queue, of them with no fragment to spare): the queue alone, cheap
        enough for every repair round."""
        ((queued, at_risk),) = self._query(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN spare <= 0 THEN 1 ELSE 0 END), 0) FROM repairs"
        )
        return int(queued), int(at_risk)

    def repair_summary(self: _DB) -> dict[str, Any]:
        """The queue in numbers: files, files by fragments to spare, by reason."""
        by_spare = self._query("SELECT spare, COUNT(*) FROM repairs GROUP BY spare ORDER BY spare")
        by_reason = self._query("SELECT reason, COUNT(*) FROM repairs GROUP BY reason ORDER BY reason")
        # The queue drives the read (a join may be planned as a scan of uploads).
        ((queued_bytes,),) = self._query(
            "SELECT COALESCE(SUM((SELECT u.size FROM uploads u WHERE u.id = r.upload_id)), 0) FROM repairs r"
        )
        files, total = self.stored()
        return {
            "files": sum(int(n) for _, n in by_spare),
            "bytes": int(queued_bytes),
            "by_spare": {str(s): int(n) for s, n in by_spare},
            "by_reason": {str(r): int(n) for r, n in by_reason},
            "stored_files": int(files),
            "stored_bytes": int(total),
        }

    def due_repairs(self: _DB, now: float, limit: int, skip: Iterable[str] = ()) -> list[RepairRow]:
        """Up to ``limit`` files due for repair now, most at risk first, except ``skip``.

        One index range per count of spare fragments (a handful of values, found by a seek
        each), so repairs that are not due yet are never read past.
        """
        skipped = set(skip)
        want = limit + len(skipped)
        out: list[RepairRow] = []
        with self._db.read() as c:
            spare = c.execute("SELECT MIN(spare) FROM repairs").fetchone()[0]
            while spare is not None and len(out) < want:
                rows = c.execute(
                    "SELECT upload_id, spare, reason, since, attempts, bad FROM repairs"
                    " WHERE spare = ? AND next_try <= ? ORDER BY next_try, upload_id LIMIT ?",
                    (spare, now, want - len(out)),
                ).fetchall()
                out += [
                    RepairRow(str(u), int(s), str(r), float(t), int(a), _parts(b))
                    for u, s, r, t, a, b in rows
                ]
                spare = c.execute("SELECT MIN(spare) FROM repairs WHERE spare > ?", (spare,)).fetchone()[0]
        return [r for r in out if r.upload_id not in skipped][:limit]

    def repair_later(self: _DB, upload_id: str, spare: int, bad: Iterable[int], next_try: float) -> None:
        """A repair did not finish the file: try again at ``next_try``."""
        with self._db.transaction() as c:
            c.execute(
                "UPDATE repairs SET attempts = attempts + 1, spare = ?, bad = ?, next_try = ?"
                " WHERE upload_id = ?",
                (spare, _text(bad), next_try, upload_id),
            )

    def repair_done(self: _DB, upload_id: str) -> None:
        """The file has every fragment of its scheme (or is gone): off the queue."""
        with self._db.transaction() as c:
            c.execute("DELETE FROM repairs WHERE upload_id = ?", (upload_id,))

    def retry_repairs_now(self: _DB, now: float) -> None:
        """Buckets joined: every waiting repair may find a target now."""
        with self._db.transaction() as c:
            c.execute("UPDATE repairs SET next_try = ? WHERE next_try > ?", (now, now))

    def repairing(self: _DB, upload_id: str) -> set[int]:
        """Parts of ``upload_id`` a repair is writing now."""
        rows = self._query("SELECT part FROM moves WHERE upload_id = ? AND src = ''", (upload_id,))
        return {int(p) for (p,) in rows}

    def stale_buckets(self: _DB, upload_id: str) -> set[str]:
        """Buckets holding a stale copy (or a copy under way) of a fragment of ``upload_id``."""
        rows = self._query(
            "SELECT bucket_id FROM stale WHERE upload_id = ? UNION SELECT dst FROM moves WHERE upload_id = ?",
            (upload_id, upload_id),
        )
        return {str(b) for (b,) in rows}

    def start_repair_copies(
        self: _DB,
        upload_id: str,
        targets: Mapping[int, str],
        sizes: Mapping[int, int],
        now: float,
        fence: Fence | None = None,
    ) -> set[int]:
        """Record new copies of ``upload_id``'s parts about to be written (part -> bucket).

        Returns the parts recorded: a part being moved by the rebalancer is left out.

        Raises:
            LeaseLost: this server no longer holds ``fence``.
        """
        accepted = set()
        with self._db.transaction() as c:
            check_fence(self._db, c, self.server_id, fence)
            for part, dst in targets.items():
                cur = c.execute(
                    "INSERT INTO moves (upload_id, part, src, dst, size, sha256, started, server)"
                    " VALUES (?, ?, '', ?, ?, '', ?, ?) ON CONFLICT DO NOTHING",
                    (upload_id, part, dst, sizes[part], now, self.server_id),
                )
                if cur.rowcount:
                    accepted.add(part)
        return accepted

    def finish_repair_copies(
        self: _DB,
        upload_id: str,
        targets: Mapping[int, str],
        stored: Mapping[int, str],
        replaced: Mapping[int, str | None],
        sizes: Mapping[int, int],
        now: float,
        fence: Fence | None = None,
    ) -> set[int]:
        """Make the copies in ``stored`` (part -> sha256) their parts' homes, atomically.

        A part switches only if the file is still the same committed version and the
        part's row still names the bucket it named when the repair began (``replaced``:
        part -> bucket, None for a part with no row); its old copy becomes stale. Every
        other copy of ``targets`` (not stored, or not switched) becomes stale.

        Returns:
            The parts switched.

        Raises:
            LeaseLost: this server no longer holds ``fence``: nothing switched, every copy
                of ``targets`` is stale.
        """
        switched = set()
        with self._db.transaction() as c:
            fenced = fence_holds(self._db, c, self.server_id, fence)
            committed = fenced and ledger.lock_upload(self._db, c, upload_id) == "committed"
            for part, dst in targets.items():
                c.execute(
                    "DELETE FROM moves WHERE upload_id = ? AND part = ? AND dst = ?", (upload_id, part, dst)
                )
                row = c.execute(
                    "SELECT bucket_id FROM fragments WHERE upload_id = ? AND part = ?", (upload_id, part)
                ).fetchone()
                current = None if row is None else str(row[0])
                if committed and part in stored and current == replaced.get(part):
                    if row is None:
                        c.execute(
                            "INSERT INTO fragments (upload_id, part, bucket_id, size, sha256, state)"
                            " VALUES (?, ?, ?, ?, ?, 'ok')",
                            (upload_id, part, dst, sizes[part], stored[part]),
                        )
                        ledger.add(c, dst, sizes[part])
                    else:
                        c.execute(
                            "UPDATE fragments SET bucket_id = ?, sha256 = ?, state = 'ok'"
                            " WHERE upload_id = ? AND part = ?",
                            (dst, stored[part], upload_id, part),
                        )
                        if current != dst:  # an owed part written where it was planned has no old copy
                            ledger.move(c, sizes[part], str(current), dst)
                            _stale(c, str(current), upload_id, part, sizes[part], now)
                    switched.add(part)
                else:
                    _stale(c, dst, upload_id, part, sizes[part], now)
        if not fenced:
            raise LeaseLost(f"lease on {fence.job if fence else ''} lost; repair of {upload_id} dropped")
        return switched


def _stale(c: Tx, bucket_id: str, upload_id: str, part: int, size: int, now: float) -> None:
    c.execute(
        "INSERT INTO stale (bucket_id, upload_id, part, size, since) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (bucket_id, upload_id, part, size, now),
    )
