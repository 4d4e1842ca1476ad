"""Linux network namespaces for multi-host tests: one "host" per namespace, on one switch.

Topology (``sfx`` is a random suffix, ``X`` a free /24 inside 10.87.0.0/16)::

    root namespace (the test, as client)      switch namespace k8mh-<sfx>-sw
      k8m<sfx> 10.87.X.1/24   <--- veth --->    up0 --+
                                                      |  bridge br0
    host namespace k8mh-<sfx>-<host>                  |
      eth0 10.87.X.<n>/24     <--- veth --->    p<n> -+

Each host has loopback and its own address. Pulling a host's cable takes its switch port
down, so the host's interface loses carrier and nothing it sends or is sent gets through.
Names carry the suffix, so parallel or crashed runs never collide; :meth:`Network.destroy`
removes everything, including processes still running in the namespaces.

Setup and teardown are synchronous (``subprocess``): they run in fixtures, outside trio.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import trio

#: Where the test networks' /24s are drawn from.
POOL = ipaddress.IPv4Network("10.87.0.0/16")
PREFIX = "k8mh-"
#: Limit for one ``ip`` command.
COMMAND_TIMEOUT = 10.0


def ip_binary() -> str | None:
    """The ``ip`` command (iproute2), also where sbin is not on PATH."""
    found = shutil.which("ip")
    if found:
        return found
    for path in ("/usr/sbin/ip", "/sbin/ip"):
        if os.access(path, os.X_OK):
            return path
    return None


def _ip(ip: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ip args``; the caller looks at the return code."""
    return subprocess.run([ip, *args], check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def why_unsupported() -> str | None:
    """None if this machine can build test networks, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    ip = ip_binary()
    if ip is None:
        return "no `ip` binary (iproute2)"
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    steps = [
        ("netns", "add", probe),
        ("-n", probe, "link", "add", "br0", "type", "bridge"),
        ("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
    ]
    try:
        for step in steps:
            done = _ip(ip, *step)
            if done.returncode != 0:
                return f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip` unusable: {exc}"
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _ip(ip, "netns", "delete", probe)
    return None


def netns_of(pid: int) -> int:
    """The network namespace of process ``pid`` (its inode number)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _free_subnet(ip: str) -> ipaddress.IPv4Network:
    """A random /24 of POOL that no address or route of the root namespace touches."""
    used: list[ipaddress.IPv4Network] = []
    for args in (["-4", "-o", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        done = _ip(ip, *args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        for word in done.stdout.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(word, strict=False))
    used = [n for n in used if n.prefixlen > 0]
    candidates = list(POOL.subnets(new_prefix=24))
    start = secrets.randbelow(len(candidates))
    for subnet in candidates[start:] + candidates[:start]:
        if not any(subnet.overlaps(n) for n in used):
            return subnet
    raise RuntimeError(f"no free /24 in {POOL}")


@dataclass(frozen=True)
class Host:
    """One namespace with one interface on the switch."""

    name: str
    netns: str
    address: str
    #: The host's port on the switch bridge (in the switch namespace).
    port: str


@dataclass
class Network:
    """A switch namespace with a bridge, the root namespace on it, and hosts."""

    ip: str
    suffix: str
    subnet: ipaddress.IPv4Network
    hosts: dict[str, Host] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.suffix}-sw"

    @property
    def root_link(self) -> str:
        """The root namespace's interface on the switch."""
        return f"k8m{self.suffix}"

    @property
    def root_address(self) -> str:
        return str(self.subnet[1])

    def _run(self, *args: str) -> None:
        done = _ip(self.ip, *args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _add_netns(self, name: str) -> None:
        self._run("netns", "add", name)
        self._namespaces.append(name)
        self._run("-n", name, "link", "set", "lo", "up")

    @classmethod
    def create(cls) -> Network:
        """The switch and the root namespace's link to it (call :meth:`destroy` after)."""
        ip = ip_binary()
        if ip is None:
            raise RuntimeError("no `ip` binary")
        net = cls(ip, secrets.token_hex(3), _free_subnet(ip))
        sw = net.switch
        try:
            net._add_netns(sw)
            net._run("-n", sw, "link", "add", "br0", "type", "bridge")
            net._run("-n", sw, "link", "set", "br0", "up")
            net._run("link", "add", net.root_link, "type", "veth", "peer", "name", "up0", "netns", sw)
            net._run("-n", sw, "link", "set", "up0", "master", "br0", "up")
            net._run("addr", "add", f"{net.root_address}/24", "dev", net.root_link)
            net._run("link", "set", net.root_link, "up")
        except BaseException:
            net.destroy()
            raise
        return net

    def add_host(self, name: str) -> Host:
        """A new namespace with loopback up and one address on the switch."""
        n = len(self.hosts) + 2  # .1 is the root namespace
        host = Host(name, f"{PREFIX}{self.suffix}-{name}", str(self.subnet[n]), f"p{n}")
        sw = self.switch
        self._add_netns(host.netns)
        peer = ("peer", "name", "eth0", "netns", host.netns)
        self._run("-n", sw, "link", "add", host.port, "type", "veth", *peer)
        self._run("-n", sw, "link", "set", host.port, "master", "br0", "up")
        self._run("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        self._run("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (``ip netns exec`` execs it in place)."""
        return [self.ip, "netns", "exec", host.netns, *argv]

    async def set_link(self, host: Host, up: bool) -> None:
        """Plug (``up``) or pull the cable of ``host``: its switch port goes up or down."""
        state = "up" if up else "down"
        await trio.run_process([self.ip, "-n", self.switch, "link", "set", host.port, state])

    def pids(self) -> list[int]:
        """Processes running in any of this network's namespaces."""
        return [int(p) for ns in self._namespaces for p in _ip(self.ip, "netns", "pids", ns).stdout.split()]

    def leftovers(self) -> list[str]:
        """This network's namespaces and root-namespace links that still exist."""
        left = [ns for ns in self._namespaces if Path("/var/run/netns", ns).exists()]
        if Path("/sys/class/net", self.root_link).exists():
            left.append(self.root_link)
        return left

    def destroy(self) -> None:
        """Kill what runs inside, delete the root link and every namespace (idempotent)."""
        # A namespace goes away with its last process, so these need not have exited yet.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if Path("/sys/class/net", self.root_link).exists():
            _ip(self.ip, "link", "delete", self.root_link)  # its peer goes with it
        for ns in reversed(self._namespaces):
            _ip(self.ip, "netns", "delete", ns)
