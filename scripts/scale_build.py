"""Building the registry of scripts/scale.py: N committed files, bulk-loaded into a
registry made by karma8's own registry code, and the fragment files of one bucket.

:class:`~karma8.registry.db.RegistryDB` creates the schema; the rows then go in on a
connection of the build's own, in batches of ``BATCH`` files that a worker process makes
while the previous batch goes in: SQLite without journal or fsync, a 6 GB page cache and
the loaded tables' secondary indexes dropped (made again at the end from their DDL in
``sqlite_master``; the file ends in WAL mode, as karma8 opens it); PostgreSQL with
``COPY``, the secondary indexes likewise dropped and made again (``pg_get_indexdef``).
For each file: its upload (committed, 6+2, today's fragment format), its 8 fragment rows
(part ``p`` of file ``i`` on bucket ``(i + p) % 8``: every bucket holds one fragment of
every file, data and parity parts spread evenly), its ``files`` row; at the end, through
``RegistryDB``, the ``placed`` ledger and the ``stored`` counter, both exact (checked
with ``ledger_drift()`` and ``stored_drift()``).

Names: leaf directories of ``PER_DIR`` names, spread over ``TOPS`` top-level
directories: ``d007/s000/report-00001234.pdf``. A leaf prefix holds 1,000 names; the top
level has at most ``TOPS`` common prefixes, and a second level grows with N (10 per top
directory at 1M files, 100 at 10M). Sizes are log-normal (median 16 KiB, a few up to
256 MiB), striped as karma8 stripes them (:class:`~karma8.core.layout.Layout`).

Rows go in by upload id (random-looking ids drawn in increasing order), names in a
scrambled order: the id indexes are filled in order, the name index at random. A
registry grown by real uploads has every id index filled at random, so its B-tree pages
are less full: expect it somewhat larger than the one built here.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from karma8.core.checksums import FORMAT
from karma8.core.coding import Scheme
from karma8.core.layout import Layout
from karma8.registry import ledger
from karma8.registry.db import RegistryDB

PARTS, PARITY = 6, 2
WIDTH = PARTS + PARITY
STRIPE_UNIT = 512 * 1024
PER_DIR = 1000
TOPS = 100
BATCH = 20_000
#: Threads making bucket 0's fragment files.
THREADS = 8
MAX_SIZE = 256 * 1024 * 1024
_WORDS = ("report", "photo", "invoice", "log", "backup", "scan", "track", "notes")
_EXTS = ("pdf", "jpg", "csv", "json", "tar.gz", "png", "mp3", "txt")
_YEAR = 365 * 86400.0


@dataclass(frozen=True, slots=True)
class Shape:
    """Where the names of ``files`` files go."""

    files: int

    @property
    def leaves(self) -> int:
        return max(1, -(-self.files // PER_DIR))

    def leaf(self, index: int) -> str:
        """The directory (a prefix ending in ``/``) of leaf ``index``."""
        return f"d{index % TOPS:03d}/s{index // TOPS:03d}/"

    def name(self, i: int) -> str:
        """The name of file ``i`` (0 <= i < files)."""
        j = i % PER_DIR
        return f"{self.leaf(i // PER_DIR)}{_WORDS[j % 8]}-{i:08d}.{_EXTS[(j // 8) % 8]}"

    def listed_leaf(self) -> str:
        """The prefix the benchmark lists: a full leaf (leaf 7, or the last at tiny sizes)."""
        return self.leaf(min(7, self.leaves - 1))

    def scramble(self) -> Callable[[int], int]:
        """A permutation of ``range(files)``: row ``i`` (in id order) gets name ``perm(i)``."""
        n = self.files
        a = 2_654_435_761 % n or 1
        while math.gcd(a, n) != 1:
            a += 1
        return lambda i: (a * i + n // 3) % n


def bucket_ids(count: int, seed: int) -> list[str]:
    """``count`` bucket ids, 16 hex digits as a bucket draws them (seeded)."""
    rng = random.Random(f"buckets-{seed}")
    return [f"{rng.getrandbits(64):016x}" for _ in range(count)]


def write_bucket_dirs(root: Path, ids: list[str]) -> None:
    """``root/bucket-<i>/bucket-id`` for each id: each bucket starts with that identity."""
    for i, bucket_id in enumerate(ids):
        data = root / f"bucket-{i}"
        data.mkdir(parents=True, exist_ok=True)
        (data / "bucket-id").write_text(bucket_id + "\n")


@dataclass
class Built:
    """What the build made, and how long it took."""

    files: int = 0
    bytes: int = 0
    fragments: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0
    fragment_files: int = 0
    fragment_files_seconds: float = 0.0


#: A batch's uploads, fragments and files rows.
Rows = tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]


def part_sizes(size: int) -> tuple[int, ...]:
    """The sizes of the 6+2 parts of a new file of ``size`` bytes: what
    ``Layout.for_size(size, PARTS, STRIPE_UNIT, PARITY).part_sizes()`` answers (checked
    against it once a batch), without building a ``Layout`` for each of millions of files."""
    unit = max(1, min(STRIPE_UNIT, size // PARTS))
    n = -(-size // unit)
    last = (n - 1) % PARTS
    short = n * unit - size
    sizes = [0 if p >= n else -(-(n - p) // PARTS) * unit - (short if p == last else 0) for p in range(PARTS)]
    return (*sizes, *(sizes[0],) * PARITY)


def _rows(shape: Shape, buckets: list[str], seed: int, start: int, stop: int) -> Rows:
    """The uploads, fragments and files rows of files ``start`` to ``stop`` (id order)."""
    rng = random.Random(f"rows-{seed}-{start}")
    perm = shape.scramble()
    codec = Scheme.of(PARTS, PARITY).codec
    now = time.time()
    uploads: list[tuple[object, ...]] = []
    fragments: list[tuple[object, ...]] = []
    files: list[tuple[object, ...]] = []
    slot = (1 << 128) // shape.files
    lognorm, randrange, random01, randbytes = rng.lognormvariate, rng.randrange, rng.random, rng.randbytes
    mu = math.log(16 * 1024)
    owners = [[buckets[(i + p) % WIDTH] for p in range(WIDTH)] for i in range(WIDTH)]
    for i in range(start, stop):
        uid = f"{i * slot + randrange(slot):032x}"
        name = shape.name(perm(i))
        size = min(MAX_SIZE, int(lognorm(mu, 1.6)))
        sizes = part_sizes(size)
        digests = randbytes(32 * (WIDTH + 1)).hex()
        created = now - _YEAR + _YEAR * random01()
        sha = digests[:64]
        unit = max(1, min(STRIPE_UNIT, size // PARTS))
        uploads.append((uid, name, size, PARTS, unit, sha, created, created + 0.5, PARITY, codec, FORMAT))
        owner = owners[i % WIDTH]
        fragments.extend(
            (uid, part, owner[part], sizes[part], digests[64 * (part + 1) : 64 * (part + 2)])
            for part in range(WIDTH)
        )
        files.append((name, uid, size, sha, created))
    check = Layout.for_size(int(str(uploads[0][2])), PARTS, STRIPE_UNIT, PARITY)
    if tuple(check.part_sizes()) != tuple(f[3] for f in fragments[:WIDTH]) or check.unit != uploads[0][4]:
        raise AssertionError(f"part_sizes() differs from karma8's Layout for {check.size} bytes")
    return uploads, fragments, files


def _batch(
    shape: Shape, buckets: list[str], seed: int, start: int, stop: int, holder: Path | None
) -> tuple[Rows, int, float]:
    """One batch's rows, made in a worker process; with ``holder``, that bucket's fragment
    files of the batch written too: (rows, fragment files, seconds writing them)."""
    rows = _rows(shape, buckets, seed, start, stop)
    if holder is None:
        return rows, 0, 0.0
    wrote = time.perf_counter()
    count = write_fragment_files(holder / "fragments", rows[1], buckets[0])
    return rows, count, time.perf_counter() - wrote


#: The tables the build fills: their secondary indexes are dropped while it loads.
LOADED = ("uploads", "fragments", "files")
INSERTS = (
    "INSERT INTO uploads (id, name, size, parts, unit, sha256, state, created, finished, parity, codec,"
    " format) VALUES (?, ?, ?, ?, ?, ?, 'committed', ?, ?, ?, ?, ?)",
    "INSERT INTO fragments (upload_id, part, bucket_id, size, sha256) VALUES (?, ?, ?, ?, ?)",
    "INSERT INTO files (name, upload_id, size, sha256, created) VALUES (?, ?, ?, ?, ?)",
)
COPIES = (
    "COPY uploads (id, name, size, parts, unit, sha256, created, finished, parity, codec, format, state)"
    " FROM STDIN",
    "COPY fragments (upload_id, part, bucket_id, size, sha256) FROM STDIN",
    "COPY files (name, upload_id, size, sha256, created) FROM STDIN",
)


class _SQLiteLoad:
    """The bulk load into a SQLite registry, on a connection of its own: no journal, no
    fsync, a big page cache, no foreign-key checks (the rows are consistent by
    construction), the loaded tables' secondary indexes dropped and made again at the end
    from their own DDL (``sqlite_master``). A crash mid-build leaves a broken file: the
    build starts over. The file is back in WAL mode at the end, as karma8 opens it."""

    def __init__(self, path: str) -> None:
        import sqlite3

        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("PRAGMA cache_size=-6000000")  # 6 GB: names go in at random; index sorts
        self.conn.execute("PRAGMA threads=2")  # the sorter of CREATE INDEX
        marks = ", ".join("?" * len(LOADED))
        self.indexes: list[tuple[str, str]] = self.conn.execute(
            f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            f" AND tbl_name IN ({marks}) ORDER BY name",
            LOADED,
        ).fetchall()
        for name, _ in self.indexes:
            self.conn.execute(f'DROP INDEX "{name}"')

    def insert(self, rows: Rows) -> None:
        self.conn.execute("BEGIN")
        for sql, batch in zip(INSERTS, rows, strict=True):
            self.conn.executemany(sql, batch)
        self.conn.execute("COMMIT")

    def finish(self, progress: Callable[[str], None]) -> None:
        for name, sql in self.indexes:
            started = time.perf_counter()
            self.conn.execute(sql)
            progress(f"  index {name} made in {time.perf_counter() - started:.1f} s")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.close()


class _PostgresLoad:
    """The bulk load into a PostgreSQL registry: ``COPY`` on a connection of its own, the
    loaded tables' secondary indexes (not those of a key) dropped and made again at the
    end from their own DDL (``pg_get_indexdef``), foreign keys not checked for the load
    where the role may (``session_replication_role``; the rows are consistent by
    construction)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SET session_replication_role = replica")
        self.conn.execute("SET maintenance_work_mem = '1GB'")
        self.indexes: list[tuple[str, str]] = self.conn.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class t ON t.oid = i.indrelid WHERE t.relname = ANY(%s)"
            " AND t.relnamespace = 'public'::regnamespace"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
            " ORDER BY 1",
            (list(LOADED),),
        ).fetchall()
        for name, _ in self.indexes:
            self.conn.execute(f"DROP INDEX {name}")

    def insert(self, rows: Rows) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            for sql, batch in zip(COPIES, rows, strict=True):
                with cur.copy(sql) as copy:
                    if sql.startswith("COPY uploads"):
                        for row in batch:
                            copy.write_row((*row, "committed"))
                    else:
                        for row in batch:
                            copy.write_row(row)

    def finish(self, progress: Callable[[str], None]) -> None:
        for name, sql in self.indexes:
            started = time.perf_counter()
            self.conn.execute(sql)
            progress(f"  index {name} made in {time.perf_counter() - started:.1f} s")
        self.conn.execute("SET session_replication_role = DEFAULT")
        self.conn.close()


