"""Trio-facing gRPC client of one bucket server.

Every call crosses :class:`~karma8.rpc.bridge.Portal`. Streams are async context managers
whose exit runs *shielded*: when the trio task using a stream is cancelled, the grpclib
stream is still reset (RST_STREAM) before the exception propagates, so the bucket drops
its temporary file and stops writing before any cleanup runs. Without the shield a
cancelled task would cancel the exit itself, and the bucket would go on writing.

grpclib errors never leave this module: they become :class:`BucketUnavailable` (or
:class:`ChecksumMismatch` / :class:`BadRequest` where the bucket said so).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpclib.client
import grpclib.config
import grpclib.const
import grpclib.exceptions
import h2.exceptions
import trio

from karma8 import speedups
from karma8.core.records import Piece, StoredFragment, Usage
from karma8.errors import BucketUnavailable, ChecksumMismatch, FragmentNotFound, Internal, Karma8Error
from karma8.rpc import grpcfix
from karma8.rpc.auth import ChannelSecurity, attach_secret
from karma8.rpc.bridge import Portal, PortalClosed
from karma8.rpc.coalesce import Coalescer
from karma8.rpc.gen.karma8 import v1 as pb

log = logging.getLogger(__name__)

_PUT = "/karma8.v1.Bucket/Put"
_GET = "/karma8.v1.Bucket/Get"
_LIST = "/karma8.v1.Bucket/List"
_PUT_PIPE = "/karma8.v1.Bucket/PutManyStream"
_GET_PIPE = "/karma8.v1.Bucket/GetManyStream"
_DELETE_PIPE = "/karma8.v1.Bucket/DeleteManyStream"
_BOTH_WAYS = grpclib.const.Cardinality.STREAM_STREAM
_S = grpclib.const.Status
#: Fragments in one PutMany or GetMany, at most (a bucket takes up to 256) ...
BATCH_ITEMS = 64
#: ... and their bytes (one fragment bigger than this goes alone).
BATCH_BYTES = 4 * 1024 * 1024
Q = TypeVar("Q")
R = TypeVar("R")


@contextlib.contextmanager
def translate_errors(bucket_id: str) -> Iterator[None]:
    """Turn grpclib/network errors into karma8 errors."""
    try:
        yield
    except Karma8Error:
        raise
    except grpclib.exceptions.GRPCError as exc:
        detail = f"{exc.status.name}: {exc.message or ''}".rstrip(": ")
        if exc.status is _S.UNAUTHENTICATED:  # our bucket_secret is not the bucket's secret
            raise BucketUnavailable(bucket_id, "authentication failed") from None
        if exc.status is _S.DATA_LOSS:
            raise ChecksumMismatch(f"bucket {bucket_id}: {exc.message}") from None
        if exc.status is _S.NOT_FOUND:
            raise FragmentNotFound(bucket_id, detail) from None
        if exc.status is _S.INVALID_ARGUMENT:  # we sent something a bucket refuses: our bug
            raise Internal(f"bucket {bucket_id} refused the request: {exc.message}") from None
        raise BucketUnavailable(bucket_id, detail) from None
    except (
        grpclib.exceptions.StreamTerminatedError,
        grpclib.exceptions.ProtocolError,
        h2.exceptions.StreamClosedError,  # sending on a stream the bucket already ended
    ) as exc:
        raise BucketUnavailable(bucket_id, f"stream broken: {exc!r}") from None
    except (OSError, EOFError, PortalClosed) as exc:
        raise BucketUnavailable(bucket_id, f"unreachable: {exc}") from None
    except RuntimeError as exc:
        # uvloop's transports raise RuntimeError, not OSError, for a write after the
        # connection died ("unable to perform operation on <TCPTransport closed=True>").
        if "unable to perform operation" not in str(exc):
            raise
        raise BucketUnavailable(bucket_id, "connection lost") from None
    except AttributeError as exc:
        # grpclib's Connection.close() deletes its transport; a call that picked the
        # connection just before it was lost then fails creating its stream on it.
        if exc.name != "_transport":
            raise
        raise BucketUnavailable(bucket_id, "connection lost") from None


class FragmentWriter:
    """Sends one fragment's data; :meth:`finish` commits it on the bucket."""

    def __init__(self, portal: Portal, stream: Any, bucket_id: str, fragment_id: str, size: int, unit: int):
        self._portal = portal
        self._stream = stream
        self._bucket_id = bucket_id
        self._first: pb.PutRequest | None = pb.PutRequest(fragment_id=fragment_id, size=size, unit=unit)

    async def send(self, data: bytes, crcs: Sequence[int] = ()) -> None:
        """Send the next chunk (the first message also names the fragment).

        With a unit (format 2): whole units, and the crc32c of each.
        """
        if self._first is not None:
            message, self._first = self._first, None
            message.data = data
            message.crc32c = list(crcs)
        else:
            message = pb.PutRequest(data=data, crc32c=list(crcs))
        with translate_errors(self._bucket_id):
            await self._portal.run(_send_chunk, self._stream, message)

    async def finish(self) -> StoredFragment:
        """End the stream; the bucket fsyncs and renames the fragment into place."""
        if self._first is not None:  # an empty fragment still announces itself
            await self.send(b"")
        with translate_errors(self._bucket_id):
            await self._portal.run(_end_stream, self._stream)
            reply: pb.PutReply | None = await self._portal.run(self._stream.recv_message)
        if reply is None:
            raise BucketUnavailable(self._bucket_id, "Put ended without a reply")
        return StoredFragment(reply.fragment_id, reply.size, reply.sha256.hex())


