"""Building the registry of scripts/scale.py: N committed files, bulk-inserted through
karma8's own registry code, and the fragment files of one bucket.

The registry is opened with :class:`~karma8.registry.db.RegistryDB` (which creates the
schema), then filled with ``executemany`` in transactions of ``BATCH`` files: for each
file its upload (committed, 6+2, today's fragment format), its 8 fragment rows (part
``p`` of file ``i`` on bucket ``(i + p) % 8``: every bucket holds one fragment of every
file, data and parity parts spread evenly), its ``files`` row, and at the end the
``placed`` ledger and the ``stored`` counter, both exact (checked with
``ledger_drift()`` and ``stored_drift()``).

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

import math
import os
import random
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


def upload_id(i: int, files: int, rng: random.Random) -> str:
    """The id of row ``i``: uniform over 128 bits, increasing with ``i``."""
    slot = (1 << 128) // files
    return f"{i * slot + rng.randrange(slot):032x}"


def _size(rng: random.Random) -> int:
    return min(MAX_SIZE, int(rng.lognormvariate(math.log(16 * 1024), 1.6)))


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


def _rows(
    shape: Shape, buckets: list[str], seed: int, start: int, stop: int
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The uploads, fragments and files rows of files ``start`` to ``stop`` (id order)."""
    rng = random.Random(f"rows-{seed}-{start}")
    perm = shape.scramble()
    scheme = Scheme.of(PARTS, PARITY)
    now = time.time()
    uploads: list[tuple[object, ...]] = []
    fragments: list[tuple[object, ...]] = []
    files: list[tuple[object, ...]] = []
    for i in range(start, stop):
        uid = upload_id(i, shape.files, rng)
        name = shape.name(perm(i))
        size = _size(rng)
        layout = Layout.for_size(size, PARTS, STRIPE_UNIT, PARITY)
        sha = f"{rng.getrandbits(256):064x}"
        created = now - _YEAR + _YEAR * rng.random()
        uploads.append(
            (uid, name, size, PARTS, layout.unit, sha, created, created + 0.5, PARITY, scheme.codec, FORMAT)
        )
        for part, part_size in enumerate(layout.part_sizes()):
            fragments.append(
                (uid, part, buckets[(i + part) % WIDTH], part_size, f"{rng.getrandbits(256):064x}")
            )
        files.append((name, uid, size, sha, created))
    return uploads, fragments, files


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
    fragment files (timed apart)."""
    built = Built()
    if holder is not None:
        make_fragment_dir(holder / "fragments")
    started = time.perf_counter()
    db = RegistryDB(url)
    try:
        sqlite = db.database.name == "sqlite"
        if sqlite:
            with db.database.read() as tx:
                tx.execute("PRAGMA cache_size = -1000000")  # 1 GB for the build (random name inserts)
        placed: dict[str, list[int]] = {b: [0, 0] for b in buckets}
        last_note = started
        for start in range(0, shape.files, BATCH):
            stop = min(shape.files, start + BATCH)
            uploads, fragments, files = _rows(shape, buckets, seed, start, stop)
            with db.database.transaction() as tx:
                tx.executemany(
                    "INSERT INTO uploads (id, name, size, parts, unit, sha256, state, created, finished,"
                    " parity, codec, format) VALUES (?, ?, ?, ?, ?, ?, 'committed', ?, ?, ?, ?, ?)",
                    uploads,
                )
                tx.executemany(
                    "INSERT INTO fragments (upload_id, part, bucket_id, size, sha256) VALUES (?, ?, ?, ?, ?)",
                    fragments,
                )
                tx.executemany(
                    "INSERT INTO files (name, upload_id, size, sha256, created) VALUES (?, ?, ?, ?, ?)", files
                )
            if holder is not None:
                wrote = time.perf_counter()
                built.fragment_files += write_fragment_files(holder / "fragments", fragments, buckets[0])
                built.fragment_files_seconds += time.perf_counter() - wrote
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
        with db.database.transaction() as tx:
            for bucket, (size, count) in placed.items():
                ledger.add(tx, bucket, size, count)
            tx.execute(
                "INSERT INTO stored (id, files, bytes) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " files = stored.files + excluded.files, bytes = stored.bytes + excluded.bytes",
                (built.files, built.bytes),
            )
        if sqlite:
            with db.database.read() as tx:
                tx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                tx.execute("ANALYZE")
        built.seconds = time.perf_counter() - started - built.fragment_files_seconds
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
    all reconciliation looks at; reading one would fail its checksum.
    """
    count = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for uid, part, bucket, *_ in rows:
        if bucket == bucket_id:
            fid = f"{uid}.{part}"
            os.close(os.open(fragments / fid[:2] / fid, flags, 0o644))
            count += 1
    return count