def build_registry(
    url: str,
    shape: Shape,
    buckets: list[str],
    seed: int,
    holder: Path | None,
    progress: Callable[[str], None],
) -> Built:
    """Fill the (new, empty) registry at ``url`` with ``shape.files`` committed files;
    with ``holder`` (the data directory of ``buckets[0]``), also write that bucket's
    fragment files (timed apart, in the worker process that makes the rows).

    The schema is karma8's (``RegistryDB`` creates it); the rows go in on a connection of
    the build's own (:class:`_SQLiteLoad`, :class:`_PostgresLoad`) while a worker process
    makes the next batch; the ledger and the counter are then written, and checked, through
    ``RegistryDB``.
    """
    import concurrent.futures
    import multiprocessing

    built = Built()
    if holder is not None:
        make_fragment_dir(holder / "fragments")
    started = time.perf_counter()
    db = RegistryDB(url)
    sqlite = db.database.name == "sqlite"
    db.close()
    load: _SQLiteLoad | _PostgresLoad = _SQLiteLoad(url) if sqlite else _PostgresLoad(url)
    placed: dict[str, list[int]] = {b: [0, 0] for b in buckets}
    last_note = started
    waited = inserting = 0.0  # for the rows, inserting them
    starts = list(range(0, shape.files, BATCH))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        pending = [
            pool.submit(_batch, shape, buckets, seed, s, min(shape.files, s + BATCH), holder)
            for s in starts[:2]
        ]
        for n in range(len(starts)):
            wait = time.perf_counter()
            rows, count, seconds = pending.pop(0).result()
            waited += time.perf_counter() - wait
            if n + 2 < len(starts):
                s = starts[n + 2]
                pending.append(
                    pool.submit(_batch, shape, buckets, seed, s, min(shape.files, s + BATCH), holder)
                )
            insert = time.perf_counter()
            load.insert(rows)
            inserting += time.perf_counter() - insert
            _, fragments, files = rows
            built.fragment_files += count
            built.fragment_files_seconds += seconds
            for _, _, bucket, size, _ in fragments:
                row = placed[str(bucket)]
                row[0] += int(str(size))
                row[1] += 1
            built.files += len(files)
            built.bytes += sum(int(str(f[2])) for f in files)
            built.fragments += len(fragments)
            if time.perf_counter() - last_note > 30:
                last_note = time.perf_counter()
                rate = built.files / (last_note - started)
                progress(f"  {built.files:,} of {shape.files:,} files ({rate:,.0f} files/s)")
    loaded = time.perf_counter()
    load.finish(progress)
    progress(
        f"  loaded in {loaded - started:.0f} s ({inserting:.0f} s inserting, {waited:.0f} s waiting),"
        f" indexes made in {time.perf_counter() - loaded:.0f} s"
    )
    db = RegistryDB(url)
    try:
        with db.database.transaction() as tx:
            for bucket, (size, count) in placed.items():
                ledger.add(tx, bucket, size, count)
            tx.execute(
                "INSERT INTO stored (id, files, bytes) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " files = stored.files + excluded.files, bytes = stored.bytes + excluded.bytes",
                (built.files, built.bytes),
            )
        with db.database.read() as tx:
            if sqlite:
                tx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                tx.execute("PRAGMA analysis_limit=1000")
            tx.execute("ANALYZE")
        # The fragment files are written beside the rows, in the worker: not build time.
        built.seconds = time.perf_counter() - started
        checked = time.perf_counter()
        drift, stored = db.ledger_drift(), db.stored_drift()
        if drift or stored != (0, 0):
            raise RuntimeError(
                f"the built registry is not exact: ledger drift {drift}, stored drift {stored}"
            )
        built.check_seconds = time.perf_counter() - checked
    finally:
        db.close()
    return built


