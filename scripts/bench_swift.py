"""The Swift peer for ``bench.py --vs-swift``: its lifecycle, its processes and a lean HTTP client.

``swiftpeer.sh start`` runs memcached, the account and container servers, 8 object servers
(``SWIFTPEER_OBJECT_SERVERS``) and a proxy on 127.0.0.1:8080 (tempauth ``test:tester`` /
``testing``); this module starts it unless it is already up, and stops it again only if it
started it. Objects go to one container per storage policy (a container's policy is fixed
when it is created): ``ec62`` (erasure coding 6+2, like karma8's default) or ``rep1`` (one
replica: no redundancy, like karma8 with parity 0).

The client mirrors what karma8's client does and no more: an upload streams the file in
1 MiB blocks and sends its md5 ahead as ``ETag`` (Swift checks it before it answers 201,
as karma8's API checks sha256 before it commits); a download streams into a file, hashes
sha256 on the way (the hash karma8's client checks) and fsyncs it. Blocking ``http.client``
calls run in threads, one persistent connection per thread.

For the degraded download, two object servers holding data fragments of the object are
killed, and ``swiftpeer.sh start`` brings them back afterwards (ObjectServersDown).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import trio
from bench_model import CLIENT, DOWN, BenchError, Source, note
from bench_procs import log_tail, wait_dead

URL = "http://127.0.0.1:8080"
USER, KEY = "test:tester", "testing"
#: The benchmark's containers: ``karma8-bench-ec62``, ``karma8-bench-rep1``.
CONTAINER = "karma8-bench"
BLOCK = 1024 * 1024
HTTP_TIMEOUT = 120.0
START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
#: Where the Swift peer lives next to this repository (../shared/peers/swift).
DEFAULT_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "swift" / "swiftpeer.sh"


# -- the peer --------------------------------------------------------------------------


def peer_base() -> Path:
    """The peer's directory, as swiftpeer.sh computes it."""
    if base := os.environ.get("SWIFTPEER_BASE"):
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "swiftpeer"


def not_installed(script: Path) -> str | None:
    """Why the Swift peer cannot run here, or None when it can."""
    base = peer_base()
    if not script.is_file():
        return f"{script} not found"
    if not (base / "venv" / "bin" / "python").exists():
        return f"Swift is not installed in {base} (run: bash {script} install)"
    if not (base / "etc" / "object.ring.gz").exists():
        return f"no Swift rings in {base / 'etc'} (run: bash {script} configure)"
    return None


def _healthy() -> bool:
    conn = _connection()
    try:
        status, _, body = _call(conn, "GET", "/healthcheck")
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return status == 200 and body == b"OK"


