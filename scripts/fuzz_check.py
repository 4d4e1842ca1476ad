"""What the fuzzer checks on the stack, during a run and after it.

During: :class:`Watch` notices a process that exits on its own and every new
``Traceback`` in a process's log. After: every process alive and serving (a round trip
through :class:`karma8.client.Client`, ``/healthz`` on every metrics port), file
descriptors back to their baseline, nothing stored that the fuzzer did not upload whole,
and the registry and the bucket disks reconciled (no temporary file, no orphan, no
upload in progress). Each check polls with a deadline: the servers close idle
connections and clean up on timeouts of their own.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from chaos_model import ChaosError
from chaos_stack import Child, Stack
from chaos_store import RegistryView, compare, scan_disks
from fuzz_model import Ledger, Ticket

from karma8.client import Client
from karma8.config import ClientConfig
from karma8.errors import Karma8Error, RemoteError

POLL = 0.1
#: Sessions that ended this long before an incident are still suspects.
RECENT = 1.0
#: Local ports remembered after their session ended (to name it from a log line).
PORTS_KEPT = 4096
_PEER = re.compile(r"127\.0\.0\.1'?,?\s*:?\s*(\d{2,5})")
#: How long the descriptor counts may take to hold still at the start.
BASELINE_WAIT = 5.0
HTTP_TIMEOUT = 10.0
ROUND_TRIP_TIMEOUT = 60.0
ROUND_TRIPS = 3
#: Extra descriptors a process may hold at the end (a gRPC reconnect in progress, a log rotation).
FD_SLACK = 3
_EXCEPTION = re.compile(r"^((?:[a-z_][\w]*\.)*[A-Z]\w*)(: .*)?$")
_NOT_LEAVES = {"ExceptionGroup", "BaseExceptionGroup", "Traceback"}
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


# -- during the run ------------------------------------------------------------------------


def signatures(text: str) -> list[str]:
    """The distinct exception lines of the tracebacks in ``text`` (numbers and addresses
    blurred, so that repeats of one bug compare equal)."""
    found: list[str] = []
    if "Traceback" not in text:
        return found
    lines = [line.lstrip(" |+-") for line in text.splitlines()]
    for i, stripped in enumerate(lines):
        match = _EXCEPTION.match(stripped)
        if match is None or match.group(1).rsplit(".", 1)[-1] in _NOT_LEAVES:
            continue
        following = next((line for line in lines[i + 1 : i + 4] if line), "")
        if following.startswith(_CHAINED):
            continue  # the cause of a chained exception: the one that escaped comes later
        blurred = re.sub(r"\d+", "N", re.sub(r"0x[0-9a-fA-F]+", "0x?", stripped))[:300]
        if blurred not in found:
            found.append(blurred)
    return found or ["a traceback without an exception line"]


@dataclass(frozen=True, slots=True)
class Incident:
    """A process that died, or a traceback it logged."""

    kind: str
    child: str
    signature: str
    detail: str
    #: The sessions in flight when the traceback first showed in the log (or the death).
    suspects: tuple[int, ...] = ()


@dataclass
class Watch:
    """Reads the processes' state and the new lines of their logs, one poll at a time."""

    stack: Stack
    offsets: dict[str, int] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    #: The last traceback each process logged: a crash right after it is its doing.
    last: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    #: Suspects when a traceback still being written was first seen.
    seen: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for child in self.stack.children():
            self.offsets[child.name] = _size(child.log)

    def _read(self, child: Child) -> str:
        start = self.offsets.get(child.name, 0)
        try:
            with child.log.open("rb") as f:
                f.seek(start)
                data = f.read()
        except OSError:
            return ""
        end = data.rfind(b"\n") + 1
        self.offsets[child.name] = start + end
        return data[:end].decode(errors="replace")

    def poll(
        self, suspects: Callable[[str], tuple[int, ...]] = lambda text: (), final: bool = False
    ) -> list[Incident]:
        """Incidents since the last poll. A traceback is reported once its log stops
        growing (or its process is gone, or this is the ``final`` poll), so that it is read
        whole; its suspects are those in flight when it first showed."""
        incidents = []
        for child in self.stack.children():
            dead = child.proc is not None and not child.running and not child.expected_down
            text = self.pending.pop(child.name, "") + self._read(child)
            size = _size(child.log)
            growing = size != self.sizes.get(child.name)
            self.sizes[child.name] = size
            if "Traceback" in text and child.name not in self.seen:
                self.seen[child.name] = suspects(text)
            if dead:
                child.expected_down = True
                assert child.proc is not None
                sigs = signatures(text)
                if sigs:
                    sig, who = sigs[-1], self.seen.pop(child.name, ()) or suspects(text)
                else:  # it logged its traceback before dying, or none at all
                    sig, who = self.last.pop(child.name, ("no traceback", suspects("")))
                detail = f"{child.name} (pid {child.proc.pid}) exited with status {child.proc.returncode}"
                incidents.append(Incident("crash", child.name, sig, detail, who))
            elif "Traceback" in text and growing and not final:
                self.pending[child.name] = text
            elif "Traceback" in text:
                who = self.seen.pop(child.name, ())
                for sig in signatures(text):
                    self.last[child.name] = (sig, who)
                    incidents.append(
                        Incident("traceback", child.name, sig, f"{child.name} logged a traceback", who)
                    )
        return incidents


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Flight:
    """Sessions in flight, and those that ended lately: the suspects of an incident."""

    def __init__(self) -> None:
        self.tickets: dict[int, Ticket] = {}
        self.started: dict[int, float] = {}
        #: When each session in flight finished its steps (it only waits for the server since).
        self.released: dict[int, float] = {}
        self.ended: deque[tuple[int, float]] = deque(maxlen=256)
        #: Local port -> session, for the latest connections.
        self.ports: OrderedDict[int, int] = OrderedDict()

    def start(self, index: int, ticket: Ticket) -> None:
        self.tickets[index] = ticket
        self.started[index] = trio.current_time()

    def release(self, index: int) -> None:
        self.released[index] = trio.current_time()

    def end(self, index: int) -> None:
        for port in self.tickets.pop(index).ports:
            self.ports[port] = index
            self.ports.move_to_end(port)
        while len(self.ports) > PORTS_KEPT:
            self.ports.popitem(last=False)
        self.started.pop(index, None)
        self.released.pop(index, None)
        self.ended.append((index, trio.current_time()))

    def named_in(self, text: str) -> tuple[int, ...]:
        """Sessions whose local port a log text names ("('127.0.0.1', 4321)", "127.0.0.1:4321")."""
        by_port = dict(self.ports)
        for index, ticket in self.tickets.items():
            by_port.update((port, index) for port in ticket.ports)
        found = (by_port.get(int(match.group(1))) for match in _PEER.finditer(text))
        return tuple(dict.fromkeys(i for i in found if i is not None))

    def suspects(self, text: str = "") -> tuple[int, ...]:
        """Most likely first: sessions the text names, sessions still sending (latest first),
        then those that finished sending lately, then those that ended lately; sessions
        only waiting for the server's timeouts come last."""
        now = trio.current_time()
        named = list(self.named_in(text)) if text else []
        sending = sorted((i for i in self.started if i not in self.released), key=lambda i: -self.started[i])
        done = sorted(self.released, key=lambda i: -self.released[i])
        recent = [i for i, t in reversed(self.ended) if now - t <= RECENT and i not in self.started]
        lately = [i for i in done if now - self.released[i] <= RECENT]
        ordered = named + sending + lately + recent + done
        return tuple(dict.fromkeys(ordered))


