"""scripts/bench.py, briefly: a big file and a few small files round-trip, and the report says so.

The --vs-swift run needs the Swift peer installed (../shared/peers/swift/swiftpeer.sh install);
it is skipped otherwise. Every run is small: they check the plumbing, not the speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench.py"
SWIFTPEER = ROOT.parent / "shared" / "peers" / "swift" / "swiftpeer.sh"


def _swift_base() -> Path:
    """Where swiftpeer.sh keeps its venv and rings (the same rule as the script's)."""
    if base := os.environ.get("SWIFTPEER_BASE"):
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swiftpeer"


def _swift_missing() -> str | None:
    if not SWIFTPEER.is_file():
        return f"the Swift peer script is not at {SWIFTPEER}"
    if not (_swift_base() / "venv" / "bin" / "python").exists():
        return f"Swift is not installed ({SWIFTPEER} install)"
    if not (_swift_base() / "etc" / "object.ring.gz").exists():
        return f"the Swift peer has no rings ({SWIFTPEER} configure)"
    return None


def _bench(tmp_path: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), *args, f"--json={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result, run.stdout


def _check_small(small: dict[str, Any], files: int, concurrency: int) -> None:
    assert small["files"] == files
    assert small["size"] == 64 * 1024
    assert small["concurrency"] == concurrency
    for op in ("upload", "download"):
        assert len(small[op]) == 1
        assert small[op][0]["count"] == files
        assert small[f"{op}_files_per_s"][0] > 0
        # Every single transfer timed: the percentiles come from them.
        latencies = small[op][0]["latencies"]
        assert len(latencies) == files
        assert all(seconds > 0 for seconds in latencies)
        p50, p99 = small[f"{op}_latency_p50_ms"][0], small[f"{op}_latency_p99_ms"][0]
        assert min(latencies) * 1000 <= p50 <= p99 <= max(latencies) * 1000


def test_big_and_small_files_round_trip(tmp_path: Path) -> None:
    result, stdout = _bench(
        tmp_path,
        "--size=4M",
        "--small-files=6",
        "--concurrency=1,3",
        f"--data={tmp_path / 'data'}",
        timeout=120,
    )
    [run] = result["runs"]
    assert run["size"] == 4 * 1024 * 1024
    assert len(run["upload_mb_per_s"]) == len(run["download_mb_per_s"]) == 1
    assert result["options"]["concurrencies"] == [1, 3]
    [one, small] = result["small"]
    _check_small(one, 6, 1)
    _check_small(small, 6, 3)
    # CPU and memory were measured for every process of the stack.
    transfer = small["upload"][0]
    assert transfer["cpu"]["api"] is not None
    assert transfer["cpu"]["buckets"] is not None
    assert transfer["peak_rss"]["buckets"] > 0
    assert "swift" not in result
    for level in (1, 3):
        assert re.search(rf"^6 x 64 KiB c={level} +upload .* files/s ", stdout, re.MULTILINE), stdout
        assert re.search(rf"^6 x 64 KiB c={level} +download .* files/s ", stdout, re.MULTILINE), stdout
        assert re.search(rf"^6 x 64 KiB c={level} +upload p50 .* ms ", stdout, re.MULTILINE), stdout
        assert re.search(rf"^6 x 64 KiB c={level} +download p99 .* ms ", stdout, re.MULTILINE), stdout
    assert " vs Swift" not in stdout
    # The default policy: 8 buckets, 6+2; the file downloaded again with 2 of its data buckets killed.
    assert result["options"]["policy"] == {"name": "ec62", "parts": 6, "parity": 2}
    assert result["karma8"] == {"scheme": "6+2", "down": "2 buckets", "no_degraded": ""}
    assert len(result["pids"]["buckets"]) == 8
    assert len(run["degraded_mb_per_s"]) == 1
    assert run["degraded_mb_per_s"][0] > 0
    assert run["degraded_ratio"] == pytest.approx(run["degraded_mb_per_s"][0] / run["download_mb_per_s"][0])
    assert run["degraded"][0]["cpu"]["buckets"] is not None  # measured over the 6 left running
    assert re.search(r"^4 MiB +degraded .* MB/s ", stdout, re.MULTILINE), stdout
    assert re.search(r"karma8 6\+2 +4 MiB .* download \(2 buckets down\) .* x healthy", stdout), stdout


def test_rep1_runs_six_buckets_without_parity(tmp_path: Path) -> None:
    result, stdout = _bench(
        tmp_path, "--policy=rep1", "--size=4M", "--small-files=0", f"--data={tmp_path / 'data'}", timeout=90
    )
    assert result["karma8"]["scheme"] == "6+0"
    assert len(result["pids"]["buckets"]) == 6
    [run] = result["runs"]
    assert run["degraded"] == []
    assert run["degraded_ratio"] is None
    assert "karma8 benchmark: karma8 6+0" in stdout
    assert re.search(r"karma8 6\+0 +not measured: 6\+0 has no parity", stdout), stdout


@pytest.mark.skipif(_swift_missing() is not None, reason=_swift_missing() or "")
def test_vs_swift_prints_the_ratios(tmp_path: Path) -> None:
    result, stdout = _bench(tmp_path, "--vs-swift", "--size=8M", "--small-files=8", timeout=420)
    swift = result["swift"]
    assert swift["name"] == "Swift"
    assert swift["scheme"] == "ec62"
    assert swift["pids"]["proxy"]
    assert len(swift["pids"]["objects"]) >= 8
    [run] = swift["runs"]
    assert run["upload_mb_per_s"][0] > 0
    assert run["download_mb_per_s"][0] > 0
    assert all(cpu is not None for cpu in run["upload"][0]["cpu"].values())
    started = "started here" in result["swift_peer"]
    # Degraded downloads on both sides; Swift's only when this run started the peer (its servers are killed).
    assert len(result["runs"][0]["degraded_mb_per_s"]) == 1
    assert len(run["degraded_mb_per_s"]) == (1 if started else 0)
    # The default levels: one at a time, then 8 at a time, on both sides.
    for i, level in enumerate((1, 8)):
        _check_small(swift["small"][i], 8, level)
        _check_small(result["small"][i], 8, level)
    rows = {row["case"]: row for row in result["comparison"]}
    for level in (1, 8):
        for op in ("upload", "download"):
            for p in ("p50", "p99"):
                row = rows[f"64 KiB (c={level}) {op} {p}"]
                assert row["unit"] == "ms"
                assert row["ratio"] == pytest.approx(row["karma8"] / row["swift"])
                assert row["met"] is None  # no target: lower is better, the table says so
    for case in ("8 MiB upload", "8 MiB download", "64 KiB (c=8) uploads", "64 KiB (c=8) downloads"):
        assert rows[case]["ratio"] == pytest.approx(rows[case]["karma8"] / rows[case]["swift"])
        assert rows[case]["target"] == ">= 1.50 x"
        assert rows[f"{case} CPU"]["target"] == "<= 1.00 x"
    ours = result["runs"][0]
    assert rows["8 MiB degraded / healthy"]["karma8"] == pytest.approx(ours["degraded_ratio"])
    assert rows["8 MiB degraded / healthy"]["target"] == "karma8 >= 0.50 x"
    assert rows["8 MiB download (2 down)"]["karma8"] == pytest.approx(ours["degraded_mb_per_s"][0])
    assert "karma8 6+2 vs Swift ec62" in stdout
    assert re.search(r"^8 MiB upload +MB/s ", stdout, re.MULTILINE), stdout
    assert re.search(r"^64 KiB \(c=8\) downloads CPU +s/GiB ", stdout, re.MULTILINE), stdout
    assert re.search(r"^64 KiB \(c=1\) upload p99 +ms .* none; < 1 faster", stdout, re.MULTILINE), stdout
    assert "k8/Swift < 1 means karma8 answered faster" in stdout
