"""Fragment states and file health as ``stat`` shows them."""

from __future__ import annotations

import pytest

from karma8.core.health import AT_RISK, DEGRADED, HEALTHY, LOST, file_health, fragment_state


@pytest.mark.parametrize(
    ("recorded", "live", "missing", "corrupt", "repairing", "shown"),
    [
        ("ok", True, False, False, False, "ok"),
        ("ok", False, False, False, False, "down"),
        ("ok", True, True, False, False, "missing"),
        ("ok", True, False, True, False, "corrupt"),
        ("owed", True, False, False, False, "owed"),
        ("owed", True, False, False, True, "repairing"),
        ("ok", False, True, True, True, "repairing"),
    ],
)
def test_fragment_state(
    recorded: str, live: bool, missing: bool, corrupt: bool, repairing: bool, shown: str
) -> None:
    assert fragment_state(recorded, live=live, missing=missing, corrupt=corrupt, repairing=repairing) == shown


def test_file_health() -> None:
    assert file_health(["ok"] * 8, 6, 8) == (HEALTHY, 2)
    assert file_health(["ok"] * 7 + ["down"], 6, 8) == (DEGRADED, 1)
    assert file_health(["ok"] * 6 + ["owed", "corrupt"], 6, 8) == (AT_RISK, 0)
    assert file_health(["ok"] * 5 + ["down"] * 3, 6, 8) == (LOST, -1)
    assert file_health(["ok"] * 6, 6, 6) == (HEALTHY, 0)  # no parity: healthy, but tolerates nothing
    assert file_health(["ok"] * 6, 6, 8) == (AT_RISK, 0)  # written on 6 buckets
