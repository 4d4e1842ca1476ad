"""Catalogues of raw bytes for the gRPC ports (HTTP/2) and the metrics ports (HTTP/1), no I/O.

HTTP/2 frames and gRPC messages are built by hand (header blocks with hpack), so that
they can lie about lengths, streams and states. The buckets' gRPC calls may carry the
stack's shared secret, so that malformed messages reach the handlers and not only the
authentication hook; so may heartbeats to the membership port, but those are always
malformed (a valid one would register a bucket that does not exist).
"""

from __future__ import annotations

import random
import struct
import uuid

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
TLS_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"

BUCKET_METHODS = ("Put", "Get", "Delete", "List", "GetUsage", "Verify")
HEALTH_METHODS = ("Check", "List", "Watch")


def h2_frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return (
        struct.pack("!I", n & 0xFFFFFF)[1:]
        + bytes([kind & 0xFF, flags & 0xFF])
        + struct.pack("!I", stream)
        + payload
    )


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def pb_int(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def grpc_message(rng: random.Random, body: bytes) -> bytes:
    """One length-prefixed gRPC message, now and then lying (length, compression flag)."""
    kind = rng.random()
    if kind < 0.7:
        return b"\0" + struct.pack("!I", len(body)) + body
    if kind < 0.8:
        return b"\1" + struct.pack("!I", len(body)) + body
    if kind < 0.9:
        return b"\0" + struct.pack("!I", len(body) + rng.randint(1, 1 << 20)) + body
    return b"\0" + struct.pack("!I", 0xFFFFFFFF) + body[:10]


def fragment_id(rng: random.Random) -> bytes:
    return rng.choice(
        (
            f"{uuid.UUID(int=rng.getrandbits(128)).hex}.{rng.randint(0, 5)}".encode(),
            f"{uuid.UUID(int=rng.getrandbits(128)).hex}.99999999999".encode(),
            b"../../bucket-id",
            b"",
            b"x" * 5000,
            b"abc.0",
            b"\xff\xfe.1",
        )
    )


def request_body(rng: random.Random, method: str) -> bytes:
    """A protobuf request for ``method``: well-formed with odd values, or garbage."""
    if rng.random() < 0.2:
        return rng.randbytes(rng.randint(0, 200))
    big = rng.choice((0, 1, 100, 2**32 - 1, 2**63, 2**64 - 1))
    if method == "Put":
        data = rng.randbytes(rng.randint(0, 300))
        return pb_bytes(1, fragment_id(rng)) + pb_int(2, rng.choice((len(data), big))) + pb_bytes(3, data)
    if method in ("Get", "Verify"):
        return pb_bytes(1, fragment_id(rng)) + pb_int(2, big)
    if method in ("Delete", "List"):
        return pb_bytes(1, rng.choice((uuid.UUID(int=rng.getrandbits(128)).hex.encode(), b"", b"../x"))) + (
            pb_bytes(2, fragment_id(rng)) if method == "Delete" else b""
        )
    if method == "Beat":
        # Never a well-formed id with a well-formed address: with the secret, that would
        # register a bucket that does not exist.
        bad_id = rng.choice((b"", b"x" * 100, b"bad id!", b"fuzz\x00", b"../x", b"\xff\xfe"))
        bad_address = rng.choice(
            (b"", b"nohost", b"h:", b":1", b"h:0", b"h:99999", b"h:abc", b"x" * 400 + b":1")
        )
        bucket_id, address = (bad_id, b"127.0.0.1:1") if rng.random() < 0.5 else (b"fuzz-bucket", bad_address)
        usage = pb_int(1, big) + pb_int(2, big)
        return (
            pb_bytes(1, bucket_id) + pb_bytes(2, address) + pb_bytes(3, usage) + pb_int(4, rng.randint(0, 1))
        )
    if method in ("Check", "Watch"):
        return pb_bytes(1, rng.choice((b"", b"karma8.v1.Bucket", b"nope", b"\xff")))
    return b""


def grpc_call(rng: random.Random, service: str, secret: str | None) -> bytes:
    """Preface, SETTINGS, then one or a few calls: headers (sometimes odd) and messages."""
    out = bytearray(PREFACE + h2_frame(SETTINGS, 0, 0, b""))
    encoder = hpack.Encoder()
    for i in range(rng.choice((1, 1, 1, 2, 5))):
        stream = 2 * i + 1
        if service == "bucket":
            health = rng.random() < 0.2
            method = rng.choice(HEALTH_METHODS if health else BUCKET_METHODS)
            path = f"/grpc.health.v1.Health/{method}" if health else f"/karma8.v1.Bucket/{method}"
        else:
            method = "Beat"
            path = "/karma8.v1.Membership/Beat"
        if rng.random() < 0.1:
            path = rng.choice(("/", "/nope/Nope", "/karma8.v1.Bucket/", "x" * 3000, path.lower()))
        headers = [
            (":method", rng.choice(("POST", "POST", "POST", "GET"))),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", rng.choice(("application/grpc", "application/grpc", "application/json", ""))),
            ("te", "trailers"),
        ]
        if secret is not None:
            headers.append(("authorization", f"Bearer {secret}"))
        elif rng.random() < 0.5:
            headers.append(
                ("authorization", rng.choice(("Bearer wrong", "Bearer ", "Basic eA==", "x" * 5000)))
            )
        if rng.random() < 0.15:
            headers.append(("grpc-timeout", rng.choice(("1n", "99999999H", "abc", "0S", "-1m"))))
        if rng.random() < 0.1:
            headers.append(("grpc-encoding", rng.choice(("gzip", "identity", "nope"))))
        if rng.random() < 0.05:
            headers.append(("X-Upper", "not allowed in HTTP/2"))
        block = encoder.encode(headers)
        out += h2_frame(HEADERS, END_HEADERS, stream, block)
        messages = b"".join(
            grpc_message(rng, request_body(rng, method)) for _ in range(rng.choice((0, 1, 1, 2)))
        )
        out += h2_frame(DATA, END_STREAM if rng.random() < 0.8 else 0, stream, messages)
        if rng.random() < 0.1:
            out += h2_frame(RST_STREAM, 0, stream, struct.pack("!I", rng.choice((0, 1, 8))))
    return bytes(out)


def h2_garbage_frame(rng: random.Random) -> bytes:
    """One HTTP/2 frame that is odd, invalid or out of place."""
    kind = rng.randrange(16)
    stream = rng.choice((0, 1, 2, 3, 0x7FFFFFFF, 0x80000001))
    if kind == 0:
        ident = rng.randint(0, 10)
        value = rng.choice((0, 1, 16383, 16384, 2**24, 2**31 - 1, 2**31, 2**32 - 1))
        return h2_frame(SETTINGS, 0, 0, struct.pack("!HI", ident, value))
    if kind == 1:
        return h2_frame(SETTINGS, 1, 0, b"\0" * 6)  # an ACK with a payload
    if kind == 2:
        return h2_frame(SETTINGS, 0, rng.choice((0, 1)), b"\0" * rng.randint(1, 5))
    if kind == 3:
        return h2_frame(WINDOW_UPDATE, 0, stream, struct.pack("!I", rng.choice((0, 1, 2**31 - 1))))
    if kind == 4:
        return h2_frame(PING, rng.choice((0, 1)), stream, rng.randbytes(rng.choice((8, 7, 9))))
    if kind == 5:
        return h2_frame(RST_STREAM, 0, stream, struct.pack("!I", rng.randint(0, 20)))
    if kind == 6:
        return h2_frame(GOAWAY, 0, 0, struct.pack("!II", rng.randint(0, 9), rng.randint(0, 20)) + b"bye")
    if kind == 7:
        return h2_frame(PRIORITY, 0, stream, struct.pack("!IB", stream, 16))
    if kind == 8:
        return h2_frame(
            HEADERS, rng.choice((0, END_HEADERS, END_STREAM)), stream, rng.randbytes(rng.randint(0, 50))
        )
    if kind == 9:
        return h2_frame(CONTINUATION, rng.choice((0, END_HEADERS)), stream, rng.randbytes(20))
    if kind == 10:
        return h2_frame(DATA, rng.choice((0, END_STREAM, PADDED)), stream, rng.randbytes(rng.randint(0, 100)))
    if kind == 11:
        return h2_frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack("!I", 2) + b"\x82")
    if kind == 12:
        return h2_frame(rng.randint(10, 255), rng.randint(0, 255), stream, rng.randbytes(rng.randint(0, 30)))
    if kind == 13:  # longer than the default SETTINGS_MAX_FRAME_SIZE, or lying about it
        return h2_frame(DATA, 0, 1, rng.randbytes(rng.randint(0, 64)), length=rng.choice((16385, 2**24 - 1)))
    if kind == 14:
        return h2_frame(HEADERS, END_HEADERS | PADDED, 1, b"\xff" + b"\x82")  # padding longer than the frame
    return rng.randbytes(rng.randint(1, 30))