async def refusing(stack: Stack) -> list[str]:
    """The running processes whose main port refuses connections (a server that stopped
    listening without exiting, or is still starting)."""
    names = []
    for child in stack.children():
        port = stack.port if child is stack.api else child.info.get("port")
        if not child.running or not isinstance(port, int):
            continue
        try:
            with trio.fail_after(2.0):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            await trio.aclose_forcefully(stream)
        except (OSError, trio.TooSlowError):
            names.append(child.name)
    return names


# -- file descriptors ----------------------------------------------------------------------


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_counts(stack: Stack) -> dict[str, int]:
    counts = {}
    for child in stack.children():
        if child.proc is not None and child.running:
            n = fd_count(child.proc.pid)
            if n is not None:
                counts[child.name] = n
    return counts


async def measure_baseline(stack: Stack) -> dict[str, int]:
    """The descriptor counts once they hold still for a few polls (or after ``BASELINE_WAIT``)."""
    counts, steady = fd_counts(stack), 0
    with trio.move_on_after(BASELINE_WAIT):
        while steady < 5:
            await trio.sleep(POLL * 2)
            now = fd_counts(stack)
            steady = steady + 1 if now == counts else 0
            counts = now
    return counts


async def fd_problems(stack: Stack, baseline: dict[str, int]) -> list[str]:
    """The processes holding more descriptors than at the start (and a little)."""
    return [
        f"{name} holds {count} file descriptors, {baseline[name]} at the start"
        for name, count in sorted(fd_counts(stack).items())
        if count > baseline.get(name, count) + FD_SLACK
    ]


