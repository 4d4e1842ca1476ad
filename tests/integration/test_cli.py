"""The ``karma8`` command line as a user runs it: real subprocesses against a real stack.

The API server of the ``cluster`` fixture runs in this process, so every CLI call runs
with ``trio.run_process`` (never blocking the event loop that serves it).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from karma8.config import GiB, MiB, StackConfig
from tests.integration.harness import (
    Cluster,
    free_port,
    karma8_cmd,
    make_file,
    open_cluster,
    sha256_of,
    upload_rows,
    wait_until,
)
from tests.integration.up_harness import (
    cli_env,
    karma8_up,
    processes_mentioning,
    signal_when,
    stop_with_ctrl_c,
)

#: Limit for one CLI command (they take well under a second each).
CLI_DEADLINE = 60.0

NAME = "docs/résumé ü.bin"


@dataclass(frozen=True)
class Run:
    """A finished CLI command."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def ok(self) -> Run:
        assert self.code == 0, f"karma8 {' '.join(self.args)} exited {self.code}: {self.err}"
        assert "Traceback" not in self.err, self.err
        return self

    def error(self, *expected: str) -> Run:
        """Assert a failure reported as one line on stderr that mentions ``expected``."""
        assert self.code != 0, f"karma8 {' '.join(self.args)} succeeded: {self.out}"
        assert "Traceback" not in self.err, self.err
        assert len(self.err.strip().splitlines()) == 1, self.err
        assert self.err.startswith("karma8: error: "), self.err
        for text in expected:
            assert text in self.err, self.err
        assert self.out == ""
        return self


