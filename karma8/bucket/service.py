"""The Bucket gRPC service: grpclib handlers over a :class:`FragmentStore`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import anyio
from grpclib import GRPCError
from grpclib.const import Status

from karma8.bucket.metrics import BucketMetrics
from karma8.bucket.store import FragmentCorrupt, FragmentMissing, FragmentStore, FragmentWriter, NoSpace
from karma8.core.fragments import parse_fragment_id
from karma8.core.records import StoredFragment
from karma8.errors import BadRequest
from karma8.rpc.gen.karma8 import v1 as pb

log = logging.getLogger(__name__)

#: Fragments per List reply message.
LIST_BATCH = 1000

#: The service's full name (what health checks ask about).
SERVICE_NAME = "karma8.v1.Bucket"


def _about(fragment_id: str) -> str:
    """``upload=<id> part <n>`` for a log line about a fragment (the raw id if malformed)."""
    try:
        upload_id, part = parse_fragment_id(fragment_id)
    except BadRequest:
        return f"fragment {fragment_id[:100]!r}"
    return f"upload={upload_id} part {part}"


#: Items in one PutMany or GetMany, at most.
MANY_MAX = 256


@contextlib.contextmanager
def _as_grpc(bucket_id: str, what: str) -> Iterator[None]:
    try:
        yield
    except BadRequest as exc:
        log.warning("bucket=%s %s refused: %s", bucket_id, what, exc.message)
        raise GRPCError(Status.INVALID_ARGUMENT, exc.message) from None
    except FragmentMissing as exc:
        raise GRPCError(Status.NOT_FOUND, exc.message) from None
    except FragmentCorrupt as exc:
        log.error("bucket=%s %s: %s", bucket_id, what, exc.message)
        raise GRPCError(Status.DATA_LOSS, exc.message) from None
    except NoSpace as exc:
        log.warning("bucket=%s %s: %s", bucket_id, what, exc.message)
        raise GRPCError(Status.RESOURCE_EXHAUSTED, exc.message) from None


Item = TypeVar("Item")


async def _each_item(
    items: Sequence[Item], one: Callable[[int, Item], Awaitable[None]]
) -> list[pb.ItemStatus]:
    """``one(i, item)`` for every item at once; the status of each: OK, or the gRPC status
    a call of its own would have ended with."""
    if len(items) > MANY_MAX:
        raise GRPCError(Status.INVALID_ARGUMENT, f"more than {MANY_MAX} items")
    statuses = [pb.ItemStatus() for _ in items]

    async def run(i: int, item: Item) -> None:
        try:
            await one(i, item)
        except GRPCError as exc:
            statuses[i] = pb.ItemStatus(code=exc.status.value, message=exc.message or "")

    if len(items) == 1:  # the usual case when the API is not busy: no task group
        await run(0, items[0])
        return statuses
    async with anyio.create_task_group() as tasks:
        for i, item in enumerate(items):
            tasks.start_soon(run, i, item)
    return statuses


def _info(stored: StoredFragment) -> pb.FragmentInfo:
    return pb.FragmentInfo(
        fragment_id=stored.fragment_id, size=stored.size, sha256=bytes.fromhex(stored.sha256), age=stored.age
    )


async def _batches(stored: list[StoredFragment]) -> AsyncIterator[list[StoredFragment]]:
    for i in range(0, len(stored), LIST_BATCH):
        yield stored[i : i + LIST_BATCH]


def _put_reply(stored: StoredFragment) -> pb.PutReply:
    return pb.PutReply(fragment_id=stored.fragment_id, size=stored.size, sha256=bytes.fromhex(stored.sha256))


async def _chain(first: pb.PutRequest, rest: AsyncIterator[pb.PutRequest]) -> AsyncIterator[pb.PutRequest]:
    yield first
    async for message in rest:
        yield message


async def _each_within(
    messages: AsyncIterator[pb.PutRequest], seconds: float
) -> AsyncIterator[pb.PutRequest]:
    """The messages of a Put, each within ``seconds`` of the one before.

    A sender whose connection died silently (a cut link, a host gone) sends no reset, and
    its Put would otherwise hold a temporary file open until the connection's keepalive,
    two hours later.
    """
    while True:
        try:
            async with asyncio.timeout(seconds):
                message = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED, f"nothing received for {seconds:g} s") from None
        yield message


class BucketService(pb.BucketBase):
    """Put / Get / Delete / List / GetUsage of fragments."""

    def __init__(
        self,
        store: FragmentStore,
        *,
        max_chunk: int,
        read_chunk_max: int,
        metrics: BucketMetrics,
        idle_timeout: float = 120.0,
    ) -> None:
        self._store = store
        self._idle_timeout = idle_timeout
        self._max_chunk = max_chunk
        self._read_chunk_max = read_chunk_max
        self._metrics = metrics

    def _check_chunk(self, data: bytes) -> None:
        # grpclib enforces no message size limit: every chunk is checked here.
        if len(data) > self._max_chunk:
            raise BadRequest(f"chunk of {len(data)} bytes exceeds {self._max_chunk}")

    async def put(self, messages: AsyncIterator[pb.PutRequest]) -> pb.PutReply:
        # Counted once the call ends (bytes of a failed Put too), never per chunk.
        writers: list[FragmentWriter] = []
        stored: StoredFragment | None = None
        try:
            with self._metrics.count(self._metrics.puts):
                stored = await self._put(messages, writers)
        finally:
            written = stored.size if stored is not None else sum(w.written for w in writers)
            self._metrics.written_bytes.inc(written)
        return _put_reply(stored)

    async def _put(
        self, messages: AsyncIterator[pb.PutRequest], writers: list[FragmentWriter]
    ) -> StoredFragment:
        bid = self._store.bucket_id
        messages = _each_within(messages, self._idle_timeout)
        first = await anext(messages, None)
        if first is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "empty Put stream")
        with _as_grpc(bid, f"put {_about(first.fragment_id)}"):
            self._check_chunk(first.data)
            rest = messages
            if len(first.data) == first.size:  # all the data in one message: a small fragment
                second = await anext(messages, None)
                if second is None:
                    return await self._store.put_whole(
                        first.fragment_id, first.data, first.unit, first.crc32c
                    )
                rest = _chain(second, messages)
            async with self._store.open_writer(first.fragment_id, first.size, first.unit) as writer:
                writers.append(writer)
                await writer.write(first.data, first.crc32c)
                async for message in rest:
                    if message.fragment_id and message.fragment_id != first.fragment_id:
                        raise BadRequest("fragment id changed mid-stream")
                    self._check_chunk(message.data)
                    await writer.write(message.data, message.crc32c)
                stored = await writer.commit()
        log.debug("bucket=%s stored %s (%d bytes)", bid, _about(stored.fragment_id), stored.size)
        return stored

    async def put_many(self, message: pb.PutManyRequest, call: str = "put_many") -> pb.PutManyReply:
        # Every item is stored at once: the volume's group commit writes them with one
        # fdatasync (and those of other calls queued beside them).
        bid = self._store.bucket_id
        results = [pb.PutReply() for _ in message.items]

        async def one(i: int, item: pb.PutRequest) -> None:
            with self._metrics.count(self._metrics.puts), _as_grpc(bid, f"put {_about(item.fragment_id)}"):
                if len(item.data) != item.size:
                    raise BadRequest(f"{item.fragment_id[:100]}: {len(item.data)} of {item.size} bytes")
                self._check_chunk(item.data)
                stored = await self._store.put_whole(item.fragment_id, item.data, item.unit, item.crc32c)
            self._metrics.written_bytes.inc(stored.size)
            results[i] = _put_reply(stored)

        statuses = await _each_item(message.items, one)
        self._metrics.batches.labels(call).inc()
        return pb.PutManyReply(results=results, statuses=statuses)

    async def get_many(self, message: pb.GetManyRequest, call: str = "get_many") -> pb.GetManyReply:
        bid = self._store.bucket_id
        results = [pb.GetReply() for _ in message.items]

        async def one(i: int, item: pb.GetRequest) -> None:
            with self._metrics.count(self._metrics.gets), _as_grpc(bid, f"get {_about(item.fragment_id)}"):
                if not 0 < item.chunk_size <= self._read_chunk_max:
                    raise BadRequest(f"chunk_size must be in 1..{self._read_chunk_max}")
                piece = await self._store.read_whole(item.fragment_id, item.chunk_size, item.first_unit)
                if piece is None:
                    raise GRPCError(Status.OUT_OF_RANGE, f"{item.fragment_id} is bigger than chunk_size")
            self._metrics.read_bytes.inc(len(piece.data))
            results[i] = pb.GetReply(data=piece.data, crc32c=piece.crcs)

        statuses = await _each_item(message.items, one)
        self._metrics.batches.labels(call).inc()
        return pb.GetManyReply(results=results, statuses=statuses)

    # The pipes: a PutMany or GetMany per message of a long-lived stream, one at a time
    # (the API sends the next one once it has the reply to the last).

    async def put_many_stream(
        self, messages: AsyncIterator[pb.PutManyRequest]
    ) -> AsyncIterator[pb.PutManyReply]:
        async for message in messages:
            yield await self.put_many(message, "put_many_stream")

    async def get_many_stream(
        self, messages: AsyncIterator[pb.GetManyRequest]
    ) -> AsyncIterator[pb.GetManyReply]:
        async for message in messages:
            yield await self.get_many(message, "get_many_stream")

    async def get(self, message: pb.GetRequest) -> AsyncIterator[pb.GetReply]:
        sent = 0
        try:
            with (
                self._metrics.count(self._metrics.gets),
                _as_grpc(self._store.bucket_id, f"get {_about(message.fragment_id)}"),
            ):
                if not 0 < message.chunk_size <= self._read_chunk_max:
                    raise BadRequest(f"chunk_size must be in 1..{self._read_chunk_max}")
                fid, first_unit = message.fragment_id, message.first_unit
                piece = await self._store.read_whole(fid, message.chunk_size, first_unit)
                if piece is not None:  # a small fragment: one chunk, read in one thread call
                    sent = len(piece.data)
                    yield pb.GetReply(data=piece.data, crc32c=piece.crcs)
                    return
                async with self._store.open_reader(fid) as reader:
                    async for piece in reader.pieces(message.chunk_size, first_unit):
                        sent += len(piece.data)
                        yield pb.GetReply(data=piece.data, crc32c=piece.crcs)
        finally:
            self._metrics.read_bytes.inc(sent)

    async def delete_many_stream(
        self, messages: AsyncIterator[pb.DeleteManyRequest]
    ) -> AsyncIterator[pb.DeleteManyReply]:
        async for message in messages:
            yield await self._delete_many(message)

    async def _delete_many(self, message: pb.DeleteManyRequest) -> pb.DeleteManyReply:
        # The deletes run at once: their tombstones share group commits.
        results = [pb.DeleteReply() for _ in message.items]

        async def one(i: int, item: pb.DeleteRequest) -> None:
            results[i] = await self.delete(item)

        statuses = await _each_item(message.items, one)
        self._metrics.batches.labels("delete_many_stream").inc()
        return pb.DeleteManyReply(results=results, statuses=statuses)

    async def delete(self, message: pb.DeleteRequest) -> pb.DeleteReply:
        bid = self._store.bucket_id
        with (
            self._metrics.count(self._metrics.deletes),
            _as_grpc(bid, f"upload={message.upload_id[:100]} delete"),
        ):
            count, freed = await self._store.delete_upload(message.upload_id, message.fragment_ids)
        self._metrics.deleted_fragments.inc(count)
        if count:
            log.info(
                "bucket=%s upload=%s deleted %d fragment(s), %d bytes", bid, message.upload_id, count, freed
            )
        return pb.DeleteReply(deleted=count, bytes=freed)

    async def list(self, message: pb.ListRequest) -> AsyncIterator[pb.ListReply]:
        # In order of fragment ids, LIST_BATCH per message, read as it goes (never the
        # whole listing in memory); ``paged`` tells the API this bucket honours a page.
        with _as_grpc(self._store.bucket_id, "list"):
            if message.upload_id:
                batches = _batches(await self._store.list_fragments(message.upload_id))
            else:
                batches = self._store.iter_fragments(message.after, message.limit, LIST_BATCH)
            sent = False
            async for batch in batches:
                sent = True
                yield pb.ListReply(fragments=[_info(s) for s in batch], paged=True)
            if not sent:
                yield pb.ListReply(paged=True)

    async def verify(self, message: pb.VerifyRequest) -> pb.VerifyReply:
        bid = self._store.bucket_id
        with _as_grpc(bid, f"verify {_about(message.fragment_id)}"):
            problem, size, digest = await self._store.verify(message.fragment_id)
        if problem and problem != "missing":
            log.error("bucket=%s %s: %s", bid, _about(message.fragment_id), problem)
        return pb.VerifyReply(
            fragment_id=message.fragment_id, problem=problem, size=size, sha256=bytes.fromhex(digest)
        )

    async def get_usage(self, message: pb.UsageRequest) -> pb.Usage:
        u = self._store.usage()
        return pb.Usage(used=u.used, free=u.free, capacity=u.capacity, fragments=u.fragments)
