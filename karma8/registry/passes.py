"""What the background passes read, one bounded page at a time (issue 14).

Reconciliation, the janitor and repair walk sets that grow with the store: a bucket's
fragments, the uploads waiting for deletion, the stale copies, the fragments on a lost
bucket. Each walk here is a keyset walk: a page is ``WHERE key > last ORDER BY key
LIMIT n`` on an index (schema version 4 added the ones missing), so a page costs the
same at ten files and at ten million, and a pass holds one page at a time.

Pages are cut at the end of an upload: every row of an upload is in one page (a bucket
holds at most one copy of each of an upload's 64 parts, so a page has at most ``n`` +
a few hundred rows). That is what lets reconciliation compare a registry page with the
bucket's listing of exactly the same uploads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from karma8.core.fragments import fragment_id, parse_fragment_id
from karma8.registry.database import Database, Tx

#: Rows per page of the background passes (each pass may pass its own).
PAGE = 1000

# What the registry places on a bucket (``?``: the bucket), by source, in upload order.
# Precedence as listed: a fragment's own row, then a copy being written there (a move or
# a repair), then a stale copy waiting for deletion.
_SOURCES = (
    (
        "fragments f JOIN uploads u ON u.id = f.upload_id",
        "f.bucket_id",
        "f.upload_id",
        "f.part, CASE WHEN f.state = 'owed' AND u.state = 'committed' THEN 'owed' ELSE u.state END",
    ),
    ("moves", "dst", "upload_id", "part, 'moving'"),
    ("stale", "bucket_id", "upload_id", "part, 'stale'"),
)


class _DB(Protocol):
    _db: Database
    server_id: str

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]: ...


def page_end(tx: Tx, table: str, where: str, key: str, args: tuple[object, ...], limit: int) -> str | None:
    """The key of the ``limit``-th row ``where`` chooses, in key order (None: fewer rows)."""
    row = tx.execute(
        f"SELECT {key} FROM {table} WHERE {where} ORDER BY {key} LIMIT 1 OFFSET ?", (*args, limit - 1)
    ).fetchone()
    return None if row is None else str(row[0])


class Passes:
    """The background passes' paged reads (mixed into :class:`karma8.registry.db.RegistryDB`)."""

    def expected_page(
        self: _DB, bucket_id: str, after: str, limit: int = PAGE, upto: str | None = None
    ) -> tuple[dict[str, str], str | None]:
        """What the registry places on ``bucket_id`` for uploads after ``after``, a page.

        The page covers the uploads with ``after < id <= end`` and every row of each: at
        least ``limit`` rows when there are more, and never an upload past ``upto``.

        Returns:
            (fragment id -> its upload's state, or ``owed``, ``moving``, ``stale`` as in
            the full view, :meth:`karma8.registry.db.RegistryDB.expected_on`; ``end``:
            the last upload id covered, None when the page reaches past the last one and
            ``upto`` is None).
        """
        end = upto
        with self._db.read() as tx:
            for table, bucket, key, _ in _SOURCES:
                where = f"{bucket} = ? AND {key} > ?" + ("" if end is None else f" AND {key} <= ?")
                args = (bucket_id, after) if end is None else (bucket_id, after, end)
                found = page_end(tx, table, where, key, args, limit)
                if found is not None:
                    end = found
            expected: dict[str, str] = {}
            for table, bucket, key, columns in _SOURCES:
                where = f"{bucket} = ? AND {key} > ?" + ("" if end is None else f" AND {key} <= ?")
                args = (bucket_id, after) if end is None else (bucket_id, after, end)
                for upload_id, part, state in tx.execute(
                    f"SELECT {key}, {columns} FROM {table} WHERE {where}", args
                ):
                    expected.setdefault(fragment_id(str(upload_id), int(part)), str(state))
        return expected, end

    def deletions_page(
        self: _DB, state: str, after: str, limit: int = PAGE
    ) -> tuple[list[tuple[str, str]], str | None]:
        """(upload id, bucket id) pairs whose fragments must be deleted, among up to
        ``limit`` uploads in ``state`` (``failed``, ``deleting``) after ``after``, by id;
        not those of uploads another server's downloads still read. Only uploads with
        fragment rows left are walked (``to_delete``, a partial index): a sweep's work
        follows what is pending, not every upload that ever failed.

        Returns:
            (pairs, the last upload id looked at; None when no upload is left after it).
        """
        with self._db.read() as tx:
            ids = [
                str(u)
                for (u,) in tx.execute(
                    "SELECT id FROM uploads WHERE to_delete = 1 AND state = ? AND id > ? ORDER BY id LIMIT ?",
                    (state, after, limit),
                )
            ]
            if not ids:
                return [], None
            marks = ",".join("?" * len(ids))
            rows = tx.execute(
                f"SELECT DISTINCT f.upload_id, f.bucket_id FROM fragments f WHERE f.upload_id IN ({marks})"
                " AND NOT EXISTS (SELECT 1 FROM reads r WHERE r.upload_id = f.upload_id AND r.server <> ?)"
                " ORDER BY f.upload_id, f.bucket_id",
                (*ids, self.server_id),
            ).fetchall()
        return [(str(u), str(b)) for u, b in rows], (ids[-1] if len(ids) == limit else None)

    def stale_page(
        self: _DB, after: tuple[str, str, int] | None, limit: int = PAGE
    ) -> list[tuple[str, str, int]]:
        """Up to ``limit`` stale copies (bucket id, upload id, part) after ``after``, in that
        order; not those of uploads another server's downloads still read."""
        bucket, upload, part = after if after is not None else ("", "", -1)
        rows = self._query(
            "SELECT bucket_id, upload_id, part FROM stale s WHERE (bucket_id, upload_id, part) > (?, ?, ?)"
            " AND NOT EXISTS (SELECT 1 FROM reads r WHERE r.upload_id = s.upload_id AND r.server <> ?)"
            " ORDER BY bucket_id, upload_id, part LIMIT ?",
            (bucket, upload, part, self.server_id, limit),
        )
        return [(str(b), str(u), int(p)) for b, u, p in rows]

    def known_on(self: _DB, bucket_id: str, fragment_ids: Sequence[str]) -> set[str]:
        """Which of ``fragment_ids`` the registry knows on ``bucket_id`` now (its row, a copy
        under way there, a stale copy there): by primary keys, ``PAGE`` at a time."""
        known: set[str] = set()
        with self._db.read() as tx:
            for i in range(0, len(fragment_ids), PAGE):
                keys = [parse_fragment_id(f) for f in fragment_ids[i : i + PAGE]]
                uploads = sorted({u for u, _ in keys})
                marks = ",".join("?" * len(uploads))
                for table, bucket, key, _ in _SOURCES:
                    part = key.replace("upload_id", "part")
                    for upload_id, p in tx.execute(
                        f"SELECT {key}, {part} FROM {table} WHERE {key} IN ({marks}) AND {bucket} = ?",
                        (*uploads, bucket_id),
                    ):
                        known.add(fragment_id(str(upload_id), int(p)))
        return known & set(fragment_ids)
