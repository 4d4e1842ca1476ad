"""Heartbeat.problem: what the membership endpoint refuses as INVALID_ARGUMENT."""

from __future__ import annotations

import pytest

from karma8.core.records import Heartbeat, Usage

USAGE = Usage(used=1, free=2, capacity=3, fragments=4)


def test_a_bucket_heartbeat_is_well_formed() -> None:
    assert Heartbeat("0123456789abcdef", "127.0.0.1:9100", USAGE, hello=True).problem() is None
    assert Heartbeat("b-1.x_y", "[::1]:65535", USAGE, hello=False).problem() is None


@pytest.mark.parametrize(
    ("bucket_id", "address", "usage", "why"),
    [
        ("", "h:1", USAGE, "bad bucket id"),
        ("a/b", "h:1", USAGE, "bad bucket id"),
        ("x" * 65, "h:1", USAGE, "bad bucket id"),
        ("b", "h", USAGE, "bad address"),
        ("b", ":1", USAGE, "bad address"),
        ("b", "h:0", USAGE, "bad address"),
        ("b", "h:65536", USAGE, "bad address"),
        ("b", "h:x", USAGE, "bad address"),
        ("b", "h" * 300 + ":1", USAGE, "bad address"),
        ("b", "h:1", Usage(used=-1, free=0, capacity=0, fragments=0), "negative usage"),
    ],
)
def test_malformed_heartbeats_are_refused(bucket_id: str, address: str, usage: Usage, why: str) -> None:
    problem = Heartbeat(bucket_id, address, usage, hello=False).problem()
    assert problem is not None
    assert problem.startswith(why)
