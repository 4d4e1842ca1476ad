"""What ``karma8 status``, ``stat``, ``rebalance`` and ``repair`` print: sizes, fills,
plans, protection, progress.

Also :class:`Watch`, which follows a rebalance run through ``/status`` until it ends, and
:class:`RepairWatch`, which follows the repair queue until it is empty or stuck.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import trio
import typer

from karma8.client import Client
from karma8.core import balance

#: How often ``karma8 rebalance`` polls /status while it watches a run.
WATCH_POLL = 0.5
#: Seconds between progress lines when stderr is not a terminal.
WATCH_LINE_EVERY = 5.0
#: Seconds the rebalancer may stay idle, its last run unchanged, before the plan is checked
#: again (a run that finds nothing left to move records no run).
WATCH_IDLE_CHECK = 10.0


class Watch:
    """Polls /status until the rebalancer is idle with another last run than ``before``'s.

    Comparing runs, not clocks: the server's timestamps come from its own clock.
    """

    def __init__(self, client: Client, before: dict[str, Any]) -> None:
        self._client = client
        self._before_last = before["last"]
        self._line = ProgressLine()
        #: The final status, once the run has ended (None: interrupted).
        self.status: dict[str, Any] | None = None
        #: The run that ended (None: the rebalancer found nothing left to move).
        self.run_result: dict[str, Any] | None = None

    async def run(self) -> None:
        idle_since = trio.current_time()
        try:
            while True:
                st = await self._client.status()
                reb = st["rebalancer"]
                now = trio.current_time()
                if reb["state"] == "moving":
                    idle_since = now
                    self._line.show(f"rebalance: {moving_text(reb)}", now)
                elif reb["last"] is not None and reb["last"] != self._before_last:
                    self.status, self.run_result = st, reb["last"]
                    return
                else:
                    self._line.show("rebalance: waiting for the rebalancer", now)
                    if now - idle_since >= WATCH_IDLE_CHECK:
                        idle_since = now
                        if not (await self._client.rebalance(dry_run=True))["count"]:
                            self.status = await self._client.status()
                            return
                await trio.sleep(WATCH_POLL)
        finally:
            self._line.clear()


#: Seconds the repair queue may stay unchanged, nothing running, before ``repair`` gives up.
REPAIR_STUCK = 15.0


class RepairWatch:
    """Polls /status until the repair queue is empty, or stuck (nothing running, no change)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._line = ProgressLine()
        #: The last ``repair`` section of /status seen.
        self.status: dict[str, Any] = {}

    async def run(self) -> None:
        last: tuple[object, ...] = ()
        since = trio.current_time()
        try:
            while True:
                rep = (await self._client.status())["repair"]
                self.status = rep
                now = trio.current_time()
                if not rep["files"]:
                    return
                seen = (rep["files"], rep["repaired_fragments"], rep["read_bytes"], rep["running"])
                if seen != last or rep["running"]:
                    last, since = seen, now
                elif now - since >= REPAIR_STUCK:
                    return
                self._line.show(f"repair: {repair_line(rep)}", now)
                await trio.sleep(WATCH_POLL)
        finally:
            self._line.clear()


def repair_line(rep: dict[str, Any]) -> str:
    """The repair queue and progress, in one line."""
    if not rep.get("files"):
        done = f"; {rep['repaired_fragments']} fragment(s) rebuilt" if rep.get("repaired_fragments") else ""
        return f"repair queue empty{done}"
    at_risk = sum(n for s, n in rep["by_spare"].items() if int(s) <= 0)
    reasons = ", ".join(f"{r} {n}" for r, n in rep["by_reason"].items())
    eta = rep.get("eta")
    return (
        f"{rep['files']} file(s) ({human_size(rep['bytes'])}) to repair, {at_risk} with no fragment to spare"
        f" [{reasons}]; {rep['running']} running, {rep['repaired_fragments']} fragment(s) rebuilt,"
        f" {human_size(rep['read_bytes'])} read at {human_size(rep['rate'])}/s"
        + (f", about {eta:.0f} s left" if eta is not None else "")
    )


def protection_lines(st: dict[str, Any]) -> list[str]:
    """What ``status`` says about the protection of files: scheme, losses tolerated, repair."""
    prot, rep = st.get("protection"), st.get("repair")
    if prot is None or rep is None:  # an API server from before erasure coding
        return []
    lines = [
        f"protection: new files get {prot['new_files']} (configured {prot['configured']},"
        f" acknowledged with {prot['write_quorum']} fragments)"
    ]
    if "warning" in prot:
        lines.append(f"WARNING: {prot['warning']}")
    queued = sum(rep["by_spare"].values())
    full = rep["stored_files"] - queued
    parity = int(str(prot["configured"]).split("+")[1])
    by_loss = {str(parity): full} if full else {}
    for spare, n in rep["by_spare"].items():
        by_loss[spare] = by_loss.get(spare, 0) + n
    tolerated = ", ".join(
        f"{n} survive {s} more loss(es)" if int(s) >= 0 else f"{n} UNREADABLE now"
        for s, n in sorted(by_loss.items(), key=lambda kv: -int(kv[0]))
    )
    lines.append(f"files: {rep['stored_files']} ({human_size(rep['stored_bytes'])}): {tolerated or 'none'}")
    lines.append(f"repair: {repair_line(rep)}")
    for d in rep.get("down", []):
        lost = "declared lost" if not d["lost_in"] else f"declared lost in {d['lost_in']:.0f} s"
        lines.append(f"DOWN: bucket {d['id']} not live for {d['down_for']:.0f} s; {lost}")
    return lines


