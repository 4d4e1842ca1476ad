"""scripts/bench_floor.py, briefly: every component is measured and the floors add up (the
plumbing, not the speed: a tiny file and a few small files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_floor.py"


def test_the_floor_prints_each_component_and_their_sum(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--size", "8M", "--small-count", "10", "--dir", str(work)]
    run = subprocess.run([*cmd, "--json", str(out)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    names = [floor["name"] for floor in data["floors"]]
    assert names == ["upload", "download", "64 KiB upload", "64 KiB download"]
    for floor in data["floors"]:
        summed = [c["cost"] for c in floor["components"] if c["summed"]]
        assert floor["total"]["wall"] == pytest.approx(sum(c["wall"] for c in summed))
        assert floor["total"]["cpu"] == pytest.approx(sum(c["cpu"] for c in summed))
        assert floor["total"]["wall"] > 0
    upload = data["floors"][0]["components"]
    assert [c["volume"] for c in upload if "loopback" in c["what"]] == [1.0, pytest.approx(8 / 6)]
    assert run.stdout.count("the floor") == 4
    assert list(work.iterdir()) == []  # its files are removed
