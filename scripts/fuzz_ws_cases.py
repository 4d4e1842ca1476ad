"""Catalogues of hostile input for the WebSocket sessions (no I/O): the steps a session can
take, request paths and upload headers (frames and handshakes: :mod:`fuzz_ws_frames`).

Everything is drawn from the session's own generator (:class:`Gen`), so that a replay
builds the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11
from fuzz_model import Limits, expected_name
from fuzz_wire import encode_frame
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

MiB = 1024 * 1024
NAMED_OPS = ("upload", "download", "stat", "delete")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as sent (a lie about the length makes it raw bytes for the model)."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length: int | None = None
    wide: bool = False
    label: str = ""

    def wire(self, key: bytes) -> bytes:
        return encode_frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            mask=key if self.masked else None,
            length=self.length,
            wide=self.wide,
        )


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes sent as they are (not a whole frame)."""

    data: bytes
    label: str


@dataclass(frozen=True, slots=True)
class Read:
    """Wait for the server's next text frame (or its close)."""


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


@dataclass(frozen=True, slots=True)
class HalfClose:
    """shutdown(SHUT_WR): the server reads EOF, we keep reading."""


@dataclass(frozen=True, slots=True)
class Drop:
    """Close the socket now: a FIN, or an RST with ``reset``."""

    reset: bool


Step = Frame | Raw | Read | Pause | HalfClose | Drop


def describe_step(step: Step) -> str:
    if isinstance(step, Frame):
        names = {0: "cont", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}
        kind = names.get(step.opcode, f"opcode {step.opcode}")
        extra = "" if step.fin else " fin=0"
        extra += f" rsv={step.rsv}" if step.rsv else ""
        extra += " unmasked" if not step.masked else ""
        extra += f" length={step.length}" if step.length is not None else ""
        body = repr(step.payload[:40]) if len(step.payload) <= 40 else f"{len(step.payload)} B"
        return f"{kind}{extra} {body}" + (f" ({step.label})" if step.label else "")
    if isinstance(step, Raw):
        return f"raw {len(step.data)} B ({step.label})"
    if isinstance(step, Pause):
        return f"pause {step.seconds * 1000:.0f} ms"
    if isinstance(step, Read):
        return "read reply"
    if isinstance(step, HalfClose):
        return "shutdown(SHUT_WR)"
    return "RST" if step.reset else "FIN"


# -- the generator -------------------------------------------------------------------------

#: Names that exist often (uploaded by valid sessions): downloads, stats, deletes,
#: replaces and conflicts hit them. Some need percent-encoding.
POOL = (
    "fz/a",
    "fz/b",
    "fz/c",
    "fz/d/e.bin",
    "fz/ü/名前.txt",
    "fz/with space",
    "fz/100%",
    "fz/q?x#y",
    "fz/semi;colon",
    "fz/back\\slash",
    "fz/caf\u00e9",
    "fz/cafe\u0301",
    "fz/+plus&amp",
)


class Gen:
    """A session's generator, with the API limits the choices are built around."""

    def __init__(self, rng: random.Random, limits: Limits, host: str) -> None:
        self.rng = rng
        self.limits = limits
        self.host = host

    def pause(self) -> Pause:
        """Client think time: none, a few ms (races with the server's reply), or more."""
        return Pause(self.rng.choice((0.0, 0.0, 0.001, 0.005, 0.005, 0.02, self.rng.uniform(0, 0.1))))

    def hold(self) -> float:
        """How long a half-open connection stays: around the server's timeouts."""
        return self.rng.uniform(0, 1.5 * max(self.limits.idle_timeout, self.limits.handshake_timeout))

    def size(self) -> int:
        """An upload size: small, around max_frame, or up to max_file_size."""
        f = self.limits.max_frame
        return self.rng.choice(
            (
                0,
                1,
                self.rng.randint(2, 4096),
                f - 1,
                f,
                f + 1,
                2 * f + self.rng.randint(-2, 2),
                self.rng.randint(0, 4 * f),
                self.limits.max_file_size if self.rng.random() < 0.1 else f,
            )
        )

    def oversize(self) -> int:
        """A frame size the server must refuse (1009)."""
        f = self.limits.max_frame
        return self.rng.choice((f + 1, f + 2, f + self.rng.randint(3, f), 2 * MiB))

    def mask(self) -> bytes:
        return self.rng.choice((b"\0\0\0\0", self.rng.randbytes(4)))

    def standard_handshake(self, path: str) -> bytes:
        return request_bytes(self.host, path)


