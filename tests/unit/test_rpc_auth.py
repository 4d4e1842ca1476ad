"""The shared secret on gRPC calls: grpclib hooks of karma8/rpc/auth.py, in-process."""

from __future__ import annotations

import asyncio
import logging

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from karma8.rpc.auth import attach_secret
from karma8.rpc.gen.karma8 import v1 as pb
from karma8.rpc.servers import start_grpc_server

SECRET = "the-shared-secret-0123456789"
WRONG = "not-the-secret-0123456789"


class _Membership(pb.MembershipBase):
    def __init__(self) -> None:
        self.beats: list[str] = []

    async def beat(self, message: pb.Heartbeat) -> pb.HeartbeatReply:
        self.beats.append(message.bucket_id)
        return pb.HeartbeatReply(interval=1.0)


async def _beat(
    server_secret: str, client_secret: str, metadata: dict[str, str] | None
) -> tuple[Status, list[str]]:
    """One Beat call; its status and the beats the handler saw."""
    service = _Membership()
    server, port = await start_grpc_server(
        [service], "127.0.0.1", 0, secret=server_secret, who="test endpoint"
    )
    channel = grpclib.client.Channel("127.0.0.1", port)
    attach_secret(channel, client_secret)
    try:
        await pb.MembershipStub(channel).beat(pb.Heartbeat(bucket_id="b1"), metadata=metadata)
        status = Status.OK
    except GRPCError as exc:
        status = exc.status
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    return status, service.beats


@pytest.mark.parametrize(
    ("client_secret", "metadata"),
    [
        ("", None),
        (WRONG, None),
        ("", {"authorization": f"Basic {SECRET}"}),
        ("", {"authorization": SECRET}),
        ("", {"x-secret": SECRET}),
    ],
    ids=["none", "wrong", "basic", "no-scheme", "other-key"],
)
def test_a_call_without_the_secret_is_refused_before_its_handler(
    client_secret: str, metadata: dict[str, str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="karma8.rpc.auth")
    status, beats = asyncio.run(_beat(SECRET, client_secret, metadata))
    assert status is Status.UNAUTHENTICATED
    assert beats == []
    (record,) = [r for r in caplog.records if r.name == "karma8.rpc.auth"]
    line = record.getMessage()
    assert line.startswith("test endpoint refused /karma8.v1.Membership/Beat from 127.0.0.1:"), line
    assert "\n" not in line
    assert SECRET not in line
    assert WRONG not in line


def test_the_secret_opens_the_door() -> None:
    assert asyncio.run(_beat(SECRET, SECRET, None)) == (Status.OK, ["b1"])


def test_a_server_without_a_secret_accepts_anyone() -> None:
    """What insecure = true means."""
    assert asyncio.run(_beat("", "", None)) == (Status.OK, ["b1"])
    assert asyncio.run(_beat("", WRONG, None)) == (Status.OK, ["b1"])
