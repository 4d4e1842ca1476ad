"""Catalogues of hostile frames and handshakes for the WebSocket sessions (no I/O).

Frames of every kind the RFC allows and many it forbids: data around ``max_frame``,
fragmented messages (also above the limit in total), control frames too long or
fragmented, close frames with odd codes and reasons, reserved opcodes and bits,
unmasked frames, invalid UTF-8, lengths that lie. Handshakes: bytes before the request,
odd request lines and headers, oversized heads, frames in the same write.
"""

from __future__ import annotations

from fuzz_wire import BINARY, CLOSE, CONT, PING, PONG, TEXT, close_payload, encode_frame
from fuzz_ws_cases import Frame, Gen, Raw, Read, Step

# -- frames ----------------------------------------------------------------------------------

CLOSE_CODES = (None, 0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011)
CLOSE_CODES_MORE = (1012, 1013, 1014, 1015, 1016, 2999, 3000, 3999, 4000, 4400, 4999, 5000, 65535)


def close_frame(g: Gen) -> Frame:
    code = g.rng.choice(CLOSE_CODES + CLOSE_CODES_MORE)
    reason = g.rng.choice((b"", b"bye", "é".encode(), b"\xff\xfe", b"r" * 123, b"r" * 124))
    payload = close_payload(code, reason) if code is not None else b""
    if g.rng.random() < 0.05:
        payload = b"\x03"  # a 1-byte close payload
    return Frame(CLOSE, payload, label=f"close {code}")


def hostile_frames(g: Gen, count: int) -> list[Step]:
    """``count`` items from the frame catalogue (an item may be several steps)."""
    steps: list[Step] = []
    for _ in range(count):
        steps += _one_hostile(g)
        if g.rng.random() < 0.3:
            steps.append(g.pause())
    return steps


