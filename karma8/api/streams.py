"""Steps of a bucket stream with a deadline each (a stalled bucket is an unavailable one)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import trio

from karma8.api.pool import Bucket
from karma8.errors import BucketUnavailable

T = TypeVar("T")


async def open_bucket_stream(
    stack: contextlib.AsyncExitStack,
    client: Bucket,
    stream: contextlib.AbstractAsyncContextManager[T],
    seconds: float,
) -> T:
    """Enter a bucket stream on ``stack`` within ``seconds``."""
    try:
        with trio.fail_after(seconds):
            return await stack.enter_async_context(stream)
    except trio.TooSlowError:
        raise BucketUnavailable(client.bucket_id, "timed out opening a stream") from None


async def bucket_step(client: Bucket, step: Awaitable[T], seconds: float) -> T:
    """Await one step of a bucket stream within ``seconds``."""
    try:
        with trio.fail_after(seconds):
            return await step
    except trio.TooSlowError:
        raise BucketUnavailable(client.bucket_id, "stream stalled") from None