async def _peer(script: Path, command: str, log_path: Path) -> None:
    """``swiftpeer.sh command``, its output appended to ``log_path``; the caller bounds its time."""
    with log_path.open("ab") as log:
        proc = await trio.run_process(
            ["bash", str(script), command], stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        raise BenchError(
            f"swiftpeer.sh {command} exited with status {proc.returncode}:\n{log_tail(log_path, 10)}"
        )


@contextlib.asynccontextmanager
async def open_swift_peer(script: Path, log_path: Path) -> AsyncIterator[bool]:
    """Start the peer unless it is up; yield whether it was started here (then it is stopped here)."""
    if reason := not_installed(script):
        raise BenchError(f"--vs-swift: {reason}")
    started = not await trio.to_thread.run_sync(_healthy)
    if started:
        note(f"starting the Swift peer ({script} start)")
        with trio.move_on_after(START_TIMEOUT) as scope:
            await _peer(script, "start", log_path)
        if scope.cancelled_caught:
            raise BenchError(
                f"swiftpeer.sh start took more than {START_TIMEOUT:g} s:\n{log_tail(log_path, 10)}"
            )
    else:
        note("the Swift peer is already running: using it (it stays up afterwards)")
    try:
        yield started
    finally:
        if started:
            with trio.move_on_after(STOP_TIMEOUT, shield=True):
                await _peer(script, "stop", log_path)


# -- its processes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwiftProcesses:
    """The peer's processes by role: servers forked workers, so each group has parents and workers."""

    proxy: tuple[int, ...]
    objects: tuple[int, ...]
    #: The account and container servers and memcached.
    others: tuple[int, ...]
    client: int

    def groups(self) -> dict[str, tuple[int, ...]]:
        return {"proxy": self.proxy, "objects": self.objects, "others": self.others, CLIENT: (self.client,)}


def _children() -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                by_parent.setdefault(ppid, []).append(int(entry.name))
    return by_parent


def _with_descendants(pid: int, by_parent: dict[int, list[int]]) -> Iterator[int]:
    yield pid
    for child in by_parent.get(pid, []):
        yield from _with_descendants(child, by_parent)


def find_swift_processes() -> SwiftProcesses:
    """The processes in the peer's pid files and their workers."""
    by_parent = _children()
    roles: dict[str, list[int]] = {"proxy": [], "objects": [], "others": []}
    for pid_file in sorted((peer_base() / "run").glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{pid}").exists():
            continue
        name = pid_file.stem
        role = "proxy" if name == "proxy" else "objects" if name.startswith("object") else "others"
        roles[role] += _with_descendants(pid, by_parent)
    if not roles["proxy"] or not roles["objects"]:
        raise BenchError(f"Swift proxy or object servers not found from {peer_base() / 'run'}/*.pid")
    proxy, objects, others = (tuple(sorted(roles[r])) for r in ("proxy", "objects", "others"))
    return SwiftProcesses(proxy, objects, others, os.getpid())


# -- HTTP ------------------------------------------------------------------------------


def _connection() -> http.client.HTTPConnection:
    url = urlsplit(URL)
    return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=HTTP_TIMEOUT)


def _call(
    conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.headers, response.read()


def _expect(status: int, wanted: Sequence[int], what: str, body: bytes = b"") -> None:
    if status not in wanted:
        raise BenchError(f"Swift {what}: HTTP {status} {body[:200]!r}")


@dataclass(frozen=True, slots=True)
class SwiftAccount:
    """A tempauth token and the storage path (``/v1/AUTH_test``) it is good for."""

    token: str
    path: str
    container: str

    @property
    def account(self) -> str:
        """``AUTH_test``: the account's name, as Swift's ring hashes it."""
        return self.path.rsplit("/", 1)[-1]

    def object_path(self, name: str) -> str:
        return f"{self.path}/{self.container}/{quote(name)}"


def authenticate(policy: str) -> SwiftAccount:
    """Log in and make sure the benchmark's container for ``policy`` exists, in that policy."""
    container = f"{CONTAINER}-{policy}"
    conn = _connection()
    status, headers, body = _call(conn, "GET", "/auth/v1.0", {"X-Auth-User": USER, "X-Auth-Key": KEY})
    _expect(status, (200,), "auth", body)
    account = SwiftAccount(headers["X-Auth-Token"], urlsplit(headers["X-Storage-Url"]).path, container)
    auth = {"X-Auth-Token": account.token}
    path = f"{account.path}/{container}"
    status, _, body = _call(conn, "PUT", path, {**auth, "X-Storage-Policy": policy})
    _expect(status, (201, 202), f"PUT container {container} (policy {policy})", body)
    status, headers, body = _call(conn, "HEAD", path, auth)
    _expect(status, (204,), f"HEAD container {container}", body)
    if headers.get("X-Storage-Policy") != policy:
        raise BenchError(
            f"Swift container {container} is in policy {headers.get('X-Storage-Policy')}, "
            f"not {policy}: delete it"
        )
    conn.close()
    return account


def put_file(conn: http.client.HTTPConnection, account: SwiftAccount, src: Source, name: str) -> None:
    """PUT ``src`` as ``name``, streamed; Swift checks the md5 sent ahead as ETag."""
    if src.md5 is None:
        raise BenchError(f"no md5 for {src.path}")
    conn.putrequest("PUT", account.object_path(name), skip_accept_encoding=True)
    headers = {"X-Auth-Token": account.token, "Content-Length": str(src.size), "ETag": src.md5}
    for key, value in {**headers, "Content-Type": "application/octet-stream"}.items():
        conn.putheader(key, value)
    conn.endheaders()
    view = memoryview(bytearray(BLOCK))
    with src.path.open("rb", buffering=0) as f:
        while n := f.readinto(view):
            conn.send(view[:n])
    response = conn.getresponse()
    body = response.read()
    _expect(response.status, (201,), f"PUT {name}", body)
    if (response.headers.get("Etag") or "").strip('"') != src.md5:
        raise BenchError(f"Swift PUT {name}: ETag {response.headers.get('Etag')}, source md5 {src.md5}")


def get_file(
    conn: http.client.HTTPConnection, account: SwiftAccount, src: Source, name: str, dst: Path
) -> None:
    """GET ``name`` into ``dst`` (sha256 on the way, fsynced); it must be ``src`` again."""
    conn.request("GET", account.object_path(name), headers={"X-Auth-Token": account.token})
    response = conn.getresponse()
    if response.status != 200:
        _expect(response.status, (200,), f"GET {name}", response.read())
    view = memoryview(bytearray(BLOCK))
    hasher = hashlib.sha256()
    received = 0
    with dst.open("wb", buffering=0) as out:
        while n := response.readinto(view):
            hasher.update(view[:n])
            out.write(view[:n])
            received += n
        os.fsync(out.fileno())
    if received != src.size or hasher.hexdigest() != src.sha256:
        raise BenchError(
            f"Swift GET {name}: {received} bytes, sha256 {hasher.hexdigest()}, source {src.sha256}"
        )


def delete_object(conn: http.client.HTTPConnection, account: SwiftAccount, name: str) -> None:
    status, _, body = _call(conn, "DELETE", account.object_path(name), {"X-Auth-Token": account.token})
    _expect(status, (204, 404), f"DELETE {name}", body)


# -- the target the benchmark cases drive ----------------------------------------------

Op = Callable[[http.client.HTTPConnection, int], None]


async def _in_threads(count: int, concurrency: int, op: Op) -> list[float]:
    """``op(conn, i)`` for i in range(count), ``concurrency`` threads, a connection each;
    the seconds each ``op`` took (as bench_cases times karma8's: one operation's wall time).
    """
    indexes = iter(range(count))
    lock = threading.Lock()
    seconds = [0.0] * count

    def worker() -> None:
        conn = _connection()
        try:
            while True:
                with lock:
                    i = next(indexes, None)
                if i is None:
                    return
                start = time.perf_counter()
                op(conn, i)
                seconds[i] = time.perf_counter() - start
        finally:
            conn.close()

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, count)):
            nursery.start_soon(trio.to_thread.run_sync, worker)
    return seconds


