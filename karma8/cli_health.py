"""``karma8 health``: one probe of a server, for container health checks.

Kept apart from the rest of the CLI and light to import: an HTTP probe needs only
``http.client``, a gRPC probe grpclib and the generated health messages.
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

#: Body bytes of an HTTP answer read for the report line.
BODY_LIMIT = 4096

USAGE = "TARGET must be http://HOST:PORT/PATH or grpc://HOST:PORT"


class ProbeFailed(Exception):
    """The target is unhealthy, unreachable or malformed; the message is the report line."""


def probe(target: str, timeout: float) -> str:
    """Probe ``target`` once within about ``timeout`` seconds; return the report line.

    Raises:
        ProbeFailed: not healthy (HTTP status other than 200, gRPC status other than
            SERVING), no answer in time, or a malformed target.
    """
    try:
        parts = urlsplit(target)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ProbeFailed(f"{USAGE} ({exc})") from None
    if parts.scheme not in ("http", "grpc") or not host or (parts.scheme == "grpc" and port is None):
        raise ProbeFailed(f"{USAGE}, not {target!r}")
    if parts.scheme == "http":
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return _http(target, host, port or 80, path, timeout)
    assert port is not None
    return _grpc(target, host, port, parts.path.strip("/"), timeout)


def _http(target: str, host: str, port: int, path: str, timeout: float) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "karma8-health"})
        reply = conn.getresponse()
        body = reply.read(BODY_LIMIT).decode("utf-8", "replace").strip()
    except TimeoutError:
        raise ProbeFailed(f"{target}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ProbeFailed(f"{target}: cannot connect ({exc.strerror or exc})") from None
    except http.client.HTTPException as exc:
        raise ProbeFailed(f"{target}: not an HTTP answer ({type(exc).__name__})") from None
    finally:
        conn.close()
    said = body.splitlines()[0][:200] if body else reply.reason
    line = f"{target}: {reply.status} {said}"
    if reply.status != 200:
        raise ProbeFailed(line)
    return line


def _grpc(target: str, host: str, port: int, service: str, timeout: float) -> str:
    import asyncio

    from karma8.rpc.health import Unhealthy, check_health

    async def ask() -> str:
        return await asyncio.wait_for(check_health(host, port, service), timeout)

    try:
        status = asyncio.run(ask())
    except TimeoutError:
        raise ProbeFailed(f"{target}: no answer within {timeout:g} s") from None
    except Unhealthy as exc:
        raise ProbeFailed(f"{target}: {exc.message}") from None
    line = f"{target}: {status}"
    if status != "SERVING":
        raise ProbeFailed(line)
    return line
