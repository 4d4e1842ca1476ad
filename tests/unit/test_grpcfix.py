"""The grpclib/betterproto2 fixes in karma8.rpc.grpcfix: still needed, and working.

Each test first shows the upstream behaviour, so an upgrade that fixes it turns the test
red and says the fix can go. scripts/fuzz.py --raw (tests/integration/test_fuzz.py)
drives all three over real sockets.
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import grpclib.const
import grpclib.exceptions
import grpclib.protocol
import grpclib.utils
import h2.events
import pytest
from grpclib.metadata import Deadline
from hyperframe.frame import ExtensionFrame

from karma8.rpc import grpcfix
from karma8.rpc.gen.karma8 import v1 as pb


def test_unknown_http2_frames_break_grpclib_and_are_ignored_once_applied() -> None:
    event = h2.events.UnknownFrameReceived(frame=ExtensionFrame(0x0B, 0))
    assert "UnknownFrameReceived" not in inspect.getsource(grpclib.protocol.EventsProcessor.__init__)
    processor = SimpleNamespace(processors={})
    with pytest.raises(NotImplementedError):
        grpcfix._original_process(processor, event)
    grpcfix.apply()
    assert grpcfix.applied()
    grpcfix._process(processor, event)  # type: ignore[arg-type]


def test_an_expired_deadline_is_a_deadline_exceeded_once_applied() -> None:
    expired = Deadline.from_timeout(0)
    upstream = grpclib.utils.DeadlineWrapper()
    with pytest.raises(asyncio.TimeoutError), grpcfix._original_deadline_start(upstream, expired):
        pass
    assert not upstream.cancelled  # so grpclib logs "Timeout occurred" with a traceback

    fixed = grpclib.utils.DeadlineWrapper()
    with pytest.raises(asyncio.TimeoutError), grpcfix._deadline_start(fixed, expired):
        pass
    assert fixed.cancelled  # grpclib answers DEADLINE_EXCEEDED, logged at info


def test_a_field_of_the_wrong_wire_type_decodes_to_the_wrong_type_and_is_refused() -> None:
    parsed = pb.Heartbeat.parse(bytes([0x08, 0x01]))  # field 1 (bucket_id) as a varint
    assert isinstance(parsed.bucket_id, int), "betterproto2 now refuses a wire-type mismatch"
    assert grpcfix.malformed(parsed) == "field 'bucket_id' is not a string"
    nested = pb.Heartbeat(bucket_id="b", address="h:1", usage=pb.Usage(used=1))
    assert grpcfix.malformed(nested) is None
    assert grpcfix.malformed(pb.Heartbeat.parse(bytes(nested))) is None
    nested.usage.used = "x"
    assert grpcfix.malformed(nested) == "field 'used' is not a uint64"


async def test_a_request_without_method_is_a_server_error_upstream_and_a_400_once_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    headers = [(":path", "/karma8.v1.Bucket/Put"), ("content-type", "application/grpc")]
    released: list[bool] = []
    await grpcfix._original_request_handler(
        {}, None, headers, None, None, None, lambda: released.append(True)
    )
    assert "Server error" in caplog.text
    assert released == [True]

    caplog.clear()
    sent: list[object] = []

    class Stream:
        closable = False

        async def send_headers(self, headers: object, end_stream: bool) -> None:
            sent.append(headers)

    await grpcfix._request_handler({}, Stream(), headers, None, None, None, lambda: released.append(True))
    assert sent == [[(":status", "400")]]
    assert released == [True, True]
    assert caplog.text == ""


def test_a_trailers_only_status_is_misread_upstream_and_read_once_applied() -> None:
    headers = {":status": "200", "grpc-status": "12", "grpc-message": "Method not found"}
    stream = SimpleNamespace()
    with pytest.raises(grpclib.exceptions.GRPCError) as upstream:
        grpcfix._original_content_type(stream, headers)
    assert upstream.value.status is grpclib.const.Status.UNKNOWN  # not UNIMPLEMENTED
    grpcfix.apply()
    grpcfix._raise_for_content_type(stream, headers)  # type: ignore[arg-type]
    with pytest.raises(grpclib.exceptions.GRPCError, match="Missing content-type"):
        grpcfix._raise_for_content_type(stream, {":status": "200"})  # type: ignore[arg-type]