async def karma8(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``karma8 ARGS`` to completion."""
    with trio.fail_after(CLI_DEADLINE):
        proc = await trio.run_process(
            karma8_cmd(*args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env() if env is None else env,
            cwd=cwd,
        )
    return Run(args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def size_of(path: Path) -> int:
    """The size of ``path``; 0 once it is gone (bucket files come and go)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- the commands ----------------------------------------------------------------------


async def test_upload_download_round_trip(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = make_file(src, 3 * MiB + 5, seed=1)

    up = (await karma8("upload", str(src), "--name", NAME, "--api", cluster.url, cwd=tmp_path)).ok()
    assert up.out == f"{NAME}  {3 * MiB + 5} bytes  sha256 {digest}\n"
    assert up.err == "", "stderr is not a terminal: no progress bar, no output"

    env = cli_env(KARMA8_API=cluster.url)  # the API from the environment this time
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    down = (await karma8("download", NAME, "--out", str(outdir), cwd=tmp_path, env=env)).ok()
    assert down.err == ""
    assert digest in down.out
    assert sha256_of(outdir / "résumé ü.bin") == digest
    assert sorted(p.name for p in outdir.iterdir()) == ["résumé ü.bin"], "temporary file left"

    dst = tmp_path / "copy.bin"
    (await karma8("download", NAME, "-o", str(dst), "--api", cluster.url, cwd=tmp_path)).ok()
    assert sha256_of(dst) == digest

    workdir = tmp_path / "work"
    workdir.mkdir()
    (await karma8("download", NAME, cwd=workdir, env=env)).ok()
    assert sorted(p.name for p in workdir.iterdir()) == ["résumé ü.bin"]
    assert sha256_of(workdir / "résumé ü.bin") == digest


async def test_ls_stat_status(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    digest = make_file(src, 100_000, seed=2)
    env = cli_env(KARMA8_API=cluster.url)
    for name in (NAME, "other/x"):
        (await karma8("upload", str(src), "--name", name, cwd=tmp_path, env=env)).ok()

    (await karma8("upload", str(src), "--name", "top", cwd=tmp_path, env=env)).ok()
    # One level, as aws s3 ls: the directories as PRE lines, then the files at the top.
    listed = (await karma8("ls", cwd=tmp_path, env=env)).ok().out.splitlines()
    assert [line.split() for line in listed] == [
        ["PRE", "docs/"],
        ["PRE", "other/"],
        ["100000", digest[:12], "top"],
    ]
    recursive = (await karma8("ls", "-r", cwd=tmp_path, env=env)).ok().out.splitlines()
    assert [line.split("  ")[-1] for line in recursive] == [NAME, "other/x", "top"]
    assert all(line.split()[0] == "100000" for line in recursive)
    prefixed = (await karma8("ls", "docs/", cwd=tmp_path, env=env)).ok().out.splitlines()
    assert [line.split("  ")[-1] for line in prefixed] == [NAME]
    assert (await karma8("ls", "nothing/", cwd=tmp_path, env=env)).ok().out == ""

    lines = (await karma8("ls", "--json", cwd=tmp_path, env=env)).ok().out.splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries[:2] == [{"prefix": "docs/"}, {"prefix": "other/"}]
    assert (entries[2]["name"], entries[2]["size"], entries[2]["sha256"]) == ("top", 100_000, digest)
    lines = (await karma8("ls", "-r", "--json", cwd=tmp_path, env=env)).ok().out.splitlines()
    assert [(f["name"], f["size"], f["sha256"]) for f in map(json.loads, lines)] == [
        (NAME, 100_000, digest),
        ("other/x", 100_000, digest),
        ("top", 100_000, digest),
    ]

    stat: dict[str, Any] = json.loads((await karma8("stat", NAME, "--json", cwd=tmp_path, env=env)).ok().out)
    assert (stat["name"], stat["size"], stat["sha256"]) == (NAME, 100_000, digest)
    placed = [p for p in stat["parts"] if p["bucket"]]  # 6 buckets: the 2 parity parts are owed
    assert len(placed) == 6
    assert len({p["bucket"] for p in placed}) == 6, "two parts on one bucket"
    assert {p["bucket"] for p in placed} == {b.bucket_id for b in cluster.buckets}
    assert sum(p["size"] for p in placed) == 100_000
    assert [p["state"] for p in stat["parts"][6:]] == ["owed", "owed"]

    status = (await karma8("status", cwd=tmp_path, env=env)).ok().out
    assert "6 live" in status
    for b in cluster.buckets:
        assert b.bucket_id in status
    assert status.splitlines()[1].split()[-2:] == ["fill", "frags"]
    lines = status.splitlines()
    spread = next(i for i, line in enumerate(lines) if line.startswith("spread: "))
    assert lines[spread + 1].startswith("rebalancer: idle")
    # Then the protection of files (6 buckets: no parity for new files, loudly).
    assert lines[spread + 2].startswith("protection: new files get 6+0 (configured 6+2")
    assert lines[spread + 3].startswith("WARNING: only 6 live bucket(s)")
    st = json.loads((await karma8("status", "--json", cwd=tmp_path, env=env)).ok().out)
    assert st["live"] == 6
    assert {b["id"] for b in st["buckets"]} == {b.bucket_id for b in cluster.buckets}
    assert all(b["live"] for b in st["buckets"])


async def test_rm(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_file(src, 5000, seed=3)
    env = cli_env(KARMA8_API=cluster.url)
    for name in (NAME, "keep"):
        (await karma8("upload", str(src), "--name", name, cwd=tmp_path, env=env)).ok()

    assert (await karma8("rm", NAME, cwd=tmp_path, env=env)).ok().out == f"deleted {NAME}\n"
    listed = (await karma8("ls", cwd=tmp_path, env=env)).ok().out
    assert NAME not in listed
    assert "keep" in listed
    (await karma8("download", NAME, "-o", str(tmp_path / "gone"), cwd=tmp_path, env=env)).error("not_found")
    assert not list(tmp_path.glob("*gone*")), "a failed download left a file"
    (await karma8("stat", NAME, cwd=tmp_path, env=env)).error("not_found")
    (await karma8("rm", NAME, cwd=tmp_path, env=env)).error("not_found")


# -- errors ------------------------------------------------------------------------------


async def test_download_of_a_missing_name(cluster: Cluster, tmp_path: Path) -> None:
    workdir = tmp_path / "work"  # tmp_path also holds the cluster's data
    workdir.mkdir()
    run = await karma8("download", "no/such file", "--api", cluster.url, cwd=workdir)
    run.error("not_found", "no/such file")
    assert list(workdir.iterdir()) == [], "a failed download left a file"


def _closed_api() -> str:
    return f"ws://127.0.0.1:{free_port()}"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


#: Each case: (arguments, extra environment, texts stderr must contain), given a directory.
ERROR_CASES: dict[str, Callable[[Path], tuple[list[str], dict[str, str], list[str]]]] = {
    "ls-closed-port": lambda d: (["ls", "--api", _closed_api()], {}, ["connection_failed"]),
    "upload-closed-port": lambda d: (
        ["upload", _write(d / "f", "x"), "--api", _closed_api()],
        {},
        ["connection_failed"],
    ),
    "rebalance-closed-port": lambda d: (["rebalance", "--api", _closed_api()], {}, ["connection_failed"]),
    "rebalance-dry-run-closed-port": lambda d: (
        ["rebalance", "--dry-run", "--api", _closed_api()],
        {},
        ["connection_failed"],
    ),
    "status-closed-port-from-env": lambda d: (
        ["status"],
        {"KARMA8_API": _closed_api()},
        ["connection_failed"],
    ),
    # A bad name is refused before any connection is tried.
    "download-bad-name": lambda d: (["download", "a/../b", "--api", _closed_api()], {}, ["bad_name"]),
    "upload-bad-name": lambda d: (
        ["upload", _write(d / "f", "x"), "--name", "a/../b", "--api", _closed_api()],
        {},
        ["bad_name"],
    ),
    "stat-bad-name": lambda d: (["stat", "a//b", "--api", _closed_api()], {}, ["bad_name"]),
    "config-unknown-key": lambda d: (
        ["ls", "--config", _write(d / "c.toml", '[client]\napi = "ws://x"\nbogus = 1\n')],
        {},
        ["bogus"],
    ),
    "config-unknown-table": lambda d: (
        ["ls", "--config", _write(d / "c.toml", "[nonsense]\na = 1\n")],
        {},
        ["nonsense"],
    ),
    "config-not-toml": lambda d: (["status", "--config", _write(d / "c.toml", "[client\n")], {}, ["TOML"]),
    "config-bad-value": lambda d: (
        ["ls", "--config", _write(d / "c.toml", "[client]\nframe_size = 'lots'\n")],
        {},
        ["frame_size"],
    ),
    "env-unknown-variable": lambda d: (["ls"], {"KARMA8_CLIENT_BOGUS": "1"}, ["KARMA8_CLIENT_BOGUS"]),
    "up-bad-config": lambda d: (
        ["up", "--data", str(d / "data"), "--config", _write(d / "c.toml", "[stack]\nbuckets = 0\n")],
        {},
        ["buckets"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
async def test_errors_are_one_line(tmp_path: Path, case: str) -> None:
    args, env, expected = ERROR_CASES[case](tmp_path)
    run = await karma8(*args, cwd=tmp_path, env=cli_env(**env))
    run.error(*expected)


async def test_connection_failed_says_why(tmp_path: Path) -> None:
    api = _closed_api()
    run = (await karma8("ls", "--api", api, cwd=tmp_path)).error("connection_failed", api)
    reason = run.err.split(api, 1)[1].strip().lstrip(":").strip()
    assert reason, f"the error does not say why the connection failed: {run.err!r}"


# -- interrupted uploads -----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
async def test_interrupted_upload_leaves_nothing(cluster: Cluster, tmp_path: Path, sig: int) -> None:
    src = tmp_path / "big"
    with src.open("wb") as f:
        f.truncate(4 * GiB)  # sparse: instant, yet a long upload (1 GiB once ended first in a full run)
    name = "big/interrupted"
    out_log, err_log = tmp_path / "upload.out", tmp_path / "upload.err"
    with out_log.open("wb") as out, err_log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            karma8_cmd("upload", str(src), "--name", name, "--api", cluster.url),
            stdout=out,
            stderr=err,
            env=cli_env(),
            cwd=tmp_path,
        )

    masks: list[str] = []

    def data_on_a_bucket() -> bool:
        assert proc.poll() is None, f"upload exited early ({proc.returncode}): {err_log.read_text()}"
        if any(size_of(p) > 0 for b in cluster.buckets for p in b.tmp_files()):
            # The child's signal masks as the signal goes (blocked or ignored SIGINT?).
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            masks.extend(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
            return True
        return False

    await signal_when(proc, data_on_a_bucket, "upload data to reach a bucket", sig)

    assert out_log.read_text() == "", (
        f"the upload reported success (exit {proc.returncode}, stderr {err_log.read_text()!r}, {masks})"
    )
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert err_log.read_text() == "karma8: interrupted\n"
    else:
        assert proc.returncode == -signal.SIGKILL

    db = cluster.registry()
    try:

        def cleaned() -> bool:
            rows = upload_rows(db, name)
            return (
                len(rows) == 1
                and rows[0][1] == "failed"
                and db.fragments(rows[0][0]) == []
                and cluster.all_files() == []
            )

        await wait_until(cleaned, "the interrupted upload's fragments and rows to go")
        assert db.lookup(name) is None
        assert db.list_files() == []
        assert db.pending_deletions() == []
    finally:
        db.close()
    (await karma8("download", name, "--api", cluster.url, cwd=tmp_path)).error("not_found")


# -- karma8 up ---------------------------------------------------------------------------


def bucket_ids(data: Path) -> list[str]:
    return [(data / f"bucket-{i}" / "bucket-id").read_text().strip() for i in range(1, 7)]


async def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    src = tmp_path / "src"
    digest = make_file(src, 2 * MiB + 7, seed=4)
    async with karma8_up(data, tmp_path / "up.err") as stack:
        env = cli_env(KARMA8_API=stack.url)
        (await karma8("upload", str(src), "--name", NAME, cwd=tmp_path, env=env)).ok()
        (await karma8("download", NAME, "-o", str(tmp_path / "back"), cwd=tmp_path, env=env)).ok()
        assert sha256_of(tmp_path / "back") == digest
        st = json.loads((await karma8("status", "--json", cwd=tmp_path, env=env)).ok().out)
        assert st["live"] == 6
        stat = json.loads((await karma8("stat", NAME, "--json", cwd=tmp_path, env=env)).ok().out)
        assert len({p["bucket"] for p in stat["parts"] if p["bucket"]}) == 6
        # The scan stop_with_ctrl_c relies on sees the stack: karma8 up, the API, 6 buckets.
        running = processes_mentioning(str(data))
        workers = StackConfig().workers  # API workers, one per core, beside their supervisor
        assert len(running) == 8 + (workers if workers > 1 else 0), running
        assert stack.proc.pid in {pid for pid, _ in running}
        await stop_with_ctrl_c(stack)

    assert (data / "api" / "registry.sqlite3").is_file()
    ids = bucket_ids(data)
    assert len(set(ids)) == 6
    assert {b["id"] for b in st["buckets"]} == set(ids)


async def test_up_again_keeps_identities_and_files(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    src = tmp_path / "src"
    digest = make_file(src, MiB + 1, seed=5)
    log = tmp_path / "up.err"
    async with karma8_up(data, log) as stack:
        (await karma8("upload", str(src), "--name", NAME, "--api", stack.url, cwd=tmp_path)).ok()
        await stop_with_ctrl_c(stack)
    ids = bucket_ids(data)

    log.write_text("")
    async with karma8_up(data, log) as stack:
        env = cli_env(KARMA8_API=stack.url)
        assert bucket_ids(data) == ids
        st = json.loads((await karma8("status", "--json", cwd=tmp_path, env=env)).ok().out)
        assert st["live"] == 6
        assert sorted(b["id"] for b in st["buckets"]) == sorted(ids), "buckets got new identities"
        stat = json.loads((await karma8("stat", NAME, "--json", cwd=tmp_path, env=env)).ok().out)
        assert {p["bucket"] for p in stat["parts"] if p["bucket"]} == set(ids)
        (await karma8("download", NAME, "-o", str(tmp_path / "back"), cwd=tmp_path, env=env)).ok()
        assert sha256_of(tmp_path / "back") == digest
        await stop_with_ctrl_c(stack)
    assert bucket_ids(data) == ids


async def test_up_on_an_existing_postgresql_registry(tmp_path: Path, postgres_url: str) -> None:
    """`karma8 up --registry postgresql://…`: the stack keeps its registry in that database
    (no SQLite file), and a second `karma8 up` on the same database serves the file."""
    data = tmp_path / "stack"
    src = tmp_path / "src"
    digest = make_file(src, MiB + 3, seed=6)
    log = tmp_path / "up.err"
    args = ("--registry", postgres_url, "--workers", "2")
    async with karma8_up(data, log, *args) as stack:
        (await karma8("upload", str(src), "--name", NAME, "--api", stack.url, cwd=tmp_path)).ok()
        await stop_with_ctrl_c(stack)
    assert not (data / "api" / "registry.sqlite3").exists()
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT name, sha256 FROM files").fetchall()
        parts = conn.execute("SELECT COUNT(DISTINCT bucket_id) FROM fragments").fetchone()
    assert rows == [(NAME, digest)]
    assert parts == (6,)
    async with karma8_up(data, log, *args) as stack:
        back = tmp_path / "back"
        (await karma8("download", NAME, "-o", str(back), "--api", stack.url, cwd=tmp_path)).ok()
        assert sha256_of(back) == digest
        await stop_with_ctrl_c(stack)


async def test_up_passes_its_config_file_to_the_api_and_buckets(tmp_path: Path) -> None:
    """`karma8 up --config` hands the file to its children: their [api] table applies."""
    data = tmp_path / "stack"
    config = tmp_path / "karma8.toml"
    config.write_text('[api]\nmax_file_size = "1KiB"\n\n[bucket]\ncapacity = "1GiB"\n')
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    async with karma8_up(data, tmp_path / "up.log", "--config", str(config)) as stack:
        (await karma8("upload", str(big), "--api", stack.url, cwd=tmp_path)).error("too_large", "1024")
        status = json.loads((await karma8("status", "--json", "--api", stack.url, cwd=tmp_path)).ok().out)
        assert {b["capacity"] for b in status["buckets"]} == {GiB}
        await stop_with_ctrl_c(stack)


async def test_stat_status_and_repair_show_protection(tmp_path: Path) -> None:
    """6 buckets: files owe their parity; `repair` raises them once 2 buckets joined."""
    async with open_cluster(tmp_path, buckets=6, repair_interval=30.0) as cluster:
        env = cli_env(KARMA8_API=cluster.url)
        src = tmp_path / "src"
        make_file(src, MiB, seed=1)
        (await karma8("upload", str(src), "--name", NAME, cwd=tmp_path, env=env)).ok()

        table = (await karma8("stat", NAME, cwd=tmp_path, env=env)).ok().out
        assert "scheme    6+2 (isa_l_rs_cauchy)" in table
        assert "health    at risk: survives 0 more lost bucket(s)" in table
        lines = [line.split() for line in table.splitlines()]
        assert ["6", "parity", "owed", "-", "-", "0", "B"] in lines
        status = (await karma8("status", cwd=tmp_path, env=env)).ok().out
        assert "WARNING: only 6 live bucket(s): new files get 0 of 2 parity fragments" in status
        assert "files: 1 (" in status
        assert "1 file(s)" in status

        await cluster.add_bucket()
        await cluster.add_bucket()
        await cluster.wait_live(8)
        done = (await karma8("repair", cwd=tmp_path, env=env)).ok().out
        assert "repair queue empty; 2 fragment(s) rebuilt" in done, done
        table = (await karma8("stat", NAME, cwd=tmp_path, env=env)).ok().out
        assert "health    healthy: survives 2 more lost bucket(s)" in table
        status = (await karma8("status", cwd=tmp_path, env=env)).ok().out
        assert "WARNING" not in status
        assert "1 survive 2 more loss(es)" in status
