"""The seam between the API server's transfer logic and the buckets.

Uploads, downloads and repairs talk to buckets only through :class:`Bucket` and find them
through :class:`Pool`. :class:`karma8.rpc.buckets.BucketClient` and
:class:`karma8.api.cluster.Cluster` are the real ones; the unit tests use in-memory fakes
that fail, stall and corrupt on demand (``tests/unit/fakes.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from karma8.config import ApiConfig
from karma8.core.records import Piece, StoredFragment


class PutStream(Protocol):
    """An open Put of one fragment."""

    async def send(self, data: bytes, crcs: Sequence[int] = ()) -> None: ...

    async def finish(self) -> StoredFragment: ...


class GetStream(Protocol):
    """An open Get of one fragment."""

    async def receive(self) -> Piece | None: ...


class Bucket(Protocol):
    """What the transfer logic needs of one bucket."""

    @property
    def bucket_id(self) -> str: ...

    def open_put(
        self, fragment_id: str, size: int, unit: int = 0
    ) -> contextlib.AbstractAsyncContextManager[PutStream]: ...

    async def put_whole(
        self, fragment_id: str, data: bytes, unit: int = 0, crcs: Sequence[int] = ()
    ) -> StoredFragment: ...

    def open_get(
        self, fragment_id: str, chunk_size: int, first_unit: int = 0
    ) -> contextlib.AbstractAsyncContextManager[GetStream]: ...

    async def get_whole(
        self, fragment_id: str, size: int, chunk_size: int, first_unit: int = 0
    ) -> list[Piece]: ...


class Pool(Protocol):
    """The buckets by id."""

    def client(self, bucket_id: str) -> Bucket:
        """The bucket, if live.

        Raises:
            BucketUnavailable: it is not live.
        """
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Deadlines and sizes of one transfer (from the API config)."""

    #: Opening a bucket stream.
    connect: float
    #: One step of a bucket stream (send, receive, finish).
    step: float
    #: Waiting for one stripe's unit of a fragment while reading: past it, the
    #: fragment is read around (decoded from others).
    stripe: float
    #: Units buffered per fragment stream.
    queue_depth: int
    #: Fragments up to this size move in one call (``put_whole`` / ``get_whole``).
    small: int

    @classmethod
    def of(cls, config: ApiConfig) -> Limits:
        """The limits the API server's config sets."""
        return cls(
            connect=config.connect_timeout,
            step=config.idle_timeout,
            stripe=config.stripe_timeout,
            queue_depth=config.queue_depth,
            small=config.stripe_unit,
        )
