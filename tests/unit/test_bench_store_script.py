"""scripts/bench_store.py, briefly: files and needles both stored, a row each and the ratio
(the plumbing, not the speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_store.py"


def test_the_store_bench_prints_both_stores_and_the_ratio(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--count", "40", "--size", "4K", "--dir", str(tmp_path)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["files", "needles", "ratio"]
    assert float(rows[0][3]) == 2.0  # two fsyncs per fragment file
    assert 0 < float(rows[1][3]) <= 1.0  # at most one fdatasync per needle, fewer when batched
    assert list(tmp_path.iterdir()) == []  # its stores are removed
