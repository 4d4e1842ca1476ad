"""Waiting for another thread's or process's state in synchronous tests: poll a condition
until it holds, failing after a deadline (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Longest a condition is waited for.
DEADLINE = 30.0
#: Pause between two looks.
INTERVAL = 0.001


def poll_until(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    """Return once ``condition()`` is true.

    Raises:
        AssertionError: it was not within ``deadline`` seconds (the message says ``what``).
    """
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(INTERVAL)
