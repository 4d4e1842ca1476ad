"""scripts/balance.py on a real local stack: 6 buckets, 2 added, the rebalancer, a second corpus."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BALANCE = Path(__file__).resolve().parents[2] / "scripts" / "balance.py"
MAX_SPREAD = 1.10
MAX_MOVED_RATIO = 1.3
PHASES = ["first corpus", "2 buckets added", "rebalanced", "second corpus"]


def test_the_real_stack_meets_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "balance.json"
    cmd = [
        sys.executable,
        str(BALANCE),
        "--files=80",
        "--min-size=1KiB",
        "--max-size=2MiB",
        "--seed=3",
        "--verify=12",
        # The rebalancer's wait for buckets joining together (5 s by default), shorter.
        "--delay=2",
        f"--workdir={tmp_path / 'work'}",
        f"--json={out}",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    result = json.loads(out.read_text())
    assert result["failures"] == [], output
    phases = {p["name"]: p for p in result["phases"]}
    assert list(phases) == PHASES
    assert len(result["buckets"]) == 8
    # The first six are even by placement alone; the two new ones start empty.
    assert phases["first corpus"]["max_min"] <= MAX_SPREAD
    assert phases["2 buckets added"]["max_min"] is None
    for name in ("rebalanced", "second corpus"):
        assert phases[name]["max_min"] <= MAX_SPREAD, output
        assert min(phases[name]["used"].values()) > 0
    rebalanced = phases["rebalanced"]
    assert rebalanced["moved"] > 0
    assert rebalanced["moved_ratio"] <= MAX_MOVED_RATIO, output
    # Started by itself when the buckets joined (one run unless they joined far apart).
    runs = result["rebalancer_runs"]
    assert runs, output
    assert runs[0]["reason"].endswith("joined")
    assert all(r["failed"] == 0 for r in runs)
    assert sum(r["moved"] for r in runs) == rebalanced["moved"]
    # Every sampled file came back byte for byte, some of them with moved fragments.
    assert result["verified"] == 12
    assert result["moved_files_verified"] >= 1
    # The tables say the same as the JSON.
    ratios = re.findall(r"max/min (\S+)", run.stdout)
    assert len(ratios) == 4, run.stdout
    assert ratios[1] == "inf"
    assert float(ratios[2]) == round(rebalanced["max_min"], 3)
    assert "targets met" in run.stdout