def h2_payload(rng: random.Random, family: str, secret: str | None, service: str) -> bytes:
    if family == "random":
        return rng.randbytes(rng.randint(1, 4096))
    if family == "preface_cut":
        return PREFACE[: rng.randint(1, len(PREFACE) - 1)]
    if family == "preface_garbage":
        return PREFACE + rng.randbytes(rng.randint(1, 512))
    if family == "h2_frames":
        frames = b"".join(h2_garbage_frame(rng) for _ in range(rng.randint(1, 8)))
        return PREFACE + h2_frame(SETTINGS, 0, 0, b"") + frames
    if family == "rapid_reset":
        encoder, out = hpack.Encoder(), bytearray(PREFACE + h2_frame(SETTINGS, 0, 0, b""))
        block = encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", "/karma8.v1.Bucket/List")]
        )
        for i in range(rng.randint(10, 300)):
            out += h2_frame(HEADERS, END_HEADERS, 2 * i + 1, block)
            out += h2_frame(RST_STREAM, 0, 2 * i + 1, struct.pack("!I", 8))
        return bytes(out)
    if family == "http1":
        return rng.choice(
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /karma8.v1.Bucket/Put HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            )
        )
    if family == "tls":
        return TLS_HELLO + rng.randbytes(64)
    return grpc_call(rng, service, secret)