def request_bytes(host: str, target: str) -> bytes:
    """wsproto's handshake request for ``target``; built by hand for a target that h11
    refuses to send (the server must still cope with it)."""
    try:
        return WSConnection(ConnectionType.CLIENT).send(Request(host=host, target=target))
    except (h11.LocalProtocolError, UnicodeEncodeError):
        return (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()


# -- paths ---------------------------------------------------------------------------------


def target_name(target: str) -> tuple[str, str | None]:
    """(operation, name) a server following docs/protocol.md reads from a request target."""
    try:
        path = urlsplit(target).path
    except ValueError:  # "//[": not a URL at all
        return "", None
    head, _, rest = path.lstrip("/").partition("/")
    return head, expected_name(rest) if head in NAMED_OPS else None


def encode_variant(g: Gen, name: str) -> str:
    """``name`` percent-encoded one of the ways that all decode to it."""
    how = g.rng.random()
    if how < 0.6:
        return quote(name, safe="/")
    if how < 0.75:
        return "".join(f"%{b:02X}" for b in name.encode())
    if how < 0.85:
        return "".join(f"%{b:02x}" for b in name.encode())
    return quote(name, safe="").replace("%2F", g.rng.choice(("%2F", "%2f", "/")))


def name_path(g: Gen, op: str) -> tuple[str, str]:
    """A valid name (from the pool, or a fresh one) and a path for ``op`` that carries it."""
    name = g.rng.choice(POOL) if g.rng.random() < 0.6 else f"fz/u/{g.rng.getrandbits(48):012x}"
    path = f"/{op}/{encode_variant(g, name)}"
    tail = g.rng.random()
    if tail < 0.05:
        path += g.rng.choice(("?", "?x=1", "?prefix=%zz", "#frag", "?a#b"))
    elif tail < 0.08:
        path = f"http://{g.host}{path}"
    return name, path


HOSTILE_NAMES = (
    "fz/%zz",
    "fz/%4",
    "fz/%",
    "%",
    "%C3%28",
    "%FF",
    "%C0%AF",
    "%ED%A0%80",
    "%F8%88%80%80%80",
    "%00",
    "a%0Ab",
    "%1F",
    "%7F",
    "%C2%80",
    "%C2%9F",
    "..",
    ".",
    "a//b",
    "/a",
    "a/",
    "a/./b",
    "a/../b",
    "%2E%2E",
    "a%2F%2Fb",
    "%2F",
    "",
    "%2525",
    "fz/%252F",
    "x" * 1024,
    "x" * 1025,
    quote("€" * 341 + "a"),
    quote("€" * 342),
    "a\\..\\b",
)

BAD_OPS = (
    "/",
    "",
    "/x",
    "/uploads/a",
    "/UPLOAD/a",
    "/%75pload/a",
    "/upload",
    "/files/x",
    "/status/x",
    "/rebalance/x",
    "/repair/x",
    "/verify//",
    "*",
    "/../upload/a",
    "//upload/a",
    "/upload/a/../b",
    "/download/%2e",
    "//[",
    "//[::1]/upload/a",
    "/upload/[",
    "http://[/upload/a",
    "//h:99999/status",
    "/stat/" + "a/" * 600 + "b",
)


def query_path(g: Gen, op: str, valid: bool) -> str:
    """A path of a one-frame endpoint, with a valid or a hostile query."""
    good = {
        "files": (
            "/files",
            "/files?prefix=fz/",
            "/files?prefix=",
            "/files?prefix=fz%2F",
            "/files?x=1",
            "/files?limit=3&delimiter=%2F",
            "/files?prefix=fz%2F&start_after=fz%2Fm&limit=1000",
        ),
        "status": ("/status", "/status?x"),
        "repair": ("/repair", "/repair?now"),
        "rebalance": ("/rebalance?dry_run=1", "/rebalance?dry_run=1", "/rebalance?dry_run=0", "/rebalance"),
        # Not a full /verify: a scrub of the whole store takes as long as reading every
        # fragment, which grows with the run and would read as a server that hangs.
        "verify": ("/verify/fz-none", "/verify/fz-none?x=1"),
    }
    bad = (
        "/files?prefix",
        "/files?prefix=%FF",
        "/files?prefix=%zz",
        "/files?&",
        "/files?=x",
        "/files?prefix=a&&b",
        "/files?prefix=" + "a" * 10000,
        "/files?prefix=%E2%82",
        "/files?limit=0",
        "/files?limit=1001",
        "/files?continuation=zz",
        "/files?start_after=%00",
        "/rebalance?dry_run=2",
        "/rebalance?dry_run=",
        "/rebalance?dry_run",
        "/rebalance?dry_run=1&dry_run=2",
        "/rebalance?dry_run=true",
        "/rebalance?dry_run=%31",
    )
    return g.rng.choice(good.get(op, ("/status",)) if valid else bad)


def hostile_path(g: Gen) -> tuple[str, str | None, str]:
    """(path, the name the server should decode, operation) of a tricky request target."""
    kind = g.rng.random()
    if kind < 0.55:
        op = g.rng.choice(NAMED_OPS)
        path = f"/{op}/{g.rng.choice(HOSTILE_NAMES)}"
    elif kind < 0.75:
        path = g.rng.choice(BAD_OPS)
    elif kind < 0.9:
        path = query_path(g, g.rng.choice(("files", "rebalance")), valid=False)
    else:
        op = g.rng.choice(NAMED_OPS)
        path = f"/{op}/fz/" + "y" * g.rng.choice((4000, 20000, 100000))
    op, name = target_name(path)
    return path, name, op


# -- upload headers ------------------------------------------------------------------------


def bad_header(g: Gen) -> tuple[str | bytes, str]:
    """An upload header, mostly invalid (JSON edge cases, types, sizes, unknown keys)."""
    f, top = g.limits.max_frame, g.limits.max_file_size
    size = g.rng.randint(0, 100)
    sha = g.rng.randbytes(32).hex()
    cases: list[tuple[str | bytes, str]] = [
        ("{", "open brace"),
        ("", "empty"),
        (" ", "blank"),
        ("[]", "array"),
        ("null", "null"),
        ("0", "number"),
        ('"x"', "string"),
        ("{}", "no size"),
        (f'{{"size": "{size}"}}', "size as string"),
        (f'{{"size": {size}.0}}', "size as float"),
        ('{"size": 1e3}', "size in exponent form"),
        ('{"size": -1}', "negative size"),
        ('{"size": -0}', "minus zero (valid: 0)"),
        ('{"size": true}', "size true"),
        ('{"size": null}', "size null"),
        ('{"size": NaN}', "NaN"),
        ('{"size": Infinity}', "Infinity"),
        (f'{{"size": {size}, "x": 1}}', "unknown key"),
        (f'{{"SIZE": {size}}}', "key case"),
        (f'{{"\\u0073ize": {size}}}', "escaped key (valid)"),
        (f'{{"size": 1, "size": {size}}}', "duplicate key (valid, last wins)"),
        (f'{{"size": {top}}}', "size = max_file_size (valid)"),
        (f'{{"size": {top + 1}}}', "size = max_file_size + 1"),
        ('{"size": 100000000000000000000000000}', "huge size"),
        ('{"size": ' + "9" * 5000 + "}", "5000-digit size"),
        (f'{{"size": {size}, "sha256": "{sha.upper()}"}}', "uppercase sha256"),
        (f'{{"size": {size}, "sha256": "{sha[:63]}"}}', "short sha256"),
        (f'{{"size": {size}, "sha256": "{sha}0"}}', "long sha256"),
        (f'{{"size": {size}, "sha256": 5}}', "sha256 number"),
        (f'{{"size": {size}, "sha256": null}}', "sha256 null (valid)"),
        (f'{{"size": {size}, "sha256": "{sha}"}}', "wrong sha256"),
        (f'[{{"size": {size}}}]', "header in an array"),
        ("[" * 5000 + "]" * 5000, "deep nesting"),
        (f'{{"size": {size}}} x', "trailing garbage"),
        (f'{{"size": {size}}}{{"size": {size}}}', "two objects"),
        ('{"size\\u0000": 1}', "NUL in key"),
        ('{"\\ud800": 1}', "lone surrogate"),
        (f'\ufeff{{"size": {size}}}', "BOM"),
        (b'{"size": \xff}', "invalid UTF-8"),
        (b'{"size": 1, "\xc0\xaf": 1}', "overlong UTF-8"),
        (f'{{"size": {size}, "pad": "{"a" * (f - 40)}"}}', "unknown key, near max_frame"),
        (f'{{"size": {size}}}'.ljust(f), "padded to exactly max_frame (valid)"),
        (f'{{"size": {size}}}'.ljust(f + 1), "padded to max_frame + 1"),
        ("\u20ac" * (f // 2), "max_frame/2 characters of 3 bytes"),
        (f'{{"size": {size}}}'.encode() + b" " * g.rng.randint(0, 3), "valid"),
    ]
    return g.rng.choice(cases)
