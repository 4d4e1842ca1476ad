"""/files page by page through a real API server: continuation tokens, common prefixes,
the old one-frame form and its limit, and a walk while files are added and deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trio_websocket import ConnectionClosed

from karma8.core.listing import MAX_PAGE
from karma8.registry.db import FragmentRow, UploadRow
from tests.integration.harness import Cluster, expect_error, make_file, open_raw

NAMES = ["d1/a", "d1/b", "d1/sub/c", "d2/d", "top1", "top2"]


async def _reply(cluster: Cluster, path: str) -> dict[str, object]:
    async with open_raw(cluster.url, path) as ws:
        reply = json.loads(await ws.get_message())
    assert reply["ok"] is True, reply
    return dict(reply)


async def _upload_all(cluster: Cluster, tmp_path: Path, names: list[str]) -> None:
    src = tmp_path / "src"
    make_file(src, 100, seed=1)
    for name in names:
        await cluster.client.upload(src, name)


async def test_pages_follow_their_tokens(cluster: Cluster, tmp_path: Path) -> None:
    await _upload_all(cluster, tmp_path, NAMES)
    first = await _reply(cluster, "/files?limit=4")
    assert [f["name"] for f in first["files"]] == NAMES[:4]  # type: ignore[attr-defined]
    assert (first["prefixes"], first["truncated"]) == ([], True)
    second = await _reply(cluster, f"/files?limit=4&continuation={first['next']}")
    assert [f["name"] for f in second["files"]] == NAMES[4:]  # type: ignore[attr-defined]
    assert (second["truncated"], second["next"]) == (False, None)
    # One level under a delimiter: directories as common prefixes, one page.
    top = await _reply(cluster, "/files?delimiter=%2F&limit=10")
    assert top["prefixes"] == ["d1/", "d2/"]
    assert [f["name"] for f in top["files"]] == ["top1", "top2"]  # type: ignore[attr-defined]
    d1 = await _reply(cluster, "/files?prefix=d1%2F&delimiter=%2F&limit=1")
    assert ([f["name"] for f in d1["files"]], d1["truncated"]) == (["d1/a"], True)  # type: ignore[attr-defined]
    after = await _reply(cluster, "/files?start_after=d1%2Fb&limit=2")
    assert [f["name"] for f in after["files"]] == ["d1/sub/c", "d2/d"]  # type: ignore[attr-defined]
    # The client walks the pages; entries merge files and prefixes in name order.
    walked = [e async for e in cluster.client.walk("", delimiter="/", page_size=1)]
    assert [e.get("name", e.get("prefix")) for e in walked] == ["d1/", "d2/", "top1", "top2"]
    assert [f["name"] for f in await cluster.client.list()] == NAMES


async def test_the_old_form_answers_whole_or_refuses(cluster: Cluster, tmp_path: Path) -> None:
    """A client that sends no paging parameter gets the whole listing in one frame up to
    MAX_PAGE files, and ``too_large`` beyond; paging clients get everything."""
    await _upload_all(cluster, tmp_path, ["real"])
    old = await _reply(cluster, "/files")
    assert sorted(old) == ["files", "ok"]
    assert [f["name"] for f in old["files"]] == ["real"]  # type: ignore[attr-defined]
    # MAX_PAGE more committed rows, written by the registry's own code beside the server.
    registry = cluster.registry()
    try:
        for i in range(MAX_PAGE):
            upload_id = f"{i + 1:032x}"
            registry.begin_upload(
                UploadRow(upload_id, f"bulk/{i:04}", 0, 1, unit=1, state="in_progress", created=1.0),
                [FragmentRow(upload_id, 0, "elsewhere", 0, None)],
            )
            registry.commit_upload(upload_id, "ab" * 32, {0: "00" * 32}, 2.0)
    finally:
        registry.close()
    async with open_raw(cluster.url, "/files") as ws:
        error = await expect_error(ws)
        assert error["error"] == "too_large"
        assert "limit=" in str(error["message"])
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1009
    assert len((await _reply(cluster, "/files?prefix=bulk%2F"))["files"]) == MAX_PAGE  # type: ignore[arg-type]
    names = [f["name"] for f in await cluster.client.list()]
    assert names == [f"bulk/{i:04}" for i in range(MAX_PAGE)] + ["real"]


async def test_a_walk_while_files_come_and_go_sees_each_name_once(cluster: Cluster, tmp_path: Path) -> None:
    await _upload_all(cluster, tmp_path, NAMES)
    src = tmp_path / "src"
    changes = iter([("add", "a-first"), ("delete", "d2/d"), ("add", "z-later"), ("delete", "d1/a")])
    seen: list[str] = []
    async for entry in cluster.client.walk(page_size=2):
        seen.append(entry["name"])
        change = next(changes, None)
        if change is None:
            continue
        if change[0] == "add":
            await cluster.client.upload(src, change[1])
        else:
            await cluster.client.delete(change[1])
    assert seen == sorted(set(seen))
    # Stayed all along: listed. Added before the walk got there: listed. Behind it: not.
    assert {"d1/b", "d1/sub/c", "top1", "top2", "z-later"} <= set(seen)
    assert "a-first" not in seen