def print_stat(st: dict[str, Any]) -> None:
    """``karma8 stat``: the file, then one line per fragment."""
    typer.echo(f"name      {st['name']}")
    typer.echo(f"size      {human_size(st['size'])} ({st['size']} bytes)")
    typer.echo(f"sha256    {st['sha256']}")
    typer.echo(f"created   {when(st.get('created'))}")
    typer.echo(
        f"scheme    {st.get('scheme', '?')}, unit {human_size(st['stripe_unit'])}, fragment format"
        f" {st.get('format', 1)}"
    )
    health = st.get("health", "?")
    tolerates = st.get("tolerates", 0)
    more = f"survives {tolerates} more lost bucket(s)" if tolerates >= 0 else "cannot be read now"
    typer.echo(f"health    {health}: {more}")
    typer.echo(f"{'part':<6}{'role':<8}{'state':<11}{'bucket':<18}{'address':<24}{'size':>11}")
    for p in st["parts"]:
        typer.echo(
            f"{p['part']:<6}{p.get('role', 'data'):<8}{p.get('state', 'ok'):<11}{p['bucket'] or '-':<18}"
            f"{p['address'] or '-':<24}{human_size(p['size']):>11}"
        )


class ProgressLine:
    """One line rewritten in place on a terminal (stderr); a line now and then otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._shown = False
        self._at = float("-inf")

    def show(self, text: str, now: float) -> None:
        if self._tty:
            sys.stderr.write(f"\r{text}\x1b[K")
            sys.stderr.flush()
            self._shown = True
        elif now - self._at >= WATCH_LINE_EVERY:
            typer.echo(text, err=True)
            self._at = now

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {UNITS[unit]}"


def percent(fill: float | None) -> str:
    if fill is None:
        return "-"
    return "<0.01%" if 0 < fill < 0.0001 else f"{100 * fill:.2f}%"


def spread_text(spread: float | None) -> str:
    """Fullest / emptiest fill; the server sends null for infinite (an empty bucket)."""
    return "infinite" if spread is None else f"{spread:.3f}"


def placed_spread(st: dict[str, Any]) -> float | None:
    """The spread by what the registry places on each live bucket (None: infinite).

    The ``spread`` of /status comes from the buckets' own figures, which lag a heartbeat
    and still count the copies a run left for deletion.
    """
    fills = [balance.Fill(b["id"], b["placed"], b["capacity"]) for b in st["buckets"] if b["live"]]
    value = balance.spread(fills)
    return None if math.isinf(value) else round(value, 4)


def when(timestamp: float | None) -> str:
    return "?" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def moving_text(p: dict[str, Any]) -> str:
    done = f"{p['moves']} move(s), {p['failed']} failed"
    return f"moving {human_size(p['moved'])} of {human_size(p['planned'])} ({done})"


def run_summary(run: dict[str, Any]) -> str:
    took = (run["finished"] or 0) - (run["started"] or run["finished"] or 0)
    return (
        f"moved {human_size(run['moved'])} in {run['moves']} move(s), {run['failed']} failed, in {took:.1f} s"
    )


def servers_line(st: dict[str, Any]) -> str | None:
    """Which API servers share the registry, and which one runs the background jobs."""
    servers = st.get("servers")
    alive = [s["id"] for s in servers or () if s["alive"]]
    if len(alive) < 2:  # one server (or one from before several could share a registry)
        return None
    holders = sorted({j["holder"] for j in st.get("jobs", {}).values() if j["valid"]})
    text = f"API servers: {len(alive)} alive ({', '.join(alive)}); this is {st.get('server', '?')}"
    if holders:
        text += f"; background jobs on {', '.join(holders)}"
    return text


def rebalancer_line(reb: dict[str, Any] | None) -> str:
    if reb is None:  # an API server from before the rebalancer
        return "rebalancer: unknown"
    if reb["state"] == "moving":
        return f"rebalancer: {moving_text(reb)} - {reb['reason']}"
    line = "rebalancer: idle" + ("" if reb.get("auto", True) else " (automatic runs off)")
    last = reb.get("last")
    if last:
        line += f"; last run {run_summary(last)}, finished {when(last['finished'])} ({last['reason']})"
    return line


def plan_summary(plan: dict[str, Any]) -> str:
    return (
        f"{human_size(plan['bytes'])} to move in {plan['count']} move(s) (minimum for an even spread:"
        f" {human_size(plan['minimum'])}); spread {spread_text(plan['spread'])}"
        f" -> {spread_text(plan['spread_after'])}"
    )


def print_plan(plan: dict[str, Any]) -> None:
    if not plan["count"]:
        typer.echo(f"nothing to move (spread {spread_text(plan['spread'])})")
        return
    typer.echo(f"plan: {plan_summary(plan)}")
    for m in plan["moves"]:
        typer.echo(
            f"  {m['from']} -> {m['to']}  {human_size(m['size']):>10}  part {m['part']:<2} {m['name']}"
        )
    if plan["truncated"]:
        typer.echo(f"  ... the first {len(plan['moves'])} of {plan['count']} moves shown")
    typer.echo("dry run: nothing moved")
