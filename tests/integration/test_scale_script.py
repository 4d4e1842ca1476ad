"""scripts/scale.py at a tiny size: every row is measured at both sizes, and the setup holds
(the walk sees every name, reconciliation finds bucket 0 complete, the plan has moves).

It checks the plumbing, not the speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCALE = ROOT / "scripts" / "scale.py"
sys.path.insert(0, str(ROOT / "scripts"))

from scale import ROWS  # noqa: E402


def test_tiny_registry_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCALE), "--files=2000", "--baseline=500", "--repeat=1", "--slow-repeat=1"]
    cmd += [f"--data={tmp_path / 'data'}", f"--json={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for _, label, unit, _ in ROWS:
        [row] = [line for line in lines if re.match(rf"{re.escape(label)}  +{re.escape(unit)} ", line)]
        cells = row[len(label) :].split()
        assert "-" not in cells[1:3], row  # measured at both sizes
    assert any("500 files" in line and "2,000 files" in line and "ratio" in line for line in lines)
    result: dict[str, Any] = json.loads(out.read_text())
    assert [r["files"] for r in result["runs"]] == [500, 2000]
    for r in result["runs"]:
        info = r["info"]
        assert info["walk_names"] == r["files"] + 5  # the bulk files and the 5 uploaded
        assert info["prefix_names"] == 500 if r["files"] == 500 else 1000
        assert info["reconcile_listed"] == r["files"] + 5
        assert info["reconcile_unknown"] == 0
        assert info["reconcile_missing"] == 0
        assert info["plan_moves"] > 0
    assert not (tmp_path / "data" / "2000").exists()  # not kept
