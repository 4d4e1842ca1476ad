"""``karma8 up`` and other CLI processes as a user runs them, shared by the CLI tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from karma8.stack import stop_process
from tests.integration.harness import free_port, karma8_cmd, wait_until

#: Limit for ``karma8 up`` to report the stack ready (7 processes start).
UP_DEADLINE = 60.0
#: Limit for an interrupted process to exit.
EXIT_DEADLINE = 20.0


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without KARMA8_* settings of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARMA8_")}
    env.update(extra)
    return env


@dataclass
class Stack:
    """A running ``karma8 up``."""

    proc: trio.Process
    url: str
    data: Path
    stderr: Path


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every running process whose command line contains ``text``."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline:
                found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


@contextlib.asynccontextmanager
async def karma8_up(data: Path, log: Path, *args: str, **env: str) -> AsyncIterator[Stack]:
    """Start ``karma8 up`` on free ports (plus ``args`` and ``env``); yield once it is up.

    On the way out a stack still running is stopped (SIGTERM, then SIGKILL), and so is
    any of its children left behind, so a failing test leaks no process.
    """
    environ = cli_env(**env)  # internal ports: free ones, picked by karma8 up itself
    cmd = karma8_cmd("up", "--data", str(data), "--port", str(free_port()), "--buckets", "6", *args)
    with log.open("ab") as err:
        proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=err, env=environ, cwd=data.parent
        )
    assert proc.stdout is not None
    try:
        seen = b""
        with trio.fail_after(UP_DEADLINE):
            while (match := re.search(rb"karma8 is up: (ws://\S+) ", seen)) is None:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"karma8 up exited ({proc.poll()}): {seen!r} {log.read_text()}"
                seen += chunk
        yield Stack(proc, match.group(1).decode(), data, log)
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(proc, signal.SIGTERM, EXIT_DEADLINE)
            for pid, _ in processes_mentioning(str(data)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await proc.stdout.aclose()


async def signal_when(proc: trio.Process, ready: Callable[[], bool], what: str, sig: int) -> None:
    """Send ``sig`` to ``proc`` once ``ready()``, then wait for it to exit.

    If the test fails first, the process is killed rather than left behind.
    """
    try:
        await wait_until(ready, what)
        proc.send_signal(sig)
        with trio.fail_after(EXIT_DEADLINE):
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def stop_with_ctrl_c(stack: Stack) -> None:
    """SIGINT ``karma8 up``: it exits 0 and leaves no process of the stack running."""
    stack.proc.send_signal(signal.SIGINT)
    with trio.fail_after(EXIT_DEADLINE):
        await stack.proc.wait()
    log = stack.stderr.read_text()
    assert stack.proc.returncode == 0, log
    assert "Traceback" not in log, log
    assert log.rstrip().endswith("karma8 stopped."), log
    assert processes_mentioning(str(stack.data)) == []
