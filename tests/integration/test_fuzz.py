"""Short runs of scripts/fuzz.py with fixed seeds: hostile WebSocket sessions against the API
server, then raw bytes against the gRPC, membership and metrics ports. Every process must
survive and serve, and the stack must be left clean: no finding (docs/fuzzing.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

FUZZ = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"
CHECKS = (
    "processes alive",
    "serving (round trip, /healthz)",
    "nothing stored unless sent whole",
    "registry and disks reconciled",
    "file descriptors at baseline",
    "no internal error sent",
    "no traceback in the logs",
)


def _fuzz(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        str(FUZZ),
        *args,
        f"--data={tmp_path / 'data'}",
        f"--json={summary}",
        # Bounded even when something is found (a finding fails the test anyway).
        "--triage-time=10",
        "--check-timeout=20",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    output = run.stdout + run.stderr
    assert summary.exists(), output
    result: dict[str, Any] = json.loads(summary.read_text())
    assert run.returncode == 0, output
    assert result["findings"] == [], output
    assert result["checks"] == dict.fromkeys(CHECKS, "ok"), output
    # The table a person reads says the same.
    assert "findings                                 0" in run.stdout, run.stdout
    return result, output


def test_websocket_sessions_find_nothing(tmp_path: Path) -> None:
    result, output = _fuzz(tmp_path, "--seed=11", "--sessions=300", "--time-limit=15")
    assert result["mode"] == "ws"
    assert result["sessions"] >= 100, output
    # Every scenario ran, and the well-formed uploads among them were stored.
    assert len(result["scenarios"]) == 11, output
    assert result["acknowledged"] >= 10, output
    valid = result["outcomes"]["upload_valid"]
    assert valid.get("valid upload: ok 1000", 0) >= 5, output
    # Hostile sessions were refused the documented ways.
    codes = {outcome for outcomes in result["outcomes"].values() for outcome in outcomes}
    for expected in ("bad_request 4400", "bad_name 4400", "http 400"):
        assert expected in codes, output


def test_raw_connections_find_nothing(tmp_path: Path) -> None:
    result, output = _fuzz(tmp_path, "--raw", "--seed=11", "--connections=300", "--time-limit=10")
    assert result["mode"] == "raw"
    assert result["sessions"] >= 100, output
    targets = {scenario.split(":")[0] for scenario in result["scenarios"]}
    assert targets == {"grpc", "membership", "metrics"}, output
    metrics = result["outcomes"]["metrics:valid"]
    assert any(outcome.startswith("http 200") for outcome in metrics), output
