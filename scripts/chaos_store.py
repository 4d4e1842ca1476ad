"""What is stored: the registry (read through a connection of its own, to the SQLite file or
the PostgreSQL database) and the bucket disks (read directly), and how the two compare.

The bucket layout is the one docs/architecture.md describes: fragments that arrived whole
as needles appended to volume files ``<data>/volumes/v<n>.dat``, the others as fragment
files under ``<data>/fragments/<2 hex>/<upload id>.<part>``, and Puts in progress under
``<data>/tmp/``. A needle of a fragment id shadows a file of the same id.
A fragment file is its data and then, in format 1, a 48-byte footer (magic ``K8FRAG01``,
data length, sha256 of the data); in format 2, a crc32c per unit and a 56-byte footer
(data length, unit, sha256 of the data, magic ``K8FRAG02``). The footers are parsed here
from that description, not with the bucket's own code. The volumes are read with
karma8.bucket.volumes.scan (it reads, never changes) and the needle headers with
karma8.core.needles (the layout alone, no I/O).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from karma8.bucket.volumes import scan
from karma8.core.needles import HEADER_SIZE, decode_header
from karma8.registry.db import RegistryDB

FOOTER_1 = struct.Struct("<8sQ32s")
FOOTER_2 = struct.Struct("<QQ32s8s")


#: A fragment's key across the whole stack: (bucket id, fragment id).
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Expected:
    """A fragment of a committed file, as the registry records it."""

    name: str
    upload_id: str
    size: int
    sha256: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry at one moment."""

    committed: dict[Key, Expected]
    pending: list[tuple[str, str]]
    in_progress: list[tuple[str, str]]
    files: dict[str, str]
    #: Committed uploads that no ``files`` row points at, and files rows whose upload is not committed.
    inconsistent: list[str]
    #: Work repair still has to do: owed fragments, files in the repair queue.
    repairs: list[str] = field(default_factory=list)


