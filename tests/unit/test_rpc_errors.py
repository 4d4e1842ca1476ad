"""grpclib and transport errors become karma8 errors at the bridge, bugs do not."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import pytest
from grpclib.config import Configuration
from grpclib.protocol import Connection

from karma8.errors import BucketUnavailable
from karma8.rpc.buckets import translate_errors


def test_uvloop_write_on_a_dead_connection_is_bucket_unavailable() -> None:
    with pytest.raises(BucketUnavailable) as info, translate_errors("b1"):
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    assert info.value.bucket_id == "b1"


def test_other_runtime_errors_stay_bugs() -> None:
    with pytest.raises(RuntimeError, match="something else"), translate_errors("b1"):
        raise RuntimeError("something else")


def test_connection_refused_is_bucket_unavailable() -> None:
    with pytest.raises(BucketUnavailable), translate_errors("b1"):
        raise ConnectionRefusedError(111, "Connection refused")


class _Transport(asyncio.Transport):
    def close(self) -> None:
        pass


def test_a_stream_on_a_connection_grpclib_closed_is_bucket_unavailable() -> None:
    """The race seen in a chaos run: grpclib closed the connection (a bucket died) and a
    janitor's Delete then created its stream on it."""
    h2_connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection = Connection(h2_connection, _Transport(), config=Configuration())
    connection.close()
    with pytest.raises(BucketUnavailable, match="connection lost"), translate_errors("b1"):
        connection.create_stream()


def test_other_attribute_errors_stay_bugs() -> None:
    with pytest.raises(AttributeError), translate_errors("b1"):
        _ = Configuration().no_such_setting  # type: ignore[attr-defined]