class FragmentReader:
    """Receives one fragment's data in chunks."""

    def __init__(self, portal: Portal, stream: Any, bucket_id: str):
        self._portal = portal
        self._stream = stream
        self._bucket_id = bucket_id

    async def receive(self) -> Piece | None:
        """The next chunk (with its units' crc32c in format 2), or None at the end."""
        with translate_errors(self._bucket_id):
            reply: pb.GetReply | None = await self._portal.run(self._stream.recv_message)
        return None if reply is None else Piece(reply.data, reply.crc32c)


class _Pipe:
    """A long-lived bidirectional stream to a bucket that carries one batched call per
    message: a request, then its reply (PutManyStream, GetManyStream).

    Profiled on this machine: a unary grpclib call costs ~1 ms of CPU on each end (a
    stream set up, headers and trailers encoded and parsed), a message on an open stream
    ~0.05 ms on the client and ~0.1 ms on the bucket. Lives on the asyncio side; its one
    user (a coalescer's drain) sends a message only once it has the reply to the last.
    Any failure resets the stream; the next call opens a new one. A call that fails on a
    stream opened earlier (whose connection may have died meanwhile: a restarted bucket)
    is sent once more on a new stream; batched puts and gets may run twice.
    """

    def __init__(self, channel: Any, route: str, request: type, reply: type) -> None:
        self._channel = channel
        self._route = route
        self._request = request
        self._reply = reply
        self._stream: Any = None

    async def call(self, message: Any) -> Any:
        if self._stream is not None:
            try:
                return await self._exchange(message)
            except grpclib.exceptions.GRPCError:
                raise  # the bucket's answer, not a dead connection
            except Exception as exc:
                log.debug("pipe %s broke (%r): once more on a new stream", self._route, exc)
        return await self._exchange(message)

    async def _exchange(self, message: Any) -> Any:
        if self._stream is None:
            self._stream = await _start_stream(
                self._channel, self._route, _BOTH_WAYS, self._request, self._reply
            )
        stream = self._stream
        try:
            await stream.send_message(message)
            reply = await stream.recv_message()
            if reply is None:  # the bucket ended the stream: its status says why
                raise grpclib.exceptions.StreamTerminatedError("the bucket ended the stream")
        except BaseException as exc:
            self._stream = None
            await stream.__aexit__(type(exc), exc, exc.__traceback__)  # resets it; raises a status
            raise
        return reply

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            closing = ConnectionAbortedError("the client is closing")
            await stream.__aexit__(type(closing), closing, None)  # resets the stream