class SwiftTarget:
    """The benchmark cases against the Swift peer, in the account's container."""

    name = "Swift"

    def __init__(self, account: SwiftAccount) -> None:
        self.account = account

    async def upload(self, src: Source, name: str) -> None:
        await _in_threads(1, 1, lambda conn, _: put_file(conn, self.account, src, name))

    async def download(self, src: Source, name: str, dst: Path) -> None:
        await _in_threads(1, 1, lambda conn, _: get_file(conn, self.account, src, name, dst))

    async def upload_many(self, src: Source, names: Sequence[str], concurrency: int) -> list[float]:
        return await _in_threads(
            len(names), concurrency, lambda conn, i: put_file(conn, self.account, src, names[i])
        )

    async def download_many(
        self, src: Source, names: Sequence[str], dsts: Sequence[Path], concurrency: int
    ) -> list[float]:
        def op(conn: http.client.HTTPConnection, i: int) -> None:
            get_file(conn, self.account, src, names[i], dsts[i])

        return await _in_threads(len(names), concurrency, op)

    @contextlib.asynccontextmanager
    async def stored(self, names: Sequence[str], concurrency: int) -> AsyncIterator[None]:
        """Delete ``names`` after the body (not when it fails: the next run overwrites them)."""
        yield
        await _in_threads(
            len(names), concurrency, lambda conn, i: delete_object(conn, self.account, names[i])
        )