def make_fragment_dir(fragments: Path) -> None:
    """A bucket's fragment directories (``fragments/<first 2 hex digits>/``)."""
    for shard in range(256):
        (fragments / f"{shard:02x}").mkdir(parents=True, exist_ok=True)


def write_fragment_files(fragments: Path, rows: list[tuple[object, ...]], bucket_id: str) -> int:
    """An empty file for each of ``rows`` (fragment rows) on ``bucket_id``, in the bucket's
    layout (``fragments/<first 2 hex digits>/<upload id>.<part>``); returns how many.

    Empty: a listing shows them (size 0, no checksum, as a damaged footer reads), which is
    all reconciliation looks at; reading one would fail its checksum. Made by ``THREADS``
    threads, each in its own directories: a file's creation mostly waits for the file
    system's journal (busy with the registry's writes beside it), not for a CPU.
    """
    import concurrent.futures

    mode = 0o644 | stat.S_IFREG
    names: list[list[str]] = [[] for _ in range(THREADS)]
    for uid, part, bucket, *_ in rows:
        if bucket == bucket_id:
            fid = f"{uid}.{part}"
            names[int(fid[:2], 16) % THREADS].append(fid)

    def make(fids: list[str]) -> None:
        shards: dict[str, int] = {}
        try:
            for fid in fids:
                shard = fid[:2]
                if shard not in shards:
                    shards[shard] = os.open(fragments / shard, os.O_RDONLY | os.O_DIRECTORY)
                os.mknod(fid, mode, dir_fd=shards[shard])
        finally:
            for fd in shards.values():
                os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for done in [pool.submit(make, fids) for fids in names]:
            done.result()
    return sum(len(fids) for fids in names)
