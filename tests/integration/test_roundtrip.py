"""Uploads and downloads through the real stack: bytes equal, parts where they belong."""

from __future__ import annotations

from pathlib import Path

import pytest

from karma8.bucket.store import overhead
from karma8.config import MiB
from karma8.core.fragments import parse_fragment_id
from karma8.core.layout import Layout
from karma8.core.needles import HEADER_SIZE, decode_header, needle_size
from tests.integration.harness import Cluster, make_file, sha256_of, wait_until


@pytest.mark.parametrize("size", [0, 1, 5, 6, 7, MiB + 3, 64 * MiB])
async def test_round_trip(cluster: Cluster, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src"
    digest = make_file(src, size, seed=size)
    info = await cluster.client.upload(src, "some/dir/file name é")
    assert (info.size, info.sha256) == (size, digest)

    dst = tmp_path / "dst"
    got = await cluster.client.download("some/dir/file name é", dst)
    assert got.sha256 == digest
    assert sha256_of(dst) == digest
    assert not list(tmp_path.glob(".dst.*")), "temporary download file left behind"

    stat = await cluster.client.stat("some/dir/file name é")
    parts = [p for p in stat["parts"] if p["bucket"]]  # 6 buckets: the parity is owed
    assert len(parts) == 6
    assert len({p["bucket"] for p in parts}) == 6, "two parts on one bucket"
    assert [p["size"] for p in parts] == Layout(size, 6, stat["stripe_unit"]).part_sizes()
    if size >= 6:
        assert all(p["size"] > 0 for p in parts)

    # On disk: each bucket named in the registry holds exactly its part, with a crc32c
    # per unit: a needle in a volume (a part sent whole: up to the [api] stripe_unit), or a file
    # with its footer (a bigger part, streamed).
    unit = stat["stripe_unit"]
    assert cluster.api_config is not None
    whole = cluster.api_config.stripe_unit  # fragments up to this size are sent whole
    for p in parts:
        holder = cluster.bucket(p["bucket"])
        names = holder.files_of(stat["upload_id"])
        assert [parse_fragment_id(n) for n in names] == [(stat["upload_id"], p["part"])]
        path, offset, data_size = holder.fragment_at(names[0])
        assert data_size == p["size"]
        if names[0] in holder.needles():
            assert p["size"] <= whole
            with path.open("rb") as f:
                f.seek(offset - HEADER_SIZE)
                header = decode_header(f.read(HEADER_SIZE))
            assert header is not None
            assert (header.fragment_id, header.size, header.unit) == (names[0], p["size"], unit)
            assert header.length == needle_size(p["size"], unit)
        else:
            assert p["size"] > whole
            assert path.stat().st_size == p["size"] + overhead(p["size"], unit)
    assert not any(b.tmp_files() for b in cluster.buckets)


async def test_registry_rows_after_upload(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    digest = make_file(src, 3 * MiB + 11)
    await cluster.client.upload(src, "rows")
    db = cluster.registry()
    try:
        row = db.lookup("rows")
        assert row is not None
        assert (row.size, row.sha256, row.upload.state) == (3 * MiB + 11, digest, "committed")
        assert len(row.fragments) == 6
        assert all(f.sha256 and len(f.sha256) == 64 for f in row.fragments)
        assert db.pending_deletions() == []
    finally:
        db.close()


async def test_list_stat_delete(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    make_file(src, 1000)
    for name in ("a/1", "a/2", "b/1"):
        await cluster.client.upload(src, name)
    assert [f["name"] for f in await cluster.client.list()] == ["a/1", "a/2", "b/1"]
    assert [f["name"] for f in await cluster.client.list("a/")] == ["a/1", "a/2"]

    upload_id = (await cluster.client.stat("a/1"))["upload_id"]
    assert cluster.files_of(upload_id)
    await cluster.client.delete("a/1")
    assert [f["name"] for f in await cluster.client.list()] == ["a/2", "b/1"]
    db = cluster.registry()
    try:
        await wait_until(
            lambda: not cluster.files_of(upload_id) and db.upload(upload_id) is None,
            "the deleted file's fragments and registry rows to go",
        )
    finally:
        db.close()


async def test_status_reports_buckets(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    make_file(src, 6 * 1000)
    await cluster.client.upload(src, "x")

    async def counted() -> bool:
        st = await cluster.client.status()
        fragments = sum(int(b["fragments"]) for b in st["buckets"])
        return fragments == 6 and sum(int(b["used"]) for b in st["buckets"]) == 6000

    await wait_until(counted, "heartbeats to report the new fragments")
    st = await cluster.client.status()
    assert st["live"] == 6
    assert {b["id"] for b in st["buckets"]} == {b.bucket_id for b in cluster.buckets}
    assert all(b["live"] and b["free"] > 0 for b in st["buckets"])
