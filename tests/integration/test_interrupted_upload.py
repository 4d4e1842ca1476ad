"""An interrupted upload leaves nothing behind, and the previous version stays intact."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
import trio

from karma8.config import MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.errors import RemoteError
from karma8.wsfix import close_transport
from tests.integration.harness import (
    Cluster,
    expect_error,
    make_file,
    open_cluster,
    open_raw,
    start_bucket,
    stop_process,
    upload_rows,
    wait_until,
)


async def wait_cleaned(cluster: Cluster, name: str, keep: tuple[str, ...] = ()) -> None:
    """Wait until the last upload of ``name`` failed and left nothing behind.

    Bucket files of the uploads ``keep`` are allowed to remain.
    """

    def cleaned() -> bool:
        db = cluster.registry()
        try:
            rows = upload_rows(db, name)
            return bool(rows) and rows[-1][1] == "failed" and not db.fragments(rows[-1][0])
        finally:
            db.close()

    await wait_until(cleaned, f"the interrupted upload of {name!r} to be cleaned up")
    await wait_until(
        lambda: all(n.startswith(keep) for n in cluster.all_files()),
        f"the interrupted upload's bucket files to go: {cluster.all_files()}",
    )
    db = cluster.registry()
    try:
        upload_id = upload_rows(db, name)[-1][0]
        assert cluster.files_of(upload_id) == []
        assert db.pending_deletions() == []
    finally:
        db.close()


async def upload_id_of(cluster: Cluster, name: str) -> str:
    return str((await cluster.client.stat(name))["upload_id"])


async def test_client_disconnect_mid_upload_leaves_nothing(cluster: Cluster, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good_sha = make_file(good, 5 * MiB + 1)
    async with open_raw(cluster.url, "/upload/cut") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=256 * MiB)))
        for _ in range(20):
            await ws.send_message(b"\x01" * MiB)
        await wait_until(
            lambda: any(p.stat().st_size > 0 for b in cluster.buckets for p in b.tmp_files()),
            "data to reach the buckets",
        )
        # Meanwhile another session is served normally.
        assert (await cluster.client.upload(good, "good")).sha256 == good_sha
        await close_transport(ws)  # the TCP connection dies without a closing handshake

    await wait_cleaned(cluster, "cut", keep=(await upload_id_of(cluster, "good"),))
    db = cluster.registry()
    try:
        assert db.lookup("cut") is None
    finally:
        db.close()
    assert (await cluster.client.download("good", tmp_path / "good.out")).sha256 == good_sha


async def test_garbage_mid_upload_is_refused_and_cleaned(cluster: Cluster) -> None:
    async with open_raw(cluster.url, "/upload/garbage") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=64 * MiB)))
        await ws.send_message(b"\x02" * MiB)
        await ws.send_message("this is not data")
        reply = await expect_error(ws)
    assert reply["error"] == "bad_request"
    await wait_cleaned(cluster, "garbage")


async def test_failed_overwrite_keeps_the_previous_version(cluster: Cluster, tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v1_sha = make_file(v1, 3 * MiB + 5, seed=1)
    await cluster.client.upload(v1, "doc")
    v1_id = await upload_id_of(cluster, "doc")

    # Version 2 announces 4 MiB and ends after 2: size_mismatch.
    async with open_raw(cluster.url, "/upload/doc") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=4 * MiB)))
        await ws.send_message(b"\x03" * MiB)
        await ws.send_message(b"\x03" * MiB)
        await ws.send_message(b"")
        assert (await expect_error(ws))["error"] == "size_mismatch"

    await wait_cleaned(cluster, "doc", keep=(v1_id,))
    assert await upload_id_of(cluster, "doc") == v1_id
    got = await cluster.client.download("doc", tmp_path / "out")
    assert got.sha256 == v1_sha
    db = cluster.registry()
    try:
        assert [state for _, state in upload_rows(db, "doc")] == ["committed", "failed"]
    finally:
        db.close()


async def test_wrong_announced_sha256_deletes_stored_fragments(cluster: Cluster, tmp_path: Path) -> None:
    """All six fragments are committed on the buckets before the sha256 check fails."""
    data = b"\x04" * (2 * MiB + 7)
    wrong = hashlib.sha256(b"something else").hexdigest()
    async with open_raw(cluster.url, "/upload/sum") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=len(data), sha256=wrong)))
        for i in range(0, len(data), MiB):
            await ws.send_message(data[i : i + MiB])
        await ws.send_message(b"")
        assert (await expect_error(ws))["error"] == "checksum_mismatch"
    await wait_cleaned(cluster, "sum")


async def test_a_good_sha256_is_accepted(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    digest = make_file(src, MiB + 1)
    info = await cluster.client.upload(src, "checked", sha256=digest)
    assert info.sha256 == digest


@pytest.mark.parametrize("how", ["kill", "stall"])
async def test_bucket_failure_mid_upload(tmp_path: Path, how: str) -> None:
    """A bucket dies (SIGKILL) or hangs (SIGSTOP) mid-upload: bucket_unavailable, the
    other buckets' parts are deleted, other sessions go on, and once the bucket is back
    the pending cleanup finishes and its temporary file is gone."""
    async with open_cluster(tmp_path, idle_timeout=2.0, connect_timeout=2.0) as cluster:
        src = tmp_path / "big"
        with src.open("wb") as f:
            f.truncate(512 * MiB)

        async def victim_writing() -> bool:
            return any(p.stat().st_size > 0 for b in cluster.buckets for p in b.tmp_files())

        error: list[RemoteError] = []

        async def upload() -> None:
            with pytest.raises(RemoteError) as info:
                await cluster.client.upload(src, "big")
            error.append(info.value)

        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await wait_until(victim_writing, "the upload to reach the buckets")
            victim = next(b for b in cluster.buckets if b.tmp_files())
            victim.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        assert error[0].code == "bucket_unavailable", error[0]

        others = [b for b in cluster.buckets if b is not victim]
        await wait_until(
            lambda: not any(b.fragment_ids() or b.tmp_files() for b in others),
            "the other buckets' parts to be deleted",
        )
        db = cluster.registry()
        try:
            ((upload_id, state),) = upload_rows(db, "big")
            assert state == "failed"
            # Only the unreachable bucket's cleanup is still pending.
            assert db.pending_deletions() == [(upload_id, victim.bucket_id)]
        finally:
            db.close()

        # Bring the bucket back: it re-registers, its leftovers go.
        if how == "kill":
            await victim.proc.wait()
            cluster.buckets.remove(victim)
            victim = await start_bucket(victim.data_dir, cluster.membership_port)
            cluster.buckets.append(victim)
        else:
            victim.proc.send_signal(signal.SIGCONT)
        await cluster.wait_live(6)
        await wait_cleaned(cluster, "big")

        small = tmp_path / "small"
        digest = make_file(small, 100_000)
        assert (await cluster.client.upload(small, "after")).sha256 == digest
        await stop_process(victim.proc)


@pytest.mark.parametrize("how", ["kill", "stall"])
async def test_bucket_failure_mid_download(tmp_path: Path, how: str) -> None:
    """A bucket dies or hangs while a download streams: the client gets bucket_unavailable
    promptly and no file, never a truncated one reported as success."""
    async with open_cluster(tmp_path, idle_timeout=2.0) as cluster:
        src = tmp_path / "big"
        with src.open("wb") as f:
            f.truncate(384 * MiB)
        await cluster.client.upload(src, "big")
        dst = tmp_path / "dst"
        error: list[RemoteError] = []

        async def download() -> None:
            with pytest.raises(RemoteError) as info:
                await cluster.client.download("big", dst)
            error.append(info.value)

        def receiving() -> bool:
            return any(p.stat().st_size > 16 * MiB for p in tmp_path.glob(".dst.*"))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(download)
                await wait_until(receiving, "the download to be under way")
                victim = cluster.buckets[3]
                victim.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        assert error[0].code == "bucket_unavailable", error[0]
        assert not dst.exists()
        assert not list(tmp_path.glob(".dst.*"))
        if how == "stall":
            victim.proc.send_signal(signal.SIGCONT)
        else:
            await victim.proc.wait()