# -- the end checks ------------------------------------------------------------------------


def alive(stack: Stack) -> list[str]:
    return [f"{child.name} is not running" for child in stack.children() if not child.running]


async def http_get(port: int, path: str) -> bytes:
    """A minimal HTTP/1.0 GET on 127.0.0.1; the whole reply (b"" if it failed)."""
    try:
        with trio.fail_after(HTTP_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                chunks = []
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
                return b"".join(chunks)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return b""


async def serving(stack: Stack, client: Client, ledger: Ledger, work: Path, size: int) -> list[str]:
    """/healthz on every metrics port, and an upload and download whose bytes must match."""
    problems = []
    for child in stack.children():
        port = child.info.get("metrics_port")
        if isinstance(port, int):
            reply = await http_get(port, "/healthz")
            if not reply.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                problems.append(f"{child.name}: GET /healthz answered {reply[:60]!r}")
    data = os.urandom(size)
    src, dst = work / "roundtrip.in", work / "roundtrip.out"
    await trio.Path(src).write_bytes(data)
    name = f"fz-check/{data[:6].hex()}"
    for attempt in range(ROUND_TRIPS):
        try:
            with trio.fail_after(ROUND_TRIP_TIMEOUT):
                info = await client.upload(src, name)
                ledger.ack(name, (info.size, info.sha256))
                await client.download(name, dst)
        except RemoteError as exc:
            # A bucket that missed heartbeats on a loaded machine is not a finding; twice is.
            if exc.code in ("not_enough_buckets", "bucket_unavailable") and attempt + 1 < ROUND_TRIPS:
                try:
                    await stack.wait_live()
                except ChaosError as live:
                    problems.append(str(live))
                    break
                continue
            problems.append(f"round trip of {name!r} failed: {exc!r}")
        except (Karma8Error, trio.TooSlowError) as exc:
            problems.append(f"round trip of {name!r} failed: {exc!r}")
        else:
            if await trio.Path(dst).read_bytes() != data:
                problems.append(f"round trip of {name!r}: the bytes downloaded differ from those uploaded")
        break
    return problems


async def stored(client: Client, ledger: Ledger) -> list[str]:
    """Every listed file was uploaded whole by the fuzzer (acknowledged, or sent to the end)."""
    try:
        files = await client.list()
    except Karma8Error as exc:
        return [f"cannot list the files: {exc!r}"]
    return ledger.check([(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in files])


async def storage_problems(stack: Stack, registry: RegistryView) -> list[str]:
    """What differs between the registry and the bucket disks: temporary files, orphans,
    missing or damaged fragments, pending deletions, uploads in progress."""
    snapshot = await registry.snapshot()
    dirs = [stack.bucket_dir(i) for i in range(len(stack.buckets))]
    comparison = compare(snapshot, await trio.to_thread.run_sync(scan_disks, dirs))
    problems = [f"temporary file left: {p}" for p in comparison.tmp]
    problems += [f"orphan fragment {fid} on bucket {bucket}" for bucket, fid in comparison.orphans[:20]]
    problems += [f"missing fragment {fid} on bucket {bucket}" for bucket, fid in comparison.missing[:20]]
    problems += [f"damaged: {line}" for line in comparison.damaged[:20]]
    problems += [f"upload {u} of {n!r} still in progress" for u, n in comparison.in_progress]
    problems += [f"deletion still pending: upload {u} on bucket {b}" for u, b in comparison.pending[:20]]
    problems += [f"registry: {line}" for line in comparison.inconsistent]
    return problems


def check_client(stack: Stack, max_frame: int) -> Client:
    """A client whose frames fit the fuzz stack's small ``max_frame``."""
    return Client(ClientConfig(api=stack.url, frame_size=max_frame, connect_timeout=5.0, idle_timeout=60.0))
