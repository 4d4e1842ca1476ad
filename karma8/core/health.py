"""What ``stat`` says about a file's fragments and the file as a whole.

A fragment is ``ok``, or: ``owed`` (never written: its upload met the write quorum
without it, or too few buckets were live), ``missing`` (its bucket lacks it, per
reconciliation or scrub), ``corrupt`` (it fails its checksums), ``down`` (its bucket is
not live now) or ``repairing`` (a repair is writing it). A file is:

- ``healthy``: every fragment of its scheme is ok;
- ``degraded``: some are not, but more than its data parts are: it survives
  ``tolerates`` more losses;
- ``at risk``: exactly its data parts are ok: one more loss and it cannot be read;
- ``lost``: fewer than its data parts are ok: it cannot be read now (it comes back if
  enough ``down`` buckets do).
"""

from __future__ import annotations

from collections.abc import Iterable

HEALTHY = "healthy"
DEGRADED = "degraded"
AT_RISK = "at risk"
LOST = "lost"


def fragment_state(recorded: str, *, live: bool, missing: bool, corrupt: bool, repairing: bool) -> str:
    """The state ``stat`` shows for one fragment (``recorded``: its registry state)."""
    if repairing:
        return "repairing"
    if recorded != "ok":
        return recorded
    if corrupt:
        return "corrupt"
    if missing:
        return "missing"
    return "ok" if live else "down"


def file_health(states: Iterable[str], data: int, width: int) -> tuple[str, int]:
    """(health, more losses the file survives now; negative when lost)."""
    good = sum(s == "ok" for s in states)
    tolerates = good - data
    if good >= width:
        return HEALTHY, tolerates
    if tolerates > 0:
        return DEGRADED, tolerates
    return (AT_RISK if tolerates == 0 else LOST), tolerates
