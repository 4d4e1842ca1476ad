"""The floor: what karma8's data path costs in raw syscalls on this machine, with no program around it.

Each component of an upload and a download is measured alone, with C tools (``dd``,
``openssl dgst``, ``sha256sum``; each tool's start-up, timed on an empty file, subtracted)
or with Python's ``os``/``socket`` calls that stay in C (one call per MiB, or one per
syscall for the small files; socat and nc are not needed), and reported in seconds per GiB
of file (wall and CPU: utime + stime of this process and its children). Their sum is **the
floor**: the benchmark's s/GiB (``scripts/bench.py``: seconds per GiB = 1073.7 / MB/s;
server + client CPU s/GiB) divided by it says how far the program is from the bare syscalls.

Big files (``--size``, 1 GiB by default; every number per GiB of file), for ``--policy``
``ec62`` (6 data + 2 parity fragments on 8 buckets: 8/6 of the bytes go to buckets) or
``rep1`` (6 + 0 on 6 buckets):

- upload: read the source file from the page cache (``dd ... of=/dev/null``, as the
  benchmark's just-written source is cached); sha256 once (``openssl dgst -sha256`` of the
  cached file minus that read: OpenSSL uses the CPU's SHA instructions, as Python's hashlib
  does; coreutils' ``sha256sum``, shown but not summed, does not and costs several times
  more); the 2 loopback TCP hops, client -> API (1 x the bytes) and API -> buckets
  (8/6 x, or 1 x without parity), from a 1 MiB user buffer (``sendall``) into a 1 MiB user
  buffer (``recv_into``) in another process, each byte copied in and out of the kernel once;
  the fragments written and fsynced (``dd if=/dev/zero ... conv=fsync``, one per bucket, all
  at once, 8/6 x the bytes in all).
- download: the data fragments read from the page cache (1 x, the same cached read), sha256
  once, the 2 hops (buckets -> API, API -> client: 1 x each), the downloaded file written and
  fsynced (``dd conv=fsync``, 1 x).

Small files (``--small-size``, 64 KiB; per file, one at a time): a TCP connect/accept on
loopback (karma8 opens a WebSocket per transfer; the API's gRPC channels to the buckets stay
open); one round trip carrying the file (client <-> API) and one per fragment carrying it
(API <-> bucket: 8 on upload, 6 data fragments on download), each a ``sendall`` of the bytes
and a 1-byte answer between two processes (a download's small request and large answer are
taken to cost the same); sha256 of the file (hashlib, OpenSSL); on upload
each fragment appended to its bucket's open volume file and fdatasynced (8 appends, 8
fdatasyncs: nothing shared between files); on download the 6 fragments read by pread from
open descriptors and the file created, written and fsynced. Also shown, not summed: the same
8 appends with one fdatasync, the most group commit across files can save.

Not in the floor, so a real system pays more: the erasure code's encode and decode, per
fragment checksums, framing and parsing (WebSocket, HTTP/2, gRPC, protobuf), the registry's
records and their fsyncs, directory fsyncs, the page cache's writeback beyond what fsync
waits for, and any interpreter. The components are measured one after the other, so their
wall times add up as if nothing overlapped: a pipelined program can beat the wall floor by
overlapping them (never by more than the cores allow: CPU floor / cores is the tighter wall
bound when CPU-bound), but not the CPU floor. On a busy machine every number is an upper
bound of the idle one.

Usage::

    python scripts/bench_floor.py                    # 1 GiB, ec62, 64 KiB x 500
    python scripts/bench_floor.py --policy rep1 --size 256M --small-count 200 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_model import DEFAULT_POLICY, MB, POLICIES, Policy, size_label

from karma8.config import GiB, MiB, parse_size

BLOCK = MiB


@dataclass(frozen=True, slots=True)
class Cost:
    """Seconds of wall time and of CPU (user + system, this process and its children)."""

    wall: float
    cpu: float

    def times(self, factor: float) -> Cost:
        return Cost(self.wall * factor, self.cpu * factor)

    def minus(self, other: Cost) -> Cost:
        return Cost(max(self.wall - other.wall, 0.0), max(self.cpu - other.cpu, 0.0))


def _cpu() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(work: Callable[[], object]) -> Cost:
    """The cost of ``work()``; child processes count once they have been waited for."""
    cpu, start = _cpu(), time.perf_counter()
    work()
    return Cost(time.perf_counter() - start, _cpu() - cpu)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tool(cmd: Sequence[str], path: Path, empty: Path) -> Cost:
    """``cmd`` on ``path`` less on ``empty`` (``{}`` in ``cmd`` stands for the file): the tool's
    work on the file without its start-up.
    """
    work = measure(lambda: run(*(part.format(path) for part in cmd)))
    return work.minus(measure(lambda: run(*(part.format(empty) for part in cmd))))


# -- loopback TCP between two processes -------------------------------------------------


def _listener() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    return server


def _in_child(server: socket.socket, body: Callable[[socket.socket], None]) -> int:
    """Fork a process that runs ``body(server)`` and exits; its pid (wait for it with _reap)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            body(server)
        except BaseException:  # any failure: the exit status says so
            code = 1
        os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"measuring child {pid} failed")