class BucketClient:
    """gRPC client of one bucket. Create with :func:`connect_bucket`; ``aclose()`` it."""

    def __init__(
        self,
        portal: Portal,
        bucket_id: str,
        address: str,
        channel: Any,
        close_timeout: float,
        call_timeout: float = 60.0,
    ):
        self._portal = portal
        self.bucket_id = bucket_id
        self.address = address
        self._channel = channel
        self._stub = pb.BucketStub(channel)
        self._close_timeout = close_timeout
        #: False once the bucket answered UNIMPLEMENTED to PutMany/GetMany (an older one).
        self.batches = True
        #: False once it answered UNIMPLEMENTED to PutManyStream/GetManyStream.
        self.pipes = True
        self._put_pipe = _Pipe(channel, _PUT_PIPE, pb.PutManyRequest, pb.PutManyReply)
        self._get_pipe = _Pipe(channel, _GET_PIPE, pb.GetManyRequest, pb.GetManyReply)
        self._delete_pipe = _Pipe(channel, _DELETE_PIPE, pb.DeleteManyRequest, pb.DeleteManyReply)
        limits = functools.partial(
            Coalescer,
            spawn=portal.start_soon,
            bucket_id=bucket_id,
            max_items=BATCH_ITEMS,
            max_bytes=BATCH_BYTES,
            timeout=call_timeout,
            cancel_wait=close_timeout,
        )
        self.puts: Coalescer[pb.PutRequest, StoredFragment] = limits(self._put_many)
        self.gets: Coalescer[pb.GetRequest, Piece] = limits(self._get_many)
        self.deletes: Coalescer[pb.DeleteRequest, int] = limits(self._delete_many)

    @contextlib.asynccontextmanager
    async def _open_stream(
        self, route: str, cardinality: grpclib.const.Cardinality, req: type, rep: type
    ) -> AsyncIterator[Any]:
        with translate_errors(self.bucket_id):
            stream = await self._portal.run(self._start_stream, route, cardinality, req, rep)
        try:
            yield stream
        except BaseException as exc:
            # Shielded: even a cancelled caller must reset the stream on the bucket.
            with trio.move_on_after(self._close_timeout, shield=True), contextlib.suppress(Exception):
                await self._portal.run(stream.__aexit__, type(exc), exc, exc.__traceback__)
            raise
        else:
            with translate_errors(self.bucket_id), trio.CancelScope(shield=True):
                await self._portal.run(stream.__aexit__, None, None, None)

    async def _start_stream(
        self, route: str, cardinality: grpclib.const.Cardinality, req: type, rep: type
    ) -> Any:
        return await _start_stream(self._channel, route, cardinality, req, rep)

    @contextlib.asynccontextmanager
    async def open_put(self, fragment_id: str, size: int, unit: int = 0) -> AsyncIterator[FragmentWriter]:
        """A client-streaming Put of one fragment of exactly ``size`` bytes (format 2 with a ``unit``)."""
        async with self._open_stream(
            _PUT, grpclib.const.Cardinality.STREAM_UNARY, pb.PutRequest, pb.PutReply
        ) as stream:
            yield FragmentWriter(self._portal, stream, self.bucket_id, fragment_id, size, unit)

    @contextlib.asynccontextmanager
    async def open_get(
        self, fragment_id: str, chunk_size: int, first_unit: int = 0
    ) -> AsyncIterator[FragmentReader]:
        """A server-streaming Get of one fragment, in chunks of ``chunk_size``, from ``first_unit``."""
        async with self._open_stream(
            _GET, grpclib.const.Cardinality.UNARY_STREAM, pb.GetRequest, pb.GetReply
        ) as stream:
            request = pb.GetRequest(fragment_id=fragment_id, chunk_size=chunk_size, first_unit=first_unit)
            with translate_errors(self.bucket_id):
                await self._portal.run(_send_last, stream, request)
            yield FragmentReader(self._portal, stream, self.bucket_id)

    async def put_whole(
        self, fragment_id: str, data: bytes, unit: int = 0, crcs: Sequence[int] = ()
    ) -> StoredFragment:
        """Put a whole fragment (a small one, where the calls cost more than the data),
        in one PutMany with the other puts queued for this bucket meanwhile.

        A cancelled caller takes its fragment back if it has not gone yet; if it has, the
        call goes on for the others, and the caller returns once it ended (at most the
        close timeout later), so that a cleanup after it finds what it stored.
        """
        request = pb.PutRequest(
            fragment_id=fragment_id, size=len(data), data=data, unit=unit, crc32c=list(crcs)
        )
        if not self.batches:
            return await self._put_one(request)
        return await self.puts.call(request, len(data))

    async def _put_one(self, request: pb.PutRequest) -> StoredFragment:
        """One whole fragment in a Put of its own: one trio/asyncio crossing."""
        with translate_errors(self.bucket_id):
            reply: pb.PutReply | None = await self._portal.run(self._put_whole, request)
        if reply is None:
            raise BucketUnavailable(self.bucket_id, "Put ended without a reply")
        return StoredFragment(reply.fragment_id, reply.size, reply.sha256.hex())

    async def _put_many(self, requests: list[pb.PutRequest]) -> list[StoredFragment | BaseException]:
        message = pb.PutManyRequest(items=requests)
        reply, each = await self._many(self._put_pipe, self._stub.put_many, message, self._put_one, requests)
        if each is not None:
            return each
        return [
            StoredFragment(r.fragment_id, r.size, r.sha256.hex()) if not s.code else self._item_error(s)
            for r, s in zip(reply.results, reply.statuses, strict=True)
        ]

    async def _get_many(self, requests: list[pb.GetRequest]) -> list[Piece | BaseException]:
        message = pb.GetManyRequest(items=requests)
        reply, each = await self._many(
            self._get_pipe, self._stub.get_many, message, self._get_joined, requests
        )
        if each is not None:
            return each
        return [
            Piece(r.data, r.crc32c) if not s.code else self._get_error(q, s)
            for q, r, s in zip(requests, reply.results, reply.statuses, strict=True)
        ]

    async def _many(
        self,
        pipe: _Pipe,
        call: Callable[[Any], Awaitable[Any]] | None,
        message: Any,
        one: Callable[[Q], Awaitable[R]],
        requests: list[Q],
    ) -> tuple[Any, list[R | BaseException] | None]:
        """(the batched call's reply, None): a message on ``pipe``, or from a bucket
        without the pipes the unary ``call`` (if any); from a bucket without either, (None,
        the outcome of each request sent on its own)."""
        for piped, batched in ((True, pipe.call), (False, call)):
            if batched is None or (piped and not self.pipes):
                continue
            try:
                return await self._portal.run(batched, message), None
            except grpclib.exceptions.GRPCError as exc:
                if exc.status is not _S.UNIMPLEMENTED:
                    raise self._error(exc) from None
                self._older_bucket(pipes_only=piped)
            except Exception as exc:
                raise self._error(exc) from None
        return None, await _each(one, requests)

    def _older_bucket(self, *, pipes_only: bool) -> None:
        if self.pipes:
            log.info(
                "bucket=%s has no PutManyStream/GetManyStream (older release): a call each", self.bucket_id
            )
        self.pipes = False
        if pipes_only:
            return
        if self.batches:
            log.info("bucket=%s has no PutMany/GetMany (older release): a call per fragment", self.bucket_id)
        self.batches = False

    def _error(self, exc: Exception) -> Exception:
        """``exc`` as :func:`translate_errors` turns it into a karma8 error."""
        try:
            with translate_errors(self.bucket_id):
                raise exc
        except Exception as translated:
            return translated

    def _get_error(self, request: pb.GetRequest, status: pb.ItemStatus) -> Exception:
        if status.code == _S.OUT_OF_RANGE.value:  # more than its recorded size: not ours
            return BucketUnavailable(self.bucket_id, f"{request.fragment_id} is longer than recorded")
        return self._item_error(status)

    def _item_error(self, status: pb.ItemStatus) -> Exception:
        return self._error(grpclib.exceptions.GRPCError(_S(status.code), status.message))

    async def _put_whole(self, request: pb.PutRequest) -> pb.PutReply | None:
        stream = self._channel.request(
            _PUT, grpclib.const.Cardinality.STREAM_UNARY, pb.PutRequest, pb.PutReply
        )
        async with stream:  # on any error, grpclib resets the stream at once (no await)
            await stream.send_request()
            await _send_chunk(stream, request, end=True)
            reply: pb.PutReply | None = await stream.recv_message()
        return reply

    async def get_whole(
        self, fragment_id: str, size: int, chunk_size: int, first_unit: int = 0
    ) -> list[Piece]:
        """Get the ``size`` bytes of a fragment from ``first_unit`` on (small fragments, as
        :meth:`put_whole`): in one GetMany with the other gets queued for this bucket."""
        if not self.batches:
            request = pb.GetRequest(fragment_id=fragment_id, chunk_size=chunk_size, first_unit=first_unit)
            chunks = await self._get_one(request, size)
        else:
            # One piece of the whole remainder: the bucket reads it in one go or refuses.
            request = pb.GetRequest(fragment_id=fragment_id, chunk_size=max(1, size), first_unit=first_unit)
            chunks = [await self.gets.call(request, size)]
        received = sum(len(c.data) for c in chunks)
        if received != size:
            raise BucketUnavailable(self.bucket_id, f"{fragment_id}: {received} of {size} bytes")
        return chunks

    async def _get_one(self, request: pb.GetRequest, size: int) -> list[Piece]:
        """One fragment's ``size`` bytes in a Get of its own (a piece per reply)."""
        with translate_errors(self.bucket_id):
            pieces: list[Piece] = await self._portal.run(self._get_whole, request, size)
        return pieces

    async def _get_joined(self, request: pb.GetRequest) -> Piece:
        """A GetMany item (``chunk_size``: the whole remainder) in a Get of its own."""
        pieces = await self._get_one(request, request.chunk_size)
        return Piece(b"".join(p.data for p in pieces), [c for p in pieces for c in p.crcs])

    async def _get_whole(self, request: pb.GetRequest, size: int) -> list[Piece]:
        stream = self._channel.request(
            _GET, grpclib.const.Cardinality.UNARY_STREAM, pb.GetRequest, pb.GetReply
        )
        chunks: list[Piece] = []
        received = 0
        async with stream:
            await stream.send_request()
            await stream.send_message(request, end=True)
            while (reply := await stream.recv_message()) is not None:
                received += len(reply.data)
                if received > size:  # bounded: never more than the fragment's recorded size
                    raise BucketUnavailable(self.bucket_id, f"{request.fragment_id} is longer than recorded")
                chunks.append(Piece(reply.data, reply.crc32c))
        return chunks

    async def delete_upload(self, upload_id: str, fragment_ids: Sequence[str] = ()) -> int:
        """Delete the fragments of ``upload_id`` on this bucket (all, or the named ones),
        in one message with the other deletes queued for this bucket meanwhile."""
        request = pb.DeleteRequest(upload_id=upload_id, fragment_ids=list(fragment_ids))
        if not self.pipes:
            return await self._delete_one(request)
        return await self.deletes.call(request, 0)

    async def _delete_one(self, request: pb.DeleteRequest) -> int:
        with translate_errors(self.bucket_id):
            reply = await self._portal.run(self._stub.delete, request)
        return int(reply.deleted)

    async def _delete_many(self, requests: list[pb.DeleteRequest]) -> list[int | BaseException]:
        message = pb.DeleteManyRequest(items=requests)
        reply, each = await self._many(self._delete_pipe, None, message, self._delete_one, requests)
        if each is not None:
            return each
        return [
            int(r.deleted) if not s.code else self._item_error(s)
            for r, s in zip(reply.results, reply.statuses, strict=True)
        ]

    async def list_fragments(self, upload_id: str = "") -> list[StoredFragment]:
        """What the bucket stores (of one upload, or everything)."""
        with translate_errors(self.bucket_id):
            replies = await self._portal.run(self._collect_list, upload_id)
        return [
            StoredFragment(f.fragment_id, f.size, f.sha256.hex(), f.age)
            for reply in replies
            for f in reply.fragments
        ]

    async def list_page(self, after: str, limit: int) -> tuple[list[StoredFragment], bool]:
        """One page of what the bucket stores: fragments of uploads after ``after``, in
        order, at least ``limit`` of them (at the end of an upload) unless the listing ends.

        Returns:
            (the fragments, whether the bucket pages). A bucket from before paged listings
            ignores the page and lists everything: only its first reply message is read
            (the stream is then cancelled) and False is returned.
        """
        with translate_errors(self.bucket_id):
            paged, replies = await self._portal.run(self._collect_page, after, limit)
        return [
            StoredFragment(f.fragment_id, f.size, f.sha256.hex(), f.age)
            for reply in replies
            for f in reply.fragments
        ], paged

    async def _collect_page(self, after: str, limit: int) -> tuple[bool, list[pb.ListReply]]:
        stream = self._channel.request(
            _LIST, grpclib.const.Cardinality.UNARY_STREAM, pb.ListRequest, pb.ListReply
        )
        replies: list[pb.ListReply] = []
        async with stream:
            await stream.send_request()
            await stream.send_message(pb.ListRequest(after=after, limit=limit), end=True)
            while (reply := await stream.recv_message()) is not None:
                replies.append(reply)
                if not reply.paged:  # an older bucket sends everything: stop it
                    await stream.cancel()
                    return False, replies
        return True, replies

    async def verify(self, fragment_id: str) -> tuple[str, int, str]:
        """Have the bucket read a fragment whole: (problem or "", size, sha256 read)."""
        with translate_errors(self.bucket_id):
            reply = await self._portal.run(self._stub.verify, pb.VerifyRequest(fragment_id=fragment_id))
        return str(reply.problem), int(reply.size), bytes(reply.sha256).hex()

    async def _collect_list(self, upload_id: str) -> list[pb.ListReply]:
        return [r async for r in self._stub.list(pb.ListRequest(upload_id=upload_id))]

    async def usage(self) -> Usage:
        """The bucket's current space usage."""
        with translate_errors(self.bucket_id):
            u = await self._portal.run(self._stub.get_usage, pb.UsageRequest())
        return Usage(used=u.used, free=u.free, capacity=u.capacity, fragments=u.fragments)

    async def aclose(self) -> None:
        """Close the pipes and the channel (on the asyncio side, where they live)."""
        with trio.CancelScope(shield=True):
            await self._portal.run(self._close)

    async def _close(self) -> None:
        await self._put_pipe.close()
        await self._get_pipe.close()
        await self._delete_pipe.close()
        self._channel.close()


