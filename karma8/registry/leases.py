"""What API servers sharing one registry coordinate through it: job leases and read leases.

**Job leases** (``leases``): the background jobs (janitor, rebalancer, reconciliation,
repair) run on one server at a time. A server takes a job's lease for ``ttl`` seconds of
the database's clock and renews it well before it runs out; when the holder dies, the
lease expires and another server takes it over, with the job's *epoch* one higher. Every
registry write a job makes on the strength of its lease names the epoch it holds
(a *fence*, :class:`Fence`); the write checks in its own transaction that the lease is
still held with that epoch, so a holder that was paused past its lease (and replaced)
cannot change anything when it wakes up: :class:`LeaseLost`.

**Read leases** (``reads``): each server publishes the uploads its downloads are reading
(:meth:`Coordination.publish_reads`, every heartbeat interval); the janitor of any server
leaves their fragments alone, and deletes nothing that became garbage less than a grace
period ago (longer than the publication interval), so a download that began just before
another server replaced its file is seen in time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from karma8.registry.database import Database, Tx

#: The jobs that take leases.
JOBS = ("janitor", "rebalancer", "reconciler", "repair")


class LeaseLost(Exception):
    """This server no longer holds the lease its write was fenced with."""


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a write is made under: ``job``, held with ``epoch``."""

    job: str
    epoch: int


class _DB(Protocol):
    _db: Database
    server_id: str


def fence_holds(db: Database, tx: Tx, server_id: str, fence: Fence | None) -> bool:
    """Whether ``server_id`` holds ``fence`` now (no fence: True); the lease row stays
    locked until the transaction ends, so it cannot change hands meanwhile."""
    if fence is None:
        return True
    row = tx.execute(
        f"SELECT 1 FROM leases WHERE job = ? AND holder = ? AND epoch = ? AND expires > {db.now}"
        + db.for_update,
        (fence.job, server_id, fence.epoch),
    ).fetchone()
    return row is not None


def check_fence(db: Database, tx: Tx, server_id: str, fence: Fence | None) -> None:
    """Raise :class:`LeaseLost` unless ``server_id`` holds ``fence`` now."""
    if not fence_holds(db, tx, server_id, fence):
        assert fence is not None
        raise LeaseLost(f"lease on {fence.job} (epoch {fence.epoch}) lost")


class Coordination:
    """Lease queries (mixed into :class:`karma8.registry.db.RegistryDB`)."""

    def hold_lease(self: _DB, job: str, ttl: float) -> int | None:
        """Take or renew the lease on ``job`` for ``ttl`` seconds.

        Returns:
            The epoch held, or None while another server holds an unexpired lease.
        """
        now = self._db.now
        with self._db.transaction() as tx:
            row = tx.execute(
                f"SELECT holder, epoch, expires > {now} FROM leases WHERE job = ?{self._db.for_update}",
                (job,),
            ).fetchone()
            if row is None:
                epoch = 1
                inserted = tx.execute(
                    f"INSERT INTO leases (job, holder, epoch, expires) VALUES (?, ?, 1, {now} + ?)"
                    " ON CONFLICT DO NOTHING",
                    (job, self.server_id, ttl),
                ).rowcount
                return epoch if inserted else None  # another server took it first
            holder, epoch, valid = str(row[0]), int(row[1]), bool(row[2])
            if holder != self.server_id and valid:
                return None
            if holder != self.server_id or not valid:
                epoch += 1  # taken over, or ours but lapsed: whatever we did under it is fenced off
            tx.execute(
                f"UPDATE leases SET holder = ?, epoch = ?, expires = {now} + ? WHERE job = ?",
                (self.server_id, epoch, ttl, job),
            )
            return epoch

    def release_lease(self: _DB, job: str) -> None:
        """Give the lease on ``job`` up (the server is stopping): another takes it at once."""
        with self._db.transaction() as tx:
            tx.execute(
                f"UPDATE leases SET expires = {self._db.now} - 1 WHERE job = ? AND holder = ?",
                (job, self.server_id),
            )

    def lease_holders(self: _DB) -> dict[str, tuple[str, int, float]]:
        """job -> (holder, epoch, seconds left; negative: expired)."""
        with self._db.read() as tx:
            rows = tx.execute(f"SELECT job, holder, epoch, expires - {self._db.now} FROM leases").fetchall()
        return {str(j): (str(h), int(e), float(left)) for j, h, e, left in rows}

    def publish_reads(self: _DB, upload_ids: Iterable[str]) -> None:
        """The uploads this server's downloads read now (replacing what it published before)."""
        held = sorted(set(upload_ids))
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM reads WHERE server = ?", (self.server_id,))
            tx.executemany(
                "INSERT INTO reads (server, upload_id) VALUES (?, ?)", [(self.server_id, u) for u in held]
            )