H2_FAMILIES = (
    "random",
    "preface_cut",
    "preface_garbage",
    "h2_frames",
    "h2_frames",
    "grpc_call",
    "grpc_call",
    "grpc_call",
    "rapid_reset",
    "http1",
    "tls",
)


def http_payload(rng: random.Random, family: str) -> bytes:
    """An HTTP/1 request for a metrics port (``valid`` ones must be answered)."""
    if family == "valid":
        method = rng.choice((b"GET", b"GET", b"HEAD"))
        path = rng.choice((b"/metrics", b"/healthz", b"/ready", b"/nope", b"/metrics?x=1"))
        version = rng.choice((b"HTTP/1.0", b"HTTP/1.1"))
        extra = rng.choice((b"", b"Accept-Encoding: gzip\r\n", b"Connection: close\r\n"))
        return method + b" " + path + b" " + version + b"\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
    if family == "odd_request":
        method = rng.choice((b"POST", b"FOO", b"get", b"", b"G\x00ET", b"X" * 5000, b"OPTIONS", b"DELETE"))
        path = rng.choice(
            (b"/metrics", b"*", b"/%00", b"/../../etc/passwd", b"//metrics", b"/\xff", b"http://x/metrics")
        )
        version = rng.choice((b"HTTP/1.1", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1x", b"", b"HTTP/1000.1"))
        return method + b" " + path + b" " + version + b"\r\nHost: x\r\n\r\n"
    if family == "big_headers":
        kind = rng.randrange(3)
        if kind == 0:
            return (
                b"GET /metrics HTTP/1.1\r\nX-Big: " + b"v" * rng.choice((8000, 70000, 300000)) + b"\r\n\r\n"
            )
        if kind == 1:
            many = b"".join(b"X-%d: v\r\n" % i for i in range(rng.choice((99, 101, 2000))))
            return b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n"
        return b"GET /" + b"m" * rng.choice((8000, 70000)) + b" HTTP/1.1\r\n\r\n"
    if family == "body_tricks":
        return rng.choice(
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 1000\r\n\r\nshort",
                b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n",
                b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\n folded: header\r\nNoColon\r\n\r\n",
            )
        )
    if family == "pipelined":
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        return one * rng.randint(2, 20)
    if family == "h2_preface":
        return PREFACE + h2_frame(SETTINGS, 0, 0, b"")
    if family == "tls":
        return TLS_HELLO + rng.randbytes(64)
    return rng.randbytes(rng.randint(1, 4096))


HTTP_FAMILIES = (
    "valid",
    "valid",
    "odd_request",
    "big_headers",
    "body_tricks",
    "pipelined",
    "h2_preface",
    "tls",
    "random",
)