def _sink(server: socket.socket) -> None:
    """Accept one connection and read it to its end into a 1 MiB buffer."""
    conn, _ = server.accept()
    view = memoryview(bytearray(BLOCK))
    while conn.recv_into(view):
        pass
    conn.close()


def loopback_stream(size: int) -> Cost:
    """``size`` bytes from a user buffer in this process into a user buffer in another."""
    server = _listener()
    block = os.urandom(BLOCK)

    pid = _in_child(server, _sink)  # forked before the clock starts: its cost is not the work's

    def work() -> None:
        with socket.create_connection(server.getsockname()) as conn:
            for offset in range(0, size, BLOCK):
                conn.sendall(block[: min(BLOCK, size - offset)])
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the sink closed: everything was read
        _reap(pid)

    try:
        return measure(work)
    finally:
        server.close()


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def round_trips(size: int, count: int) -> Cost:
    """The cost of one round trip: ``size`` bytes one way, 1 byte back, on an open connection."""
    server = _listener()

    def answer(server: socket.socket) -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(bytearray(size))
        while _recv_exactly(conn, view):
            conn.sendall(b"k")
        conn.close()

    message = os.urandom(size)

    pid = _in_child(server, answer)  # forked before the clock starts: its cost is not the work's

    def work() -> None:
        with socket.create_connection(server.getsockname()) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                conn.sendall(message)
                conn.recv(1)
        _reap(pid)

    try:
        return measure(work).times(1 / count)
    finally:
        server.close()


def connects(count: int) -> Cost:
    """The cost of one TCP connect + accept + close on loopback."""
    server = _listener()

    def accept(server: socket.socket) -> None:
        for _ in range(count):
            conn, _ = server.accept()
            conn.close()

    pid = _in_child(server, accept)  # forked before the clock starts: its cost is not the work's

    def work() -> None:
        address = server.getsockname()
        for _ in range(count):
            socket.create_connection(address).close()
        _reap(pid)

    try:
        return measure(work).times(1 / count)
    finally:
        server.close()


# -- files -------------------------------------------------------------------------------


def write_source(path: Path, size: int) -> None:
    """Random bytes (every MiB different), fsynced: in the page cache like the benchmark's source."""
    with path.open("wb") as f:
        for offset in range(0, size, BLOCK):
            f.write(os.urandom(min(BLOCK, size - offset)))
        os.fsync(f.fileno())


def dd_write(paths: Sequence[Path], each: int) -> Cost:
    """``each`` bytes written and fsynced into every path, one ``dd`` per path, all at once."""

    def work() -> None:
        procs = [
            subprocess.Popen(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={path}",
                    "bs=1M",
                    f"count={each}",
                    "iflag=count_bytes",
                    "conv=fsync",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for path in paths
        ]
        if any(proc.wait() != 0 for proc in procs):
            raise RuntimeError("dd failed")

    os.sync()  # fsync pays for its own data only, as bench.py's settle()
    cost = measure(work)
    for path in paths:
        path.unlink()
    return cost


def appends(folder: Path, fragment: int, files: int, buckets: int, *, group: bool) -> Cost:
    """Per file: ``buckets`` fragments appended to one open volume file each and fdatasynced
    (each, or with ``group`` only the last one, all appends going to one volume).
    """
    names = [folder / f"volume-{b}" for b in range(1 if group else buckets)]
    fds = [os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for name in names]
    data = os.urandom(fragment)

    def work() -> None:
        for _ in range(files):
            for b in range(buckets):
                fd = fds[0 if group else b]
                os.write(fd, data)
                if not group:
                    os.fdatasync(fd)
            if group:
                os.fdatasync(fds[0])

    try:
        os.sync()
        return measure(work).times(1 / files)
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            name.unlink()


def preads(folder: Path, fragment: int, files: int, parts: int) -> Cost:
    """Per file: ``parts`` fragments read by pread from open, cached volume files."""
    names = [folder / f"volume-{b}" for b in range(parts)]
    for name in names:
        name.write_bytes(os.urandom(fragment * files))
    fds = [os.open(name, os.O_RDONLY) for name in names]

    def work() -> None:
        for i in range(files):
            for fd in fds:
                os.pread(fd, fragment, i * fragment)

    try:
        return measure(work).times(1 / files)
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            name.unlink()


def creates(folder: Path, size: int, files: int) -> Cost:
    """Per file: a new file created, written, fsynced and closed (a downloaded file)."""
    data = os.urandom(size)
    paths = [folder / f"download-{i:05d}" for i in range(files)]

    def work() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)

    os.sync()
    cost = measure(work).times(1 / files)
    for path in paths:
        path.unlink()
    return cost


