"""Choosing the error to report when a nursery fails in several ways at once; keeping a
background job alive while the registry is away."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio
from trio_websocket import ConnectionClosed

from karma8.errors import BucketUnavailable, Karma8Error, RegistryUnavailable


@contextlib.contextmanager
def registry_away(log: logging.Logger, what: str) -> Iterator[None]:
    """Run one pass of a background job; if the registry cannot be reached, log it and
    let the job try again at its next pass (the job's lease lapses meanwhile)."""
    try:
        yield
    except* RegistryUnavailable as group:
        log.warning("%s stopped: %s", what, group.exceptions[0])


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that best explains why a session's nursery failed.

    Cancellation is never swallowed: a group holding only ``Cancelled`` is returned as is
    (its cancel scope will catch it). Otherwise the client's own fault or disconnect comes
    first (it is what caused the rest), then a bucket's failure, then any other karma8
    error; an unexpected exception (a bug) wins over all of them.
    """
    rest = group.split(trio.Cancelled)[1]
    if rest is None:
        return group
    leaves = _leaves(rest)
    for exc in leaves:
        if not isinstance(exc, (Karma8Error, ConnectionClosed)):
            return rest  # a bug: keep the whole group and its tracebacks
    for kind in (ConnectionClosed, Karma8Error):
        for exc in leaves:
            if isinstance(exc, kind) and not isinstance(exc, BucketUnavailable):
                return exc
    return leaves[0]