async def _each(call: Callable[[Q], Awaitable[R]], requests: list[Q]) -> list[R | BaseException]:
    """``call`` for every request at once; each one's result or error, in order."""
    out: list[R | BaseException] = [BucketUnavailable("?", "not run")] * len(requests)

    async def one(i: int, request: Q) -> None:
        try:
            out[i] = await call(request)
        except Karma8Error as exc:
            out[i] = exc

    async with trio.open_nursery() as nursery:
        for i, request in enumerate(requests):
            nursery.start_soon(one, i, request)
    return out


async def _start_stream(
    channel: Any, route: str, cardinality: grpclib.const.Cardinality, req: type, rep: type
) -> Any:
    """A grpclib stream, entered and its request headers sent (on the asyncio side)."""
    stream = channel.request(route, cardinality, req, rep)
    await stream.__aenter__()
    try:
        await stream.send_request()
    except BaseException as exc:
        await stream.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    return stream


async def _send_last(stream: Any, message: Any) -> None:
    await stream.send_message(message, end=True)


def _raise_status(stream: Any) -> None:
    """Raise the status a bucket ended a call with, if it sent one.

    A bucket that refuses a Put (no secret, no space, a bad fragment id) ends the call and
    resets the stream before reading it all. Our next send then fails with a bare "stream
    reset"; the status in the headers it sent first says why. grpclib itself reads them
    this way when a stream context exits on StreamTerminatedError (grpclib 0.4.9, pinned).
    """
    stream._maybe_raise()