class RegistryView:
    """Read-only use of the API servers' registry from this process (SQLite WAL allows it).

    Args:
        where: a registry URL or the path of a SQLite file.
    """

    def __init__(self, where: Path | str) -> None:
        self._path = where
        self._db: RegistryDB | None = None
        self._limiter = trio.CapacityLimiter(1)

    def _open(self) -> RegistryDB:
        if self._db is None:
            self._db = RegistryDB(self._path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _in_progress(self, name: str) -> set[str]:
        rows = self._open()._query("SELECT id FROM uploads WHERE name = ? AND state = 'in_progress'", (name,))
        return {str(r[0]) for r in rows}

    def _fully_protected(self, upload_id: str) -> bool:
        rows = self._open()._query(
            "SELECT 1 FROM uploads u WHERE u.id = ? AND u.state = 'committed'"
            " AND NOT EXISTS (SELECT 1 FROM repairs r WHERE r.upload_id = u.id)"
            " AND (SELECT COUNT(*) FROM fragments f WHERE f.upload_id = u.id AND f.state = 'ok')"
            " = u.parts + u.parity",
            (upload_id,),
        )
        return bool(rows)

    async def fully_protected(self, upload_id: str) -> bool:
        """Whether ``upload_id`` is committed with every fragment of its scheme written and
        nothing queued for repair (it can take 2 more losses)."""
        return await trio.to_thread.run_sync(self._fully_protected, upload_id, limiter=self._limiter)

    async def in_progress(self, name: str) -> set[str]:
        """Ids of the uploads of ``name`` the registry has in progress."""
        return await trio.to_thread.run_sync(self._in_progress, name, limiter=self._limiter)

    def _snapshot(self) -> Snapshot:
        db = self._open()
        committed: dict[Key, Expected] = {}
        repairs = [
            f"part {p} of upload {u} ({n!r}) is owed"
            for u, p, n in db._query(
                "SELECT f.upload_id, f.part, u.name FROM fragments f JOIN uploads u ON u.id = f.upload_id"
                " WHERE f.state = 'owed' AND u.state = 'committed'"
            )
        ]
        repairs += [
            f"upload {u} queued for repair ({r}, {s} fragment(s) to spare)"
            for u, r, s in db._query("SELECT upload_id, reason, spare FROM repairs")
        ]
        for upload_id, part, bucket_id, size, sha, name in db._query(
            "SELECT f.upload_id, f.part, f.bucket_id, f.size, f.sha256, u.name FROM fragments f"
            " JOIN uploads u ON u.id = f.upload_id WHERE u.state = 'committed' AND f.state = 'ok'"
        ):
            committed[str(bucket_id), f"{upload_id}.{part}"] = Expected(
                str(name), str(upload_id), int(size), None if sha is None else str(sha)
            )
        in_progress = [
            (str(i), str(n)) for i, n in db._query("SELECT id, name FROM uploads WHERE state = 'in_progress'")
        ]
        files = {str(n): str(u) for n, u in db._query("SELECT name, upload_id FROM files")}
        states = {str(i): str(s) for i, s in db._query("SELECT id, state FROM uploads")}
        committed_ids = {i for i, s in states.items() if s == "committed"}
        inconsistent = [
            f"committed upload {u} is no file's current version"
            for u in sorted(committed_ids - set(files.values()))
        ] + [
            f"file {n!r} points at upload {u} in state {states.get(u, 'unknown')}"
            for n, u in sorted(files.items())
            if states.get(u) != "committed"
        ]
        # Every pending deletion, also those a download still holds back; copies the
        # rebalancer is writing or left behind are pending deletions too.
        pending = [
            (str(u), str(b))
            for u, b in db._query(
                "SELECT f.upload_id, f.bucket_id FROM fragments f JOIN uploads u ON u.id = f.upload_id"
                " WHERE u.state IN ('failed', 'deleting')"
                " UNION SELECT upload_id, dst FROM moves UNION SELECT upload_id, bucket_id FROM stale"
            )
        ]
        return Snapshot(committed, pending, in_progress, files, inconsistent, repairs)

    async def snapshot(self) -> Snapshot:
        return await trio.to_thread.run_sync(self._snapshot, limiter=self._limiter)

    def _explain(self, key: Key) -> str:
        """What the registry says about the upload of a fragment (for violation reports)."""
        db = self._open()
        bucket_id, fid = key
        upload_id, _, part = fid.partition(".")
        upload = db.upload(upload_id)
        if upload is None:
            return f"the registry has no upload {upload_id}"
        rows = {f.part: f.bucket_id for f in db.fragments(upload_id)}
        placed = rows.get(int(part)) if part.isdigit() else None
        where = (
            "no fragment row for this part"
            if placed is None
            else (
                "its row places it on this bucket" if placed == bucket_id else f"its row says bucket {placed}"
            )
        )
        return f"registry: upload {upload_id} of {upload.name!r} is {upload.state}; {where}"

    async def explain(self, key: Key) -> str:
        return await trio.to_thread.run_sync(self._explain, key, limiter=self._limiter)


@dataclass(frozen=True, slots=True)
class OnDisk:
    """A fragment on a bucket's disk: a file, or a needle in a volume (``path``: the volume)."""

    bucket: str
    path: Path
    size: int
    sha256: str | None
    age: float


@dataclass
class Disks:
    """Every bucket's fragments (files and needles) and temporary files."""

    fragments: dict[Key, OnDisk] = field(default_factory=dict)
    tmp: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _footer(path: Path) -> tuple[int, str | None]:
    """(data size, sha256 from the footer); sha256 None if the footer is not valid."""
    with path.open("rb") as f:
        total = f.seek(0, 2)
        if total >= FOOTER_2.size:
            f.seek(total - FOOTER_2.size)
            size, unit, digest, magic = FOOTER_2.unpack(f.read(FOOTER_2.size))
            if magic == b"K8FRAG02":
                if unit < 1 or total != size + 4 * -(-size // unit) + FOOTER_2.size:
                    return size, None
                return int(size), bytes(digest).hex()
        if total < FOOTER_1.size:
            return total, None
        f.seek(total - FOOTER_1.size)
        magic, size, digest = FOOTER_1.unpack(f.read(FOOTER_1.size))
    if magic != b"K8FRAG01" or size != total - FOOTER_1.size:
        return total - FOOTER_1.size, None
    return int(size), bytes(digest).hex()


def _needles(volumes: Path, now: float) -> dict[str, OnDisk]:
    """The live needles of one bucket's volumes (the bucket may be writing them meanwhile:
    the scan stops at a needle not yet whole, and a volume compacted away is skipped)."""
    if not volumes.exists():
        return {}
    try:
        found = scan(volumes)
    except FileNotFoundError:  # a volume removed by compaction while we looked: next time
        return {}
    out = {}
    for fid, needle in found.items():
        try:
            with needle.path.open("rb") as f:
                f.seek(needle.data_offset - HEADER_SIZE)
                header = decode_header(f.read(HEADER_SIZE))
        except FileNotFoundError:
            continue
        if header is None or header.fragment_id != fid:  # compacted meanwhile: it moved
            continue
        age = max(0.0, now - header.appended)
        out[fid] = OnDisk(volumes.parent.name, needle.path, needle.size, header.sha256.hex(), age)
    return out


def scan_disks(bucket_dirs: list[Path]) -> Disks:
    """Read every bucket directory (blocking: run in a thread)."""
    disks = Disks()
    now = time.time()
    for root in bucket_dirs:
        try:
            bucket_id = (root / "bucket-id").read_text().strip()
        except FileNotFoundError:
            continue  # never started
        frag_root = root / "fragments"
        paths = sorted(p for p in frag_root.rglob("*") if p.is_file()) if frag_root.exists() else []
        for path in paths:
            try:
                size, sha = _footer(path)
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue  # deleted while we looked
            disks.fragments[bucket_id, path.name] = OnDisk(root.name, path, size, sha, age)
        for fid, found in _needles(root / "volumes", now).items():
            disks.fragments[bucket_id, fid] = found  # a needle shadows a file of the same id
        tmp = root / "tmp"
        if tmp.exists():
            disks.tmp += sorted(tmp.iterdir())
    return disks


@dataclass(frozen=True, slots=True)
class Comparison:
    """Registry against disks."""

    orphans: list[Key]
    missing: list[Key]
    damaged: list[str]
    tmp: list[Path]
    pending: list[tuple[str, str]]
    in_progress: list[tuple[str, str]]
    inconsistent: list[str]
    repairs: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.orphans
            or self.missing
            or self.damaged
            or self.tmp
            or self.pending
            or self.in_progress
            or self.inconsistent
            or self.repairs
        )

    @property
    def size(self) -> int:
        """How many differences there are, all kinds together."""
        return (
            len(self.orphans)
            + len(self.missing)
            + len(self.damaged)
            + len(self.tmp)
            + len(self.pending)
            + len(self.in_progress)
            + len(self.inconsistent)
            + len(self.repairs)
        )

    def brief(self) -> str:
        return (
            f"{len(self.orphans)} orphan(s), {len(self.missing)} missing, {len(self.damaged)} damaged,"
            f" {len(self.tmp)} temporary file(s), {len(self.pending)} pending deletion(s),"
            f" {len(self.in_progress)} upload(s) in progress, {len(self.inconsistent)} registry problem(s),"
            f" {len(self.repairs)} repair(s) to do"
        )


def compare(snapshot: Snapshot, disks: Disks) -> Comparison:
    """What differs between the committed fragments and the files on disk."""
    on_disk, expected = disks.fragments.keys(), snapshot.committed.keys()
    damaged = []
    for key in sorted(on_disk & expected):
        got, want = disks.fragments[key], snapshot.committed[key]
        if got.size != want.size or got.sha256 is None or got.sha256 != want.sha256:
            damaged.append(
                f"{got.path}: {got.size} bytes, footer sha256 {got.sha256}; registry: {want.size} bytes,"
                f" sha256 {want.sha256} (file {want.name!r})"
            )
    return Comparison(
        orphans=sorted(on_disk - expected),
        missing=sorted(expected - on_disk),
        damaged=damaged,
        tmp=disks.tmp,
        pending=snapshot.pending,
        in_progress=snapshot.in_progress,
        inconsistent=snapshot.inconsistent,
        repairs=snapshot.repairs,
    )
