"""The ledger of placed bytes: explicit statements inside the registry's transactions.

``placed`` holds, per bucket, the bytes and fragments of live (in-progress or committed)
uploads. Every transaction that adds or moves a live fragment, or moves an upload in or
out of the live states, changes it in the same transaction, on both databases (no
triggers: PostgreSQL and SQLite would need two dialects of them). A transaction changing
an upload's fragments or state first locks the upload's row (:func:`lock_upload`), so
two servers cannot both count the same change.
"""

from __future__ import annotations

from karma8.registry.database import Database, Tx

_UPLOADS = """
INSERT INTO placed (bucket_id, bytes, fragments)
SELECT f.bucket_id, ? * SUM(f.size), ? * COUNT(*) FROM fragments f JOIN uploads u ON u.id = f.upload_id
WHERE u.state IN ('in_progress', 'committed') AND {where} GROUP BY f.bucket_id ORDER BY f.bucket_id
ON CONFLICT (bucket_id) DO UPDATE SET
    bytes = placed.bytes + excluded.bytes, fragments = placed.fragments + excluded.fragments
"""
_ONE = """
INSERT INTO placed (bucket_id, bytes, fragments) VALUES (?, ?, ?)
ON CONFLICT (bucket_id) DO UPDATE SET
    bytes = placed.bytes + excluded.bytes, fragments = placed.fragments + excluded.fragments
"""


def lock_upload(db: Database, tx: Tx, upload_id: str) -> str | None:
    """Lock ``upload_id``'s row until the transaction ends; its state (None: no such upload)."""
    row = tx.execute(f"SELECT state FROM uploads WHERE id = ?{db.for_update}", (upload_id,)).fetchone()
    return None if row is None else str(row[0])


def add_uploads(tx: Tx, sign: int, where: str, args: tuple[object, ...]) -> None:
    """Add (``sign`` 1) or take off (-1) the fragments of the live uploads ``where``
    chooses (a condition on ``u``)."""
    tx.execute(_UPLOADS.format(where=where), (sign, sign, *args))


def add(tx: Tx, bucket_id: str, size: int, fragments: int = 1) -> None:
    """Add one fragment of a live upload on ``bucket_id`` (negative: take it off)."""
    tx.execute(_ONE, (bucket_id, size, fragments))


def move(tx: Tx, size: int, src: str, dst: str) -> None:
    """A fragment of a live upload moved from ``src`` to ``dst`` (in bucket order, so two
    moves never take the ledger's rows in opposite orders and deadlock)."""
    for bucket_id, sign in sorted(((src, -1), (dst, 1))):
        add(tx, bucket_id, sign * size, sign)
