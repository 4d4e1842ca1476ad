"""The karma8 client library (trio), used by the CLI and by the tests.

Every operation opens one WebSocket connection to the API server, as docs/protocol.md
describes, or goes over a session's (``Client.session()``). Uploads and downloads
stream with constant memory and verify sha256 end to end; a download is written to a
temporary file beside its destination and renamed into place only once complete and
verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

from karma8 import speedups, wsfix
from karma8.config import ClientConfig
from karma8.core.auth import AUTHORIZATION, bearer
from karma8.core.listing import MAX_PAGE
from karma8.core.names import encode_name, validate_name
from karma8.core.protocol import UploadHeader, decode_reply, encode_session_request, encode_upload_header
from karma8.errors import BadRequest, ChecksumMismatch, ConnectionFailed
from karma8.tls import client_tls
from karma8.wsfix import close_transport

__all__ = ["Client", "FileInfo", "Progress"]

#: A download writes to its file once this much data has arrived (and at the end).
SINK_BUFFER = 1024 * 1024

#: Called with (bytes transferred so far, total bytes).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A stored file as the server describes it."""

    name: str
    size: int
    sha256: str
    #: Upload replies: the coding scheme (``"6+2 (isa_l_rs_cauchy)"``) and how many of
    #: the file's fragments beyond the data parts were written (it survives that many
    #: lost buckets now; repair raises it to the scheme's parity).
    scheme: str = ""
    spare: int = 0


