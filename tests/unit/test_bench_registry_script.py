"""scripts/bench_registry.py, briefly: both settings run on a real SQLite file and the table
shows them with the ratio (the plumbing, not the speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_registry.py"


def test_the_registry_bench_prints_both_settings_and_the_ratio(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--threads", "1", "4", "--uploads", "40", "--repeat", "1"]
    cmd += ["--dir", str(tmp_path)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "one"), ("1", "group"), ("4", "one"), ("4", "group")]
    assert all(float(r[-3]) > 0 for r in rows)  # uploads/s
    assert [r[-1] for r in rows[::2]] == ["1.00x", "1.00x"]  # the baseline of its own row pair
    assert list(tmp_path.iterdir()) == []  # its registries are removed
