"""A flipped byte on a bucket's disk is detected, reported, and never served as good data."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from karma8.api import scrub
from karma8.config import MiB
from karma8.errors import RemoteError
from tests.integration.harness import Cluster, karma8_cmd, make_file


async def test_a_flipped_byte_is_caught_by_download_verify_and_stat(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_file(src, 3 * MiB + 17)
    await cluster.client.upload(src, "fragile")
    await cluster.client.upload(src, "sound")
    stat = await cluster.client.stat("fragile")
    victim = stat["parts"][2]
    holder = cluster.bucket(victim["bucket"])
    (fid,) = holder.files_of(stat["upload_id"])
    holder.flip(fid, 1000)  # a byte of the data, in a volume's needle or in a file

    dst = tmp_path / "dst"
    with pytest.raises(RemoteError) as info:
        await cluster.client.download("fragile", dst)
    assert info.value.code == "checksum_mismatch"
    assert not dst.exists()
    assert not list(tmp_path.glob(".dst*")), "partial download left behind"

    report = await cluster.client.verify()
    assert (report["files"], report["fragments"]) == (2, 12)
    assert [(d["name"], d["part"], d["bucket"]) for d in report["damaged"]] == [
        ("fragile", 2, victim["bucket"])
    ]
    assert str(report["damaged"][0]["problem"]).startswith("corrupt")
    stat = await cluster.client.stat("fragile")
    assert stat["damaged"] is True
    # 6 buckets: parity parts 6 and 7 were never placed (owed), and have no problem.
    assert [p["problem"] for p in stat["parts"]] == [None, None, "corrupt", None, None, None, None, None]
    assert (await cluster.client.stat("sound"))["damaged"] is False

    cli = await trio.run_process(
        karma8_cmd("verify", "fragile", "--api", cluster.url), capture_stdout=True, check=False
    )
    assert cli.returncode == 1
    assert b"DAMAGED fragile part 2" in cli.stdout

    holder.flip(fid, 1000)  # repaired by hand: the next scrub clears the mark
    assert (await cluster.client.verify("fragile"))["damaged"] == []
    assert (await cluster.client.stat("fragile"))["damaged"] is False
    got = await cluster.client.download("fragile", dst)
    assert got.size == 3 * MiB + 17


async def test_a_lost_fragment_is_reported_by_verify(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    # Every part is 2 stripe units (512 KiB each): bigger than a fragment sent whole, so
    # streamed, a file of its own (a needle in a volume cannot be lost alone behind the
    # bucket's back).
    make_file(src, 12 * 512 * 1024)
    await cluster.client.upload(src, "lossy")
    stat = await cluster.client.stat("lossy")
    part = stat["parts"][0]
    holder = cluster.bucket(part["bucket"])
    (path,) = [p for p in holder.fragment_files() if p.name.startswith(stat["upload_id"])]
    assert holder.files_of(stat["upload_id"]) == [path.name]
    path.unlink()
    report = await cluster.client.verify("lossy")
    assert [(d["part"], d["problem"]) for d in report["damaged"]] == [(0, "missing")]
    with pytest.raises(RemoteError) as info:
        await cluster.client.download("lossy", tmp_path / "out")
    assert info.value.code in {"bucket_unavailable", "checksum_mismatch"}


async def test_a_scrub_of_every_file_walks_the_names_page_by_page(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrub, "PAGE", 2)  # the API server runs in this process
    src = tmp_path / "src"
    make_file(src, 1000)
    names = [f"scrub/{n}" for n in range(7)]
    for name in names:
        await cluster.client.upload(src, name)
    stat = await cluster.client.stat(names[5])
    victim = stat["parts"][0]
    holder = cluster.bucket(victim["bucket"])
    (fid,) = holder.files_of(stat["upload_id"])
    holder.flip(fid, 10)

    report = await cluster.client.verify()
    assert (report["files"], report["fragments"]) == (7, 7 * 6)
    assert [(d["name"], d["part"]) for d in report["damaged"]] == [(names[5], 0)]