def sha256_many(size: int, files: int) -> Cost:
    data = os.urandom(size)
    return measure(lambda: [hashlib.sha256(data).digest() for _ in range(files)]).times(1 / files)


# -- the floor ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Component:
    """One line of the table: ``volume`` x the unit (GiB of file, or one file) at ``cost``."""

    what: str
    how: str
    volume: float
    cost: Cost
    summed: bool = True


@dataclass(frozen=True, slots=True)
class Floor:
    name: str
    unit: str
    components: list[Component]

    def total(self) -> Cost:
        parts = [c.cost for c in self.components if c.summed]
        return Cost(sum(c.wall for c in parts), sum(c.cpu for c in parts))


def big_floors(folder: Path, size: int, policy: Policy) -> list[Floor]:
    """Upload and download of a ``size`` file, per GiB."""
    per_gib = GiB / size
    source, empty = folder / "source.bin", folder / "empty.bin"
    write_source(source, size)
    empty.touch()
    try:
        read = tool(["dd", "if={}", "of=/dev/null", "bs=1M"], source, empty).times(per_gib)
        hashed = tool(["openssl", "dgst", "-sha256", "{}"], source, empty).times(per_gib)
        coreutils = tool(["sha256sum", "{}"], source, empty).times(per_gib)
    finally:
        source.unlink()
        empty.unlink()
    sha = hashed.minus(read)
    hop = loopback_stream(size).times(per_gib)
    spread = policy.buckets / policy.parts
    fragment = -(-size // policy.parts)
    fragments = [folder / f"fragment-{b}" for b in range(policy.buckets)]
    stored = dd_write(fragments, fragment).times(per_gib)
    downloaded = dd_write([folder / "download.bin"], size).times(per_gib)
    tcp = "sendall -> recv_into, 1 MiB, 2 processes"
    upload = Floor(
        "upload",
        "GiB",
        [
            Component("read the source file (page cache)", "dd of=/dev/null bs=1M", 1.0, read),
            Component("sha256 once", "openssl dgst -sha256 minus the read", 1.0, sha),
            Component(
                "(sha256 by coreutils' sha256sum)",
                "sha256sum minus the read",
                1.0,
                coreutils.minus(read),
                False,
            ),
            Component("loopback client -> API", tcp, 1.0, hop),
            Component(f"loopback API -> {policy.buckets} buckets", tcp, spread, hop.times(spread)),
            Component(
                f"write + fsync {policy.buckets} fragments",
                f"{policy.buckets} x dd if=/dev/zero conv=fsync at once",
                spread,
                stored,
            ),
        ],
    )
    download = Floor(
        "download",
        "GiB",
        [
            Component(f"read {policy.parts} data fragments (page cache)", "as the read above", 1.0, read),
            Component(f"loopback {policy.parts} buckets -> API", tcp, 1.0, hop),
            Component("loopback API -> client", tcp, 1.0, hop),
            Component("sha256 once", "as above", 1.0, sha),
            Component("write + fsync the file", "dd if=/dev/zero conv=fsync", 1.0, downloaded),
        ],
    )
    return [upload, download]


def small_floors(folder: Path, size: int, files: int, policy: Policy) -> list[Floor]:
    """Upload and download of one ``size`` file, one at a time: per file."""
    fragment = -(-size // policy.parts)
    connect = connects(files)
    whole = round_trips(size, files)
    piece = round_trips(fragment, files)
    sha = sha256_many(size, files)
    n, k = policy.buckets, policy.parts
    frag = size_label(fragment) if fragment % 1024 == 0 else f"{fragment} B"
    upload = Floor(
        f"{size_label(size)} upload",
        "file",
        [
            Component("TCP connect + accept (client -> API)", "connect/accept/close", 1, connect),
            Component("round trip client <-> API", f"sendall {size_label(size)}, 1 B back", 1, whole),
            Component(f"round trips API <-> {n} buckets", f"sendall {frag}, 1 B back", n, piece.times(n)),
            Component("sha256 once", "hashlib (OpenSSL)", 1, sha),
            Component(
                f"{n} appends + {n} fdatasync",
                "os.write + os.fdatasync, one volume per bucket",
                n,
                appends(folder, fragment, files, n, group=False),
            ),
            Component(
                f"(group commit: {n} appends + 1 fdatasync)",
                "os.write x n + os.fdatasync, one volume",
                n,
                appends(folder, fragment, files, n, group=True),
                summed=False,
            ),
        ],
    )
    download = Floor(
        f"{size_label(size)} download",
        "file",
        [
            Component("TCP connect + accept (client -> API)", "connect/accept/close", 1, connect),
            Component(
                f"pread {k} fragments (page cache)",
                "os.pread, open volumes",
                k,
                preads(folder, fragment, files, k),
            ),
            Component(f"round trips {k} buckets <-> API", f"sendall {frag}, 1 B back", k, piece.times(k)),
            Component("round trip API <-> client", f"sendall {size_label(size)}, 1 B back", 1, whole),
            Component("sha256 once", "hashlib (OpenSSL)", 1, sha),
            Component(
                "create + write + fsync the file",
                "os.open/write/fsync/close",
                1,
                creates(folder, size, files),
            ),
        ],
    )
    return [upload, download]


# -- the report --------------------------------------------------------------------------

ROW = "  {:<40} {:>6} {:>10} {:>10}  {}"


def format_floor(floor: Floor, cores: int) -> list[str]:
    per_file = floor.unit == "file"
    scale, unit = (1000.0, "ms") if per_file else (1.0, "s")
    lines = [
        f"{floor.name} (per {floor.unit})",
        ROW.format("component", "x", f"wall {unit}", f"CPU {unit}", "measured with"),
    ]
    for c in floor.components:
        volume = f"{c.volume:g}" if per_file else f"{c.volume:.2f}"
        wall, cpu = f"{c.cost.wall * scale:.3f}", f"{c.cost.cpu * scale:.3f}"
        lines.append(ROW.format(c.what, volume, wall, cpu, c.how))
    total = floor.total()
    lines.append(
        ROW.format("the floor", "", f"{total.wall * scale:.3f}", f"{total.cpu * scale:.3f}", "").rstrip()
    )
    if per_file:
        best = (
            f"{1 / total.wall:.0f} files/s one at a time; CPU-bound at {cores / total.cpu:.0f} files/s "
            f"on {cores} cores"
        )
    else:
        best = (
            f"{GiB / total.wall / MB:.0f} MB/s serial; CPU-bound at {cores * GiB / total.cpu / MB:.0f} MB/s "
            f"on {cores} cores"
        )
    lines.append(f"  = at best {best}")
    return lines


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="big file size [1G]")
    parser.add_argument("--small-size", default="64K", help="small file size [64K]")
    parser.add_argument(
        "--small-count",
        type=int,
        default=500,
        help="small files timed per component (a helper process's start-up is amortized over them) [500]",
    )
    parser.add_argument(
        "--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY, help=f"[{DEFAULT_POLICY}]"
    )
    parser.add_argument("--dir", type=Path, help="where to write (the benchmark's disk) [$TMPDIR]")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the numbers here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    size, small = int(str(parse_size(args.size))), int(str(parse_size(args.small_size)))
    if size <= 0 or small <= 0 or args.small_count < 1:
        parser.error("sizes and --small-count must be positive")
    missing = [tool for tool in ("dd", "openssl", "sha256sum") if shutil.which(tool) is None]
    if missing:
        parser.error(f"not installed: {', '.join(missing)}")
    policy = POLICIES[args.policy]
    cores = len(os.sched_getaffinity(0))
    load = _load()
    folder = Path(tempfile.mkdtemp(prefix="karma8-floor-", dir=args.dir))
    try:
        floors = big_floors(folder, size, policy) + small_floors(folder, small, args.small_count, policy)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [
        f"The floor: karma8's data path in raw syscalls, {policy.name} ({policy.scheme} on {policy.buckets} "
        f"buckets), measured with {size_label(size)} and {args.small_count} x {size_label(small)} "
        f"in {folder.parent}",
        f"machine: {cores} CPUs, Linux {os.uname().release}; load average {load} at start, {_load()} at end",
        "x = how many times the unit the component moves (GiB of file, or fragments per file);",
        "wall and CPU (user + system, every process) already multiplied by it; one component at a time.",
        "",
    ]
    for floor in floors:
        lines += [*format_floor(floor, cores), ""]
    print("\n".join(lines).rstrip())
    if args.json_path is not None:
        data = {
            "policy": policy.name,
            "size": size,
            "small_size": small,
            "small_count": args.small_count,
            "cores": cores,
            "floors": [{**asdict(floor), "total": asdict(floor.total())} for floor in floors],
        }
        args.json_path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
