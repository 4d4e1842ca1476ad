"""grpclib and transport errors become karma8 errors at the bridge, bugs do not."""

from __future__ import annotations

import pytest

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