class _Source:
    """A file being uploaded, read and hashed in worker-thread calls: opening it reads and
    hashes its first chunk too, so a small file takes one thread hand-off."""

    def __init__(self, src: Path, chunk: int) -> None:
        self._chunk = chunk
        self.hasher = hashlib.sha256()
        self._file: BinaryIO | None = src.open("rb")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.first = self.read()
        except BaseException:
            self.close()
            raise

    @property
    def more(self) -> bool:
        """Whether there may be more to read (the last read filled its chunk)."""
        return self._file is not None

    def read(self) -> bytes:
        assert self._file is not None
        data = self._file.read(self._chunk)
        self.hasher.update(data)
        if len(data) < self._chunk:
            self.close()
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Sink:
    """A download's temporary file, hashed and written in few worker-thread calls: data is
    held until ``SINK_BUFFER`` bytes gather, so a small file is hashed, opened, written,
    fsynced, closed and renamed into place in one call (profiled: each thread hand-off
    cost more client CPU than writing a small frame), and hashing stays off the event loop.
    """

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._file: BinaryIO | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._hasher = hashlib.sha256()
        self.received = 0

    async def write(self, data: bytes) -> None:
        self._held.append(data)
        self._held_size += len(data)
        self.received += len(data)
        if self._held_size >= SINK_BUFFER:
            await trio.to_thread.run_sync(self._write_held)

    def _write_held(self) -> None:
        if self._file is None:
            self._file = self._tmp.open("wb")
        for data in self._held:
            self._hasher.update(data)
        self._file.writelines(self._held)
        self._held.clear()
        self._held_size = 0

    def commit(self, dst: Path, name: str, info: FileInfo) -> None:
        """Write what is held, check the size and sha256 against ``info``, fsync, and
        rename over ``dst`` (blocking).

        Raises:
            ChecksumMismatch: the data is not what the server said it sent.
        """
        self._write_held()
        digest = self._hasher.hexdigest()
        if self.received != info.size or digest != info.sha256:
            raise ChecksumMismatch(
                f"{name!r}: received {self.received} bytes with sha256 "
                f"{digest}, expected {info.size} / {info.sha256}"
            )
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tmp.rename(dst)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class Client:
    """A client of one API server."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        """Raises ConfigError when ``tls_ca`` cannot be loaded (for a ``wss://`` URL)."""
        wsfix.apply()  # a refused TLS handshake fails at once, with its reason
        speedups.apply_websocket()  # fast WebSocket masking
        self.config = config or ClientConfig()
        self._ssl = client_tls(self.config)
        token = self.config.token.get_secret_value()
        self._headers = [(AUTHORIZATION.encode(), bearer(token).encode())] if token else None

    @contextlib.asynccontextmanager
    async def _connect(self, path: str) -> AsyncIterator[WebSocketConnection]:
        url = self.config.api.rstrip("/") + path
        connected = False
        with self._translated(lambda: connected):
            async with open_websocket_url(
                url,
                self._ssl,
                extra_headers=self._headers,
                max_message_size=self.config.max_message,
                receive_buffer_size=self.config.receive_buffer,
                connect_timeout=self.config.connect_timeout,
            ) as ws:
                connected = True
                try:
                    yield ws
                finally:
                    await close_transport(ws)

    @contextlib.contextmanager
    def _translated(self, connected: Callable[[], bool]) -> Iterator[None]:
        """Connection errors as :class:`ConnectionFailed`."""
        try:
            yield
        except (OSError, HandshakeError) as exc:
            if connected() and isinstance(exc, OSError):
                raise  # a local error of the caller's (writing the download), not the connection
            # trio-websocket wraps the socket error in a HandshakeError with no message.
            reason = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
            raise ConnectionFailed(f"cannot reach the API server at {self.config.api}: {reason}") from None
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the API server closed the connection ({exc.reason})") from None

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Client]:
        """A client whose operations share one connection (``/session``), one at a time:
        no connection set up per operation. A connection that an error ended is opened
        again for the next operation."""
        async with trio.open_nursery() as nursery:
            shared = _SessionClient(self, nursery)
            try:
                yield shared
            finally:
                await shared.aclose()

    async def _reply(self, ws: WebSocketConnection) -> dict[str, Any]:
        """The next frame, which must be a reply; raises the server's error."""
        with trio.fail_after(self.config.idle_timeout):
            message = await ws.get_message()
        if not isinstance(message, str):
            raise BadRequest("expected a reply frame, got data")
        return decode_reply(message)

    async def _query(self, path: str) -> dict[str, Any]:
        async with self._connect(path) as ws:
            return await self._reply(ws)

    # -- transfers ---------------------------------------------------------------------

    async def upload(
        self,
        src: Path,
        name: str | None = None,
        *,
        sha256: str | None = None,
        progress: Progress | None = None,
    ) -> FileInfo:
        """Upload the file ``src`` as ``name`` (default: its file name).

        ``sha256``, if given, is sent ahead and checked by the server before it commits.
        The sha256 the server computed is always compared with the one computed here.
        """
        name = validate_name(name if name is not None else src.name)
        source = await trio.to_thread.run_sync(_Source, src, self.config.frame_size)
        try:
            async with self._connect(f"/upload/{encode_name(name)}") as ws:
                try:
                    await ws.send_message(encode_upload_header(UploadHeader(source.size, sha256)))
                    sent = 0
                    chunk = source.first
                    while chunk:
                        await ws.send_message(chunk)
                        sent += len(chunk)
                        if progress is not None:
                            progress(sent, source.size)
                        chunk = await trio.to_thread.run_sync(source.read) if source.more else b""
                    await ws.send_message(b"")
                except ConnectionClosed:
                    # The server gave up early: its error frame is still queued.
                    await self._reply(ws)
                    raise
                reply = await self._reply(ws)
        finally:
            source.close()
        digest = source.hasher.hexdigest()
        if reply.get("sha256") != digest:
            raise ChecksumMismatch(f"server stored sha256 {reply.get('sha256')}, sent data has {digest}")
        return FileInfo(
            reply["name"],
            reply["size"],
            reply["sha256"],
            str(reply.get("scheme", "")),
            int(reply.get("spare", 0)),
        )

    async def download(self, name: str, dst: Path, *, progress: Progress | None = None) -> FileInfo:
        """Download ``name`` to ``dst`` (written to a temporary file, then renamed)."""
        validate_name(name)
        sink = _Sink(dst.with_name(f".{dst.name}.karma8-{os.getpid()}.part"))
        try:
            async with self._connect(f"/download/{encode_name(name)}") as ws:
                header = await self._reply(ws)
                info = FileInfo(header["name"], header["size"], header["sha256"])
                while True:
                    with trio.fail_after(self.config.idle_timeout):
                        message = await ws.get_message()
                    if isinstance(message, str):
                        decode_reply(message)  # an error frame mid-download raises
                        raise BadRequest("unexpected text frame in a download")
                    if not message:
                        break
                    await sink.write(message)
                    if progress is not None:
                        progress(sink.received, info.size)
            await trio.to_thread.run_sync(sink.commit, dst, name, info)
        except BaseException:
            sink.discard()  # synchronous on purpose: it must happen even when cancelled
            raise
        return info

    # -- queries -----------------------------------------------------------------------

    async def list_page(
        self,
        prefix: str = "",
        *,
        delimiter: str = "",
        start_after: str = "",
        continuation: str | None = None,
        limit: int = MAX_PAGE,
    ) -> dict[str, Any]:
        """One page of the listing: ``files``, ``prefixes`` (common prefixes under
        ``delimiter``), ``truncated`` and ``next`` (the ``continuation`` of the next page)."""
        params = {"prefix": prefix, "limit": str(limit)}
        if delimiter:
            params["delimiter"] = delimiter
        if continuation is not None:
            params["continuation"] = continuation
        elif start_after:
            params["start_after"] = start_after
        reply = await self._query("/files?" + urlencode(params, quote_via=quote))
        reply.setdefault("prefixes", [])  # a server before paging answers the whole listing
        reply.setdefault("next", None)
        return reply

    async def walk(
        self, prefix: str = "", *, delimiter: str = "", start_after: str = "", page_size: int = MAX_PAGE
    ) -> AsyncIterator[dict[str, Any]]:
        """Every file under ``prefix`` by name, page by page (memory bounded by a page):
        file entries, and ``{"prefix": P}`` for each common prefix under ``delimiter``."""
        continuation: str | None = None
        while True:
            page = await self.list_page(
                prefix,
                delimiter=delimiter,
                start_after=start_after,
                continuation=continuation,
                limit=page_size,
            )
            rolled = [{"prefix": p} for p in page["prefixes"]]
            for entry in heapq.merge(page["files"], rolled, key=lambda e: e.get("name", e.get("prefix"))):
                yield entry
            continuation = page["next"]
            if continuation is None:
                return

    async def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every committed file under ``prefix``, in one list (see :meth:`walk` for many)."""
        return [entry async for entry in self.walk(prefix)]

    async def stat(self, name: str) -> dict[str, Any]:
        """A file's size, sha256 and where each part lives."""
        return await self._query(f"/stat/{encode_name(name)}")

    async def delete(self, name: str) -> None:
        """Delete ``name`` (its fragments are removed in the background)."""
        await self._query(f"/delete/{encode_name(name)}")

    async def verify(self, name: str = "") -> dict[str, Any]:
        """Scrub one file (or all): every fragment is read by its bucket and checked."""
        return await self._query(f"/verify/{encode_name(name)}" if name else "/verify")

    async def status(self) -> dict[str, Any]:
        """The buckets the API server knows, live or not, with their usage."""
        return await self._query("/status")

    async def repair(self) -> dict[str, Any]:
        """Have the repairer look at its whole queue now; the queue in numbers."""
        return await self._query("/repair")

    async def rebalance(self, dry_run: bool = False) -> dict[str, Any]:
        """Ask for a rebalance now (it runs in the server); with ``dry_run``, only its plan."""
        return await self._query("/rebalance?dry_run=1" if dry_run else "/rebalance")


