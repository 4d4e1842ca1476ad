"""Sessions: several operations, one after the other, on one connection (docs/protocol.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from karma8.core.protocol import UploadHeader, encode_session_request, encode_upload_header
from karma8.errors import RemoteError
from tests.integration.harness import Cluster, expect_error, make_file, open_cluster, open_raw


async def test_a_session_serves_every_operation_on_one_connection(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    digest = make_file(src, 200_000)
    async with cluster.client.session() as session:
        info = await session.upload(src, "s/one")
        connection = session._ws  # type: ignore[attr-defined]
        assert connection is not None
        assert info.sha256 == digest
        await session.upload(src, "s/two")
        got = await session.download("s/one", tmp_path / "back")
        assert got.sha256 == digest
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
        assert (await session.stat("s/two"))["sha256"] == digest
        assert [f["name"] for f in await session.list("s/")] == ["s/one", "s/two"]
        await session.delete("s/one")
        assert (await session.status())["live"] == len(cluster.buckets)
        assert session._ws is connection  # type: ignore[attr-defined]  # all on one connection
    assert [f["name"] for f in await cluster.client.list()] == ["s/two"]


async def test_a_session_goes_on_after_a_one_frame_error(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_file(src, 1000)
    await cluster.client.upload(src, "there")
    async with open_raw(cluster.url, "/session") as ws:
        for path in ("/stat/missing", "/download/missing", "/delete/missing"):
            await ws.send_message(encode_session_request(path))
            reply = await expect_error(ws)
            assert reply["error"] == "not_found"
        await ws.send_message(encode_session_request("/stat/there"))
        assert json.loads(await ws.get_message())["size"] == 1000
        await ws.send_message(encode_session_request("/download/there"))
        assert json.loads(await ws.get_message())["size"] == 1000
        assert await ws.get_message() == src.read_bytes()
        assert await ws.get_message() == b""
        await ws.send_message(encode_session_request("/upload/second"))
        await ws.send_message(encode_upload_header(UploadHeader(size=3)))
        await ws.send_message(b"abc")
        await ws.send_message(b"")
        assert json.loads(await ws.get_message())["size"] == 3
    assert [f["name"] for f in await cluster.client.list()] == ["second", "there"]


@pytest.mark.parametrize(
    ("frames", "code", "close"),
    [
        (["not json"], "bad_request", 4400),
        ([b"binary"], "bad_request", 4400),
        (['{"path": "/session"}'], "bad_request", 4400),
        (['{"path": "/stat/x", "more": 1}'], "bad_request", 4400),
        ([encode_session_request("/upload/x"), '{"size": -1}'], "bad_request", 4400),
        (
            [encode_session_request("/upload/x"), encode_upload_header(UploadHeader(3)), b"abcd"],
            "size_mismatch",
            4400,
        ),
    ],
)
async def test_a_session_ends_after_other_errors(
    cluster: Cluster, frames: list[str | bytes], code: str, close: int
) -> None:
    """A request that is not one, and any error of an upload (the client may be sending
    data), end the session as a connection of its own would end."""
    async with open_raw(cluster.url, "/session") as ws:
        for frame in frames:
            await ws.send_message(frame)
        assert (await expect_error(ws))["error"] == code
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == close
    assert cluster.all_files() == []


async def test_a_session_client_opens_a_new_connection_after_an_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_file(src, 5000)
    async with cluster.client.session() as session:
        with pytest.raises(RemoteError) as info:
            await session.download("missing", tmp_path / "nothing")
        assert info.value.code == "not_found"
        assert not (tmp_path / "nothing").exists()
        await session.upload(src, "after")
        assert (await session.stat("after"))["size"] == 5000


async def test_an_idle_session_is_closed_normally(tmp_path: Path) -> None:
    async with (
        open_cluster(tmp_path, buckets=0, idle_timeout=1.0) as cluster,
        open_raw(cluster.url, "/session") as ws,
    ):
        await ws.send_message(encode_session_request("/status"))
        assert json.loads(await ws.get_message())["ok"] is True
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as info:
            await ws.get_message()  # nothing sent for idle_timeout: the server ends it
        assert info.value.reason is not None
        assert info.value.reason.code == 1000
