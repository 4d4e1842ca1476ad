"""The WebSocket protocol's error paths, frame by frame (docs/protocol.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trio_websocket import ConnectionClosed

from karma8.config import GiB, MiB
from karma8.core.protocol import UploadHeader, encode_upload_header
from karma8.errors import RemoteError
from tests.integration.harness import Cluster, expect_error, make_file, open_raw


@pytest.mark.parametrize(
    ("path", "first", "code", "close"),
    [
        ("/nowhere/x", None, "bad_request", 4400),
        ("/files/extra", None, "bad_request", 4400),
        ("/upload/a/../b", None, "bad_name", 4400),
        ("/upload/%ff", None, "bad_name", 4400),
        ("/upload/tab%09name", None, "bad_name", 4400),
        ("/download/missing", None, "not_found", 4404),
        ("/stat/missing", None, "not_found", 4404),
        ("/delete/missing", None, "not_found", 4404),
        ("/upload/x", b"data before the header", "bad_request", 4400),
        ("/upload/x", "not json", "bad_request", 4400),
        ("/upload/x", '{"size": -1}', "bad_request", 4400),
        ("/upload/x", '{"size": "12"}', "bad_request", 4400),
        ("/upload/x", '{"size": 1, "color": "red"}', "bad_request", 4400),
        ("/upload/x", json.dumps({"size": 11 * GiB}), "too_large", 1009),
    ],
)
async def test_bad_requests(
    cluster: Cluster, path: str, first: str | bytes | None, code: str, close: int
) -> None:
    async with open_raw(cluster.url, path) as ws:
        if first is not None:
            await ws.send_message(first)
        reply = await expect_error(ws)
        assert reply["error"] == code
        assert isinstance(reply["message"], str)
        assert reply["message"]
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == close
    assert cluster.all_files() == []


async def test_more_bytes_than_announced(cluster: Cluster) -> None:
    async with open_raw(cluster.url, "/upload/x") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=10)))
        await ws.send_message(b"0123456789A")
        assert (await expect_error(ws))["error"] == "size_mismatch"


async def test_a_frame_above_the_limit_closes_with_1009(cluster: Cluster) -> None:
    async with open_raw(cluster.url, "/upload/x") as ws:
        await ws.send_message(encode_upload_header(UploadHeader(size=2 * MiB)))
        await ws.send_message(b"x" * (MiB + 1))
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1009


async def test_second_upload_of_a_name_in_progress_is_a_conflict(cluster: Cluster, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old_sha = make_file(old, 100_000)
    await cluster.client.upload(old, "busy")
    async with open_raw(cluster.url, "/upload/busy") as first:
        await first.send_message(encode_upload_header(UploadHeader(size=8 * MiB)))
        await first.send_message(b"\x05" * MiB)
        with pytest.raises(RemoteError) as info:
            await cluster.client.upload(old, "busy")
        assert info.value.code == "conflict"
        # A download meanwhile serves the committed version.
        got = await cluster.client.download("busy", tmp_path / "during")
        assert got.sha256 == old_sha
        for _ in range(7):
            await first.send_message(b"\x05" * MiB)
        await first.send_message(b"")
        reply = json.loads(await first.get_message())
        assert reply["ok"] is True
    got = await cluster.client.download("busy", tmp_path / "after")
    assert got.size == 8 * MiB


async def test_download_of_a_name_only_being_uploaded_is_not_found(cluster: Cluster) -> None:
    async with open_raw(cluster.url, "/upload/fresh") as first:
        await first.send_message(encode_upload_header(UploadHeader(size=4 * MiB)))
        await first.send_message(b"\x06" * MiB)
        with pytest.raises(RemoteError) as info:
            await cluster.client.stat("fresh")
        assert info.value.code == "not_found"


async def test_files_reply_with_many_names_fits_the_client(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "f"
    make_file(src, 0)
    long = "x" * 1000
    for i in range(40):
        await cluster.client.upload(src, f"{long}/{i:03}")
    names = [f["name"] for f in await cluster.client.list(long)]
    assert names == [f"{long}/{i:03}" for i in range(40)]


@pytest.mark.parametrize("size", [64 * 1024, 3 * MiB + 5])
async def test_a_download_gathers_small_units_into_frames(
    cluster: Cluster, tmp_path: Path, size: int
) -> None:
    """A small file's fragments (a unit each) arrive in one frame; units of a big file as
    they are, no frame above max_frame (1 MiB)."""
    src = tmp_path / "f"
    make_file(src, size)
    await cluster.client.upload(src, "framed")
    async with open_raw(cluster.url, "/download/framed") as ws:
        assert json.loads(await ws.get_message())["size"] == size
        frames = []
        while message := await ws.get_message():
            assert isinstance(message, bytes)
            frames.append(message)
    assert b"".join(frames) == src.read_bytes()
    if size <= 64 * 1024:
        assert len(frames) == 1
    else:
        assert max(len(f) for f in frames) <= MiB
        assert len(frames) > size // MiB