# -- object servers down ---------------------------------------------------------------

#: Run by the peer's Python: the ports of the object servers holding data fragments of an
#: object, from Swift's own ring (an EC fragment's index is its primary's position in the
#: ring's list; indexes below ec_ndata are data). Argv: etc, policy, account, container, object.
RING_QUERY = """
import sys
import swift.common.utils as utils
etc, name, account, container, obj = sys.argv[1:]
utils.SWIFT_CONF_FILE = etc + "/swift.conf"
from swift.common.storage_policy import POLICIES, reload_storage_policies
reload_storage_policies()
policy = POLICIES.get_by_name(name)
policy.load_ring(etc)
_, nodes = policy.object_ring.get_nodes(account, container, obj)
data = getattr(policy, "ec_ndata", len(nodes))
print(" ".join(str(n["port"]) for n in nodes if n["index"] < data))
"""


def _object_servers() -> dict[int, str]:
    """Port -> the peer's name for the object server listening there (``object3``)."""
    servers = {}
    for conf in (peer_base() / "etc" / "object-server").glob("*.conf"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in conf.read_text().splitlines():
                if line.replace(" ", "").startswith("bind_port="):
                    servers[int(line.split("=", 1)[1])] = f"object{conf.stem}"
    return servers


class ObjectServersDown:
    """The outage of a degraded download on the peer started here: DOWN object servers holding
    data fragments of the object, killed (SIGKILL, each server's parent and its worker).

    Nothing restarts them during the download; ``swiftpeer.sh start`` brings them back
    afterwards (it starts the servers whose pid is dead and waits for every port).
    """

    def __init__(self, script: Path, account: SwiftAccount, policy: str, log_path: Path) -> None:
        self.script = script
        self.account = account
        self.policy = policy
        self.log_path = log_path
        self.what = f"{DOWN} object servers"

    async def _holders(self, name: str) -> list[str]:
        base = peer_base()
        args = [str(base / "etc"), self.policy, self.account.account, self.account.container, name]
        python = str(base / "venv" / "bin" / "python")
        proc = await trio.run_process(
            [python, "-W", "ignore", "-c", RING_QUERY, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"Swift's ring for {name}: {proc.stderr.decode(errors='replace')[-500:]}")
        servers = _object_servers()
        ports = [int(p) for p in proc.stdout.split()]
        holders = [servers[p] for p in ports if p in servers]
        if len(holders) < DOWN:
            raise BenchError(f"{name}: data fragments on ports {ports}, object servers {servers}")
        return holders[:DOWN]

    @contextlib.asynccontextmanager
    async def down(self, name: str) -> AsyncIterator[tuple[int, ...]]:
        """Kill DOWN object servers holding data fragments of ``name``; yield their pids; restart them."""
        holders = await self._holders(name)
        by_parent = _children()
        victims: list[int] = []
        for server in holders:
            pid = int((peer_base() / "run" / f"{server}.pid").read_text())
            victims += _with_descendants(pid, by_parent)  # the parent first: it would respawn workers
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            await wait_dead(victims)
            yield tuple(victims)
        finally:
            with trio.move_on_after(START_TIMEOUT, shield=True) as scope:
                await _peer(self.script, "start", self.log_path)
        if scope.cancelled_caught:
            raise BenchError(f"swiftpeer.sh start after {self.what} down took more than {START_TIMEOUT:g} s")

    def groups(self) -> dict[str, tuple[int, ...]]:
        """The peer's processes to measure from now on (the restarted servers' new pids)."""
        return find_swift_processes().groups()