def _one_hostile(g: Gen) -> list[Step]:
    f, rng = g.limits.max_frame, g.rng
    kind = rng.randrange(26)
    if kind == 0:
        return [Frame(BINARY, rng.randbytes(rng.randint(1, 1024)), label="data")]
    if kind == 1:
        return [Frame(BINARY, rng.randbytes(f), label="max_frame")]
    if kind in (2, 3):
        return [Frame(BINARY, rng.randbytes(g.oversize()), label="oversized")]
    if kind == 4:
        return [Frame(BINARY, b"", label="end")]
    if kind == 5:
        text = rng.choice(("{", "hello", '{"size": 1}', "\u20ac" * 10, "\U0001f600"))
        return [Frame(TEXT, text.encode(), label="text")]
    if kind == 6:
        return [Frame(TEXT, b"a" * rng.choice((f, f + 1, 2 * f)), label="long text")]
    if kind == 7:  # a fragmented message, within the limit or above it in total
        total = rng.choice((rng.randint(2, f), f, f + 1, 2 * f))
        cut = rng.randint(1, total - 1)
        first = rng.choice((BINARY, TEXT))
        body = rng.randbytes(total) if first == BINARY else b"b" * total
        return [Frame(first, body[:cut], fin=False), Frame(CONT, body[cut:], label="fragmented")]
    if kind == 8:  # a multi-byte character split across two fragments
        return [Frame(TEXT, b"\xe2\x82", fin=False), Frame(CONT, b"\xac", label="split UTF-8")]
    if kind == 9:
        return [Frame(CONT, rng.randbytes(10), label="continuation without start")]
    if kind == 10:
        return [Frame(BINARY, b"x", fin=False), Frame(BINARY, b"y", label="new message mid-message")]
    if kind == 11:
        return [
            Frame(BINARY, b"x", fin=False),
            Frame(PING, b"p"),
            Frame(CONT, b"y", label="ping mid-message"),
        ]
    if kind == 12:
        return [Frame(PING, rng.randbytes(rng.randint(0, 125)), label="ping")]
    if kind == 13:
        return [Frame(PONG, rng.randbytes(rng.randint(0, 125)), label="pong")]
    if kind == 14:
        return [Frame(PING, rng.randbytes(126), label="ping too long")]
    if kind == 15:
        return [Frame(PING, b"p", fin=False, label="fragmented ping")]
    if kind in (16, 17):
        return [close_frame(g)]
    if kind == 18:
        opcode = rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF))
        return [Frame(opcode, rng.randbytes(rng.randint(0, 20)), label="reserved opcode")]
    if kind == 19:
        return [Frame(BINARY, b"data", rsv=rng.randint(1, 7), label="reserved bits")]
    if kind == 20:
        return [Frame(BINARY, b"data", masked=False, label="unmasked")]
    if kind == 21:
        bad = rng.choice((b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xe2\x82"))
        return [Frame(TEXT, bad, label="invalid UTF-8")]
    if kind == 22:
        n = rng.randint(0, 100)
        return [
            Raw(encode_frame(BINARY, b"x" * n, length=n + rng.randint(1, 5000)), "length above the payload")
        ]
    if kind == 23:
        return [Raw(encode_frame(BINARY, b"", length=2**63 + 1), "64-bit length with the top bit set")]
    if kind == 24:
        return [Frame(BINARY, b"wide", wide=True, label="non-minimal length")]
    return [Raw(rng.randbytes(rng.randint(1, 64)), "garbage")]


# -- handshakes ----------------------------------------------------------------------------


def handshake_variant(g: Gen) -> tuple[bytes, list[Step], bool]:
    """(handshake bytes, steps after it, pipelined) of a hostile or odd handshake."""
    rng, path = g.rng, "/status"
    std = g.standard_handshake(path)
    head, _, _ = std.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")

    def build(request_line: bytes, headers: list[bytes]) -> bytes:
        return b"\r\n".join([request_line, *headers]) + b"\r\n\r\n"

    def without(prefix: bytes) -> list[bytes]:
        return [h for h in lines[1:] if not h.lower().startswith(prefix)]

    kind = rng.randrange(22)
    read: list[Step] = [Read()]
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200)) + std, read, False
    if kind == 1:
        return b"\r\n\r\n" + std, read, False
    if kind == 2:
        version = rng.choice((b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1.1x", b""))
        return build(b"GET " + path.encode() + b" " + version, lines[1:]), read, False
    if kind == 3:
        method = rng.choice((b"POST", b"get", b"CONNECT", b"PRI", b"X" * 300))
        return build(method + b" /status HTTP/1.1", lines[1:]), read, False
    if kind == 4:
        return build(lines[0], without(b"upgrade")), read, False
    if kind == 5:
        return build(lines[0], without(b"sec-websocket-key")), read, False
    if kind == 6:
        version = rng.choice((b"8", b"12", b"99", b"abc", b""))
        return (
            build(lines[0], [*without(b"sec-websocket-version"), b"Sec-WebSocket-Version: " + version]),
            read,
            False,
        )
    if kind == 7:
        key = rng.choice((b"short", b"!!!!", b"", b"A" * 200))
        return build(lines[0], [*without(b"sec-websocket-key"), b"Sec-WebSocket-Key: " + key]), read, False
    if kind == 8:
        size = rng.choice((8 * 1024, 20 * 1024, 100 * 1024))
        return build(lines[0], [*lines[1:], b"X-Big: " + b"v" * size]), read, False
    if kind == 9:
        many = [b"X-H%d: v" % i for i in range(rng.choice((100, 1000, 5000)))]
        return build(lines[0], lines[1:] + many), read, False
    if kind == 10:
        bad = rng.choice((b"Bad Name: v", b"X: a\x00b", b" folded", b"X:\xff\xfe", b"NoColon"))
        return build(lines[0], [*lines[1:], bad]), read, False
    if kind == 11:
        return std.replace(b"\r\n", b"\n"), read, False
    if kind == 12:
        extra = rng.choice((b"Sec-WebSocket-Protocol: chat", b"Sec-WebSocket-Extensions: permessage-deflate"))
        return build(lines[0], [*lines[1:], extra]), read, False
    if kind == 13:
        body = rng.randbytes(10)
        return build(lines[0], [*lines[1:], b"Content-Length: 10"]) + body, read, False
    if kind == 14:
        return (
            build(lines[0], [*lines[1:], b"Transfer-Encoding: chunked"]) + b"5\r\nhello\r\n0\r\n\r\n",
            read,
            False,
        )
    if kind == 15:
        auth = rng.choice((b"Bearer x", b"Bearer ", b"Basic Zm9vOmJhcg==", b"Bearer " + b"t" * 9000))
        return build(lines[0], [*lines[1:], b"Authorization: " + auth]), read, False
    if kind == 16:  # the request and frames in one write
        return std, [Frame(PING, b"early"), Read()], True
    if kind == 17:
        return std + g.standard_handshake(path), read, False
    if kind == 18:
        return b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(64), read, False
    if kind == 19:
        return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", read, False
    if kind == 20:
        raw_target = "/stat/fz/ü".encode()
        return build(b"GET " + raw_target + b" HTTP/1.1", lines[1:]), read, False
    return build(lines[0], without(b"host")), read, False