async def _send_chunk(stream: Any, message: Any, end: bool = False) -> None:
    try:
        await stream.send_message(message, end=end)
    except (grpclib.exceptions.StreamTerminatedError, h2.exceptions.StreamClosedError):
        _raise_status(stream)
        raise


async def _end_stream(stream: Any) -> None:
    try:
        await stream.end()
    except (grpclib.exceptions.StreamTerminatedError, h2.exceptions.StreamClosedError):
        _raise_status(stream)
        raise


async def _new_channel(
    host: str, port: int, config: grpclib.config.Configuration, security: ChannelSecurity
) -> Any:
    channel = grpclib.client.Channel(host, port, config=config, ssl=security.ssl)
    attach_secret(channel, security.secret)
    return channel


async def connect_bucket(
    portal: Portal,
    bucket_id: str,
    address: str,
    *,
    close_timeout: float,
    security: ChannelSecurity,
    stream_window: int = 4 * 1024 * 1024,
    connection_window: int = 16 * 1024 * 1024,
    call_timeout: float = 60.0,
) -> BucketClient:
    """A client for the bucket at ``address`` (``host:port``); connects lazily.

    Every call presents ``security.secret``; with ``security.ssl`` the channel is TLS and
    the bucket's certificate must be valid for the host of ``address``.

    The HTTP/2 receive windows bound how much a bucket can push ahead of what we consume
    (grpclib acknowledges data as it is read); the 64 KiB default would stall 1 MiB chunks.
    ``call_timeout`` bounds a batched call (PutMany, GetMany), which serves several callers
    and so runs whatever happens to one of them.
    """
    speedups.apply()
    grpcfix.apply()  # so that an older bucket's UNIMPLEMENTED (to PutMany) reads as such
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BucketUnavailable(bucket_id, f"bad address {address!r}")
    config = grpclib.config.Configuration(
        http2_connection_window_size=connection_window, http2_stream_window_size=stream_window
    )
    channel = await portal.run(_new_channel, host.strip("[]"), int(port), config, security)
    return BucketClient(portal, bucket_id, address, channel, close_timeout, call_timeout)