class _SessionClient(Client):
    """A :class:`Client` whose operations go over one ``/session`` connection."""

    def __init__(self, parent: Client, nursery: trio.Nursery) -> None:
        # The parent's settings as they are (no second TLS context, no patches again).
        self.config = parent.config
        self._ssl = parent._ssl
        self._headers = parent._headers
        self._nursery = nursery
        self._ws: WebSocketConnection | None = None
        self._lock = trio.Lock()

    @contextlib.asynccontextmanager
    async def _connect(self, path: str) -> AsyncIterator[WebSocketConnection]:
        async with self._lock:
            connected = False
            with self._translated(lambda: connected):
                ws = self._ws
                if ws is None or ws.closed is not None:
                    self._ws = None
                    ws = self._ws = await self._open()
                connected = True
                try:
                    await ws.send_message(encode_session_request(path))
                    yield ws
                except BaseException:
                    # The operation failed, perhaps half-way: the connection is out of
                    # step (or the server closed it). The next operation opens another.
                    self._ws = None
                    await close_transport(ws)
                    raise

    async def _open(self) -> WebSocketConnection:
        with trio.fail_after(self.config.connect_timeout):
            return await connect_websocket_url(
                self._nursery,
                self.config.api.rstrip("/") + "/session",
                self._ssl,
                extra_headers=self._headers,
                max_message_size=self.config.max_message,
                receive_buffer_size=self.config.receive_buffer,
            )

    async def aclose(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with trio.move_on_after(self.config.connect_timeout, shield=True):
                with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                    await ws.aclose()
            await close_transport(ws)
