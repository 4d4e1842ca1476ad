"""A fuzz run in progress: sessions a few at a time, the watch over the processes (crashes,
tracebacks, servers that stop listening), restarts, the triage of suspects by replaying
them alone, and the checks at the end. :mod:`fuzz` (the script) builds it and reports.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio
from chaos_stack import Child, Stack
from chaos_store import RegistryView
from fuzz_check import (
    POLL,
    Flight,
    Incident,
    Watch,
    alive,
    check_client,
    fd_problems,
    refusing,
    serving,
    storage_problems,
    stored,
)
from fuzz_model import Options, Player, Stats, Ticket, note

#: Sessions running at once, counting those that only wait for the server's timeouts.
MAX_IN_FLIGHT = 48
#: Suspects replayed alone per incident, and tries per suspect.
TRIAGE_SUSPECTS, TRIAGE_TRIES = 6, 2
#: How long a replayed suspect has to cause the incident again.
TRIAGE_WAIT = 1.0
#: A process that refuses connections this long while running is restarted.
REFUSED_LIMIT = 15.0
#: How long a process sent SIGABRT has to write its stacks.
ABORT_WAIT = 5.0
PROGRESS_EVERY = 10.0


async def abort(stack: Stack, child: Child) -> None:
    """SIGABRT ``child`` (faulthandler writes every thread's stack to its log), then kill it."""
    child.expected_down = True
    if child.proc is not None and child.proc.returncode is None:
        child.proc.send_signal(signal.SIGABRT)
        with trio.move_on_after(ABORT_WAIT):
            await child.proc.wait()
    await stack.kill(child)


class Gate:
    """Holds new sessions back while the stack is down (any number of waiters)."""

    def __init__(self) -> None:
        self._open = True
        self._changed = trio.Event()

    def close(self) -> None:
        self._open = False

    def open(self) -> None:
        self._open = True
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        while not self._open:
            await self._changed.wait()


class Run:
    """One fuzz run: the stack, the sessions in flight, and what was found."""

    def __init__(self, options: Options, stack: Stack, player: Player) -> None:
        self.options = options
        self.stack = stack
        self.player = player
        self.stats = Stats()
        self.watch = Watch(stack)
        self.flight = Flight()
        self.started = 0
        self.stopping = False
        #: A session could not connect: the watcher looks at the ports.
        self.refused = False
        self.gate = Gate()

    @property
    def unit(self) -> str:
        return "connections" if self.options.mode == "raw" else "sessions"

    # -- incidents -------------------------------------------------------------------------

    def incident(self, incident: Incident) -> None:
        if incident.kind == "crash":
            self.stats.crashes += 1
        message = f"{incident.detail}: {incident.signature}"
        finding = self.stats.find(
            incident.kind,
            message,
            incident.suspects,
            self.started,
            child=incident.child,
            signature=incident.signature,
        )
        if finding.count == 1:
            note(f"FINDING [{incident.kind}] {message} (after {self.started} {self.unit})")

    async def watcher(self) -> None:
        """Forever: report incidents and restart what died (stop the run after too many).

        When sessions cannot connect, new ones wait until every process listens again or
        exits: a server that failed may take a while to get there. One that still refuses
        connections ``REFUSED_LIMIT`` seconds later is killed, reported and restarted.
        """
        refused_since: float | None = None
        while True:
            incidents = self.watch.poll(self.flight.suspects)
            for incident in incidents:
                self.incident(incident)
            if any(i.kind == "crash" for i in incidents):
                if self.stats.crashes >= self.options.max_crashes:
                    note(f"{self.stats.crashes} crashes: no new sessions")
                    self.stopping = True
                refused_since = None
                await self.restart()
            elif self.refused:
                self.refused = bool(await refusing(self.stack))
                now = trio.current_time()
                if not self.refused:
                    refused_since = None
                    self.gate.open()
                elif refused_since is None:
                    refused_since = now
                    self.gate.close()
                elif now - refused_since > REFUSED_LIMIT:
                    refused_since = None
                    self.refused = False
                    await self.restart()
            await trio.sleep(POLL)

    async def restart(self) -> None:
        """Start whatever is down (killing what runs but no longer listens, a finding) and wait
        until every bucket is live; new sessions wait meanwhile."""
        self.gate.close()
        try:
            names = await refusing(self.stack)
            if names:
                waited = trio.current_time()
                with trio.move_on_after(REFUSED_LIMIT):
                    while names:  # a failed server may take a while to exit
                        await trio.sleep(POLL * 5)
                        names = await refusing(self.stack)
                note(f"waited {trio.current_time() - waited:.1f} s for a server that refused connections")
            for incident in self.watch.poll(self.flight.suspects, final=True):
                self.incident(incident)
            for child in self.stack.children():
                if child.name in names:
                    self.stats.find(
                        "refusing",
                        f"{child.name} refused connections for {REFUSED_LIMIT:g} s but did not exit; its"
                        f" threads' stacks (SIGABRT) are at the end of {child.log}",
                        self.flight.suspects(),
                        self.started,
                    )
                    await abort(self.stack, child)
            await self.stack.ensure_up()
            await self.stack.wait_live()
        finally:
            self.gate.open()

    # -- sessions --------------------------------------------------------------------------

    async def play(self, index: int, slots: trio.Semaphore, cap: trio.Semaphore) -> None:
        def release() -> None:
            slots.release()
            self.flight.release(index)

        ticket = Ticket(release)
        self.flight.start(index, ticket)
        try:
            report = await self.player.play(index, ticket)
        finally:
            ticket.release()
            cap.release()
            self.flight.end(index)
        stats = self.stats
        stats.sessions += 1
        self.refused = self.refused or "connect failed" in report.results
        stats.scenarios[report.scenario] += 1
        for result in report.results:
            stats.outcome(report.scenario, result)
        report.record(stats.ledger)
        for problem in report.problems:
            finding = stats.find("session", problem, (index,), self.started)
            if finding.count == 1:
                finding.description = self.player.describe(index)
                note(f"FINDING [session {index}] {problem}")

    async def sessions(
        self, indices: Iterable[int], concurrency: int, in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        """Run sessions, ``concurrency`` of them sending at once and ``in_flight`` in all."""
        deadline = trio.current_time() + self.options.time_limit
        slots, cap = trio.Semaphore(concurrency), trio.Semaphore(in_flight)
        async with trio.open_nursery() as nursery:
            for index in indices:
                await cap.acquire()
                await slots.acquire()
                await self.gate.wait()
                if self.stopping or trio.current_time() > deadline:
                    break
                self.started += 1
                nursery.start_soon(self.play, index, slots, cap)

    async def progress(self) -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            note(f"{self.stats.sessions} {self.unit} done, {len(self.stats.findings)} finding(s)")

    # -- triage ----------------------------------------------------------------------------

    def merge(self) -> None:
        """A traceback logged just before its process died is part of the crash finding."""
        findings = self.stats.findings
        crashes = {(f.child, f.signature): f for f in findings.values() if f.check == "crash"}
        for key, finding in list(findings.items()):
            crash = crashes.get((finding.child, finding.signature))
            if finding.check == "traceback" and crash is not None:
                del findings[key]
                crash.sessions += [i for i in finding.sessions if i not in crash.sessions]

    async def triage(self) -> None:
        """Replay the suspects of each crash and traceback alone, to name the one that does it
        (within ``--triage-time`` in all)."""
        with trio.move_on_after(self.options.triage_time) as scope:
            for finding in list(self.stats.findings.values()):
                if finding.check not in ("crash", "traceback") or not finding.sessions:
                    continue
                for index in finding.sessions[:TRIAGE_SUSPECTS]:
                    if await self.reproduces(index, finding.signature):
                        finding.confirmed = index
                        finding.description = self.player.describe(index)
                        note(f"session {index} alone reproduces: {finding.message}")
                        break
        if scope.cancelled_caught:
            note(f"triage stopped after {self.options.triage_time:g} s")
            await self.restart()

    async def reproduces(self, index: int, signature: str) -> bool:
        for _ in range(TRIAGE_TRIES):
            report = await self.player.play(index, Ticket())
            report.record(self.stats.ledger)
            found = False
            with trio.move_on_after(TRIAGE_WAIT):
                while not found:
                    found = any(i.signature == signature for i in self.watch.poll(lambda text: (index,)))
                    await trio.sleep(POLL)
            await self.restart()
            if found:
                return True
        return False

    # -- the end ---------------------------------------------------------------------------

    def check(self, name: str, problems: list[str]) -> None:
        self.stats.checks[name] = "ok" if not problems else f"{len(problems)} problem(s)"
        for problem in problems:
            self.stats.find(name, problem, (), self.started)

    async def settle(self, check: Callable[[], Awaitable[list[str]]]) -> list[str]:
        """Poll ``check`` until it finds nothing or ``--check-timeout`` has passed (the servers
        clean up on timeouts of their own); the problems it found last."""
        problems = await check()
        with trio.move_on_after(self.options.check_timeout):
            while problems:
                await trio.sleep(POLL * 5)
                problems = await check()
        return problems

    async def end_checks(self, work: Path, baseline: dict[str, int]) -> None:
        for incident in self.watch.poll(self.flight.suspects, final=True):
            self.incident(incident)
        self.check("processes alive", alive(self.stack))
        await self.restart()  # reports (and kills) one that runs but refuses connections
        options = self.options
        client = check_client(self.stack, options.max_frame)
        self.check(
            "serving (round trip, /healthz)",
            await serving(self.stack, client, self.stats.ledger, work, 3 * options.max_frame + 7),
        )
        self.check("nothing stored unless sent whole", await stored(client, self.stats.ledger))
        registry = RegistryView(self.stack.registry_path)
        try:
            problems = await self.settle(functools.partial(storage_problems, self.stack, registry))
        finally:
            registry.close()
        self.check("registry and disks reconciled", problems)
        problems = await self.settle(functools.partial(fd_problems, self.stack, baseline))
        self.check("file descriptors at baseline", problems)
        internal = [f for f in self.stats.findings.values() if "internal error" in f.message]
        self.stats.checks["no internal error sent"] = (
            "ok" if not internal else f"{sum(f.count for f in internal)} time(s)"
        )
        for incident in self.watch.poll(final=True):
            self.incident(incident)
        tracebacks = [f for f in self.stats.findings.values() if f.check in ("crash", "traceback")]
        self.stats.checks["no traceback in the logs"] = (
            "ok" if not tracebacks else f"{len(tracebacks)} kind(s)"
        )
