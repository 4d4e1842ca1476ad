"""Short runs of scripts/chaos.py: every kind of fault, and nothing lost or left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.pg import require_postgres

CHAOS = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"
FAULTS = ("socket_kill", "client_kill", "bucket_kill", "api_kill", "bucket_loss", "bit_flip")
#: Faults come often so that a run of 20-25 s sees each kind several times.
FAST = (
    "--max-size=256KiB",
    "--concurrency=6",
    "--bucket-downtime=0.3:1",
    "--settle-timeout=60",
)


def run_chaos(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
    """Run the script with ``args`` (and FAST); it must exit 0 with no violation."""
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, str(CHAOS), *FAST, *args, f"--data={tmp_path / 'data'}", f"--json={summary}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    result = json.loads(summary.read_text())
    assert result["violations"] == [], output
    assert result["acknowledged"] >= 20, output
    assert result["orphans"] == result["missing"] == result["tmp_files"] == 0
    assert result["lost_files"] == result["damaged_after_repair"] == 0
    return run, result, output


def test_a_short_chaos_run_finds_no_violation(tmp_path: Path) -> None:
    run, result, output = run_chaos(
        tmp_path,
        "--duration=20",
        "--seed=7",
        "--bucket-kill-every=2:4",
        "--api-kill-every=4:6",
        "--api-downtime=0.2:0.6",
        "--socket-kill-every=0.5:1.5",
        "--client-kill-every=0.5:1.5",
        "--bucket-loss-every=12:15",  # one loss in 20 s: with a flip, the 2 a file survives
        "--bit-flip-every=1:2",
    )
    for kind in FAULTS:
        assert result["faults"].get(kind, 0) >= 1, f"no {kind} injected:\n{output}"
    assert result["files_verified"] >= 1, output
    # The table a person reads says the same.
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines() if line.strip()}
    for kind in FAULTS:
        assert int(rows[kind][0]) >= 1, run.stdout
    assert int(rows["violations"][-1]) == 0, run.stdout
    assert int(rows["files"][-1]) == result["files_verified"], run.stdout


def test_a_short_chaos_run_on_three_api_servers_and_postgresql(tmp_path: Path) -> None:
    """Three API servers on a throwaway PostgreSQL, killed among the other faults; some stay
    down longer than ``server_timeout`` (5 s in chaos runs), so the others reap them."""
    require_postgres()
    _, result, output = run_chaos(
        tmp_path,
        "--duration=25",
        "--seed=11",
        "--api-servers=3",
        "--registry=postgresql",
        "--bucket-kill-every=3:5",
        "--api-kill-every=2:3",
        "--api-downtime=0.2:7",
        "--socket-kill-every=1:2",
        "--client-kill-every=1:2",
        "--bucket-loss-every=off",
        "--bit-flip-every=2:4",
    )
    assert (result["api_servers"], result["registry"]) == (3, "postgresql")
    assert result["faults"].get("api_kill", 0) >= 2, output
    texts = {p.name: p.read_text() for p in sorted((tmp_path / "data" / "logs").glob("api-*.log"))}
    assert sorted(texts) == ["api-0.log", "api-1.log", "api-2.log"]
    # Every server took uploads; a server down longer than server_timeout was reaped by another.
    for name, text in texts.items():
        assert "committed:" in text, f"{name} committed no upload:\n{output}"
    assert any("silent for" in text for text in texts.values()), output
