"""Measure repair: how fast the fragments of a lost bucket are rebuilt elsewhere.

Starts ``python -m karma8 up --buckets 9`` in a temporary directory (6+2 files on 8 of
the 9 buckets, so a lost bucket's fragments have somewhere to go), with fast membership,
``repair_after`` 2 s and unlimited repair bandwidth. Uploads ``--files`` files of
``--size``, then loses ``bucket-1`` for good: SIGKILL and its data directory wiped
(``karma8 up`` restarts it empty, as a new bucket, like a replaced disk). It times the
repair from the moment it starts reading until the queue is empty, and compares with a
baseline measured in the same run: copying the lost bucket's fragment files on the same
disk (``cp -r`` and ``sync``).

Prints the bytes rebuilt, the seconds, MB/s of fragments rebuilt and of file bytes read,
and the ratio to the disk copy. Exit status 1 if a file does not come back whole.

Usage::

    python scripts/bench_repair.py --files 16 --size 64M
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from karma8.bucket.volumes import scan
from karma8.client import Client
from karma8.config import ClientConfig, parse_size

MB = 1e6
POLL = 0.1
SETTINGS = {
    "KARMA8_API_HEARTBEAT_INTERVAL": "0.2",
    "KARMA8_API_BUCKET_TIMEOUT": "1.0",
    "KARMA8_API_REPAIR_AFTER": "2.0",
    "KARMA8_API_REPAIR_INTERVAL": "0.2",
    "KARMA8_API_REPAIR_BANDWIDTH": "0",
    "KARMA8_API_REBALANCE_AUTO": "false",
}


def note(message: str) -> None:
    print(f"bench_repair: {message}", file=sys.stderr, flush=True)


def bucket_pid(data: Path) -> int:
    """The process of the bucket whose data directory is ``data``."""
    needle = f"--data-dir\0{data}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise SystemExit(f"no bucket process serves {data}")


def fragment_bytes(data: Path) -> int:
    """Bytes of a bucket's fragments: its fragment files, and the data of its live needles."""
    files = sum(p.stat().st_size for p in (data / "fragments").rglob("*") if p.is_file())
    volumes = data / "volumes"
    return files + (sum(n.size for n in scan(volumes).values()) if volumes.exists() else 0)


def disk_copy_seconds(src: Path, scratch: Path) -> float:
    """The baseline: copy a bucket's fragment files and volumes on the same disk, synced."""
    dst = scratch / "copy"
    dst.mkdir()
    held = [str(d) for d in (src / "fragments", src / "volumes") if d.exists()]
    started = time.perf_counter()
    subprocess.run(["cp", "-r", *held, str(dst)], check=True)
    os.sync()
    took = time.perf_counter() - started
    shutil.rmtree(dst)
    return took


async def run(files: int, size: int, root: Path) -> int:
    data = root / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARMA8_")} | SETTINGS
    cmd = [sys.executable, "-m", "karma8", "up", "--buckets", "9", "--data", str(data), "--port", "0"]
    log = (root / "up.log").open("wb")
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    assert proc.stdout is not None
    try:
        seen = b""
        with trio.fail_after(90):
            while (match := re.search(rb"karma8 is up: (ws://\S+) ", seen)) is None:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    raise SystemExit(f"karma8 up exited: {(root / 'up.log').read_text()[-2000:]}")
                seen += chunk
        client = Client(ClientConfig(api=match.group(1).decode()))
        src = root / "src"
        with src.open("wb") as f:
            f.write(os.urandom(size))
        names = [f"repair/{i}" for i in range(files)]
        digest = ""
        for name in names:
            digest = (await client.upload(src, name)).sha256
        victim = data / "bucket-1"
        lost = fragment_bytes(victim)
        baseline = await trio.to_thread.run_sync(disk_copy_seconds, victim, root)
        note(f"{files} x {size} bytes uploaded; bucket-1 holds {lost} bytes of fragments; losing it")

        os.kill(bucket_pid(victim), signal.SIGKILL)
        shutil.rmtree(victim)
        started = finished = None
        before = (await client.status())["repair"]
        with trio.fail_after(3600):
            while finished is None:
                rep = (await client.status())["repair"]
                now = time.perf_counter()
                if started is None and (rep["running"] or rep["read_bytes"] > before["read_bytes"]):
                    started = now
                if started is not None and not rep["files"] and not rep["running"]:
                    finished = now
                await trio.sleep(POLL)
        assert started is not None
        took = max(finished - started, 1e-9)
        read = rep["read_bytes"] - before["read_bytes"]
        rebuilt = rep["repaired_fragments"] - before["repaired_fragments"]
        bad = 0
        for name in names:
            stat = await client.stat(name)
            if stat["health"] != "healthy":
                bad += 1
        back = root / "back"
        info = await client.download(names[-1], back)
        bad += info.sha256 != digest
        print(f"repair of a lost bucket: {rebuilt} fragment(s), {lost / MB:.1f} MB, in {took:.2f} s")
        print(f"  fragments rebuilt  {lost / MB / took:8.1f} MB/s")
        print(f"  file bytes read    {read / MB / took:8.1f} MB/s")
        print(f"  disk copy baseline {lost / MB / baseline:8.1f} MB/s (same bytes, same disk, this run)")
        print(f"  repair / disk copy {baseline / took:8.2f}")
        print(f"  files not healthy after repair: {bad}")
        return 1 if bad else 0
    finally:
        with trio.CancelScope(shield=True):
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=16, help="files to store [16]")
    p.add_argument("--size", default="64M", help="size of each file [64M]")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args()
    size = parse_size(a.size)
    assert isinstance(size, int)
    root = Path(tempfile.mkdtemp(prefix="karma8-bench-repair-"))
    try:
        return trio.run(run, a.files, size, root)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
