"""Security: the bucket secret, the client token, TLS everywhere, and who refuses to start.

Certificates come from trustme, made fresh for each test. Buckets are real processes; the
attacker's gRPC calls use a bare grpclib client on its own asyncio loop, so nothing of
karma8's own client code helps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpclib.client
import pytest
import trio
import trustme
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from trio_websocket import ConnectionClosed

from karma8.api.app import ApiEndpoints, serve_api
from karma8.client import Client
from karma8.config import ClientConfig, MiB, StackConfig
from karma8.core.fragments import fragment_id, new_upload_id
from karma8.core.protocol import CloseCode
from karma8.errors import BucketUnavailable, ConnectionFailed, RemoteError
from karma8.rpc.auth import ChannelSecurity
from karma8.rpc.bridge import open_portal
from karma8.rpc.buckets import BucketClient, connect_bucket
from karma8.rpc.gen.karma8 import v1 as pb
from karma8.tls import api_tls
from tests.integration.harness import (
    TEST_SECRET,
    Cluster,
    api_config,
    expect_error,
    free_port,
    karma8_cmd,
    make_file,
    open_raw,
    sha256_of,
    stop_process,
    wait_until,
)
from tests.integration.up_harness import cli_env, karma8_up, processes_mentioning, stop_with_ctrl_c

TOKEN = "client-token-0123456789abcdef"
UP_DEADLINE = 60.0


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a certificate for 127.0.0.1 signed by it, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.other_ca))
    pki.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pki.key))
    return pki


@contextlib.asynccontextmanager
async def open_secured_cluster(
    root: Path,
    *,
    bucket_env: dict[str, str] | None = None,
    client_settings: dict[str, object] | None = None,
    **api_overrides: object,
) -> AsyncIterator[Cluster]:
    """Like harness.open_cluster, with bucket variables and client settings (TLS, token)."""
    async with trio.open_nursery() as nursery:
        config = api_config(root, **api_overrides)
        endpoints: ApiEndpoints = await nursery.start(serve_api, config)
        cluster = Cluster(
            root,
            endpoints.membership_port,
            endpoints.url,
            api_config=config,
            bucket_env=bucket_env or {},
            client_settings=client_settings or {},
        )
        try:
            async with trio.open_nursery() as starting:
                for _ in range(6):
                    starting.start_soon(cluster.add_bucket)
            await cluster.wait_live(6)
            yield cluster
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()


# -- TLS -------------------------------------------------------------------------------


async def test_round_trip_over_wss_and_tls_grpc(tmp_path: Path, pki: Pki) -> None:
    tls_env = {
        "KARMA8_BUCKET_TLS_CERT": str(pki.cert),
        "KARMA8_BUCKET_TLS_KEY": str(pki.key),
        "KARMA8_BUCKET_TLS_CA": str(pki.ca),  # heartbeats to the API over TLS
    }
    async with open_secured_cluster(
        tmp_path,
        bucket_env=tls_env,
        client_settings={"tls_ca": pki.ca},
        tls_cert=pki.cert,
        tls_key=pki.key,
        tls_ca=pki.ca,  # the API dials buckets over TLS
    ) as cluster:
        assert cluster.url.startswith("wss://127.0.0.1:")
        src, dst = tmp_path / "src", tmp_path / "dst"
        digest = make_file(src, 3 * MiB + 5)
        assert (await cluster.client.upload(src, "secret/plans.bin")).sha256 == digest
        assert (await cluster.client.download("secret/plans.bin", dst)).sha256 == digest
        assert sha256_of(dst) == digest

        # Nobody gets in without TLS, or without trusting the CA.
        with pytest.raises(ConnectionFailed):
            await Client(ClientConfig(api=cluster.url.replace("wss://", "ws://"))).status()
        with pytest.raises(ConnectionFailed, match="certificate"):
            await Client(ClientConfig(api=cluster.url, tls_ca=pki.other_ca)).status()
        bucket = cluster.buckets[0]
        async with open_portal() as portal:
            for security in (
                ChannelSecurity(TEST_SECRET),  # plaintext to a TLS port
                ChannelSecurity(TEST_SECRET, api_tls(api_config(tmp_path, tls_ca=pki.other_ca)).buckets),
            ):
                client = await connect_bucket(
                    portal, bucket.bucket_id, f"127.0.0.1:{bucket.port}", close_timeout=5, security=security
                )
                try:
                    with pytest.raises(BucketUnavailable), trio.fail_after(10):
                        await client.usage()
                finally:
                    await client.aclose()
        assert (await cluster.client.status())["live"] == 6  # still serving


# -- the bucket secret -----------------------------------------------------------------


async def _bare_call(port: int, call: str, fid: str, metadata: dict[str, str] | None) -> Status:
    """One call straight to a bucket with a bare grpclib client; its status."""
    channel = grpclib.client.Channel("127.0.0.1", port)
    stub = pb.BucketStub(channel)
    try:
        if call == "put":
            await stub.put([pb.PutRequest(fragment_id=fid, size=3, data=b"abc")], metadata=metadata)
        elif call == "delete":
            await stub.delete(pb.DeleteRequest(upload_id=fid.split(".", maxsplit=1)[0]), metadata=metadata)
        else:
            [_ async for _ in stub.list(pb.ListRequest(), metadata=metadata)]
    except GRPCError as exc:
        return exc.status
    finally:
        channel.close()
    return Status.OK


async def bare_call(port: int, call: str, fid: str, metadata: dict[str, str] | None) -> Status:
    return await trio.to_thread.run_sync(lambda: asyncio.run(_bare_call(port, call, fid, metadata)))


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {"authorization": "Bearer wrong-secret-0123456789"},
        {"authorization": f"Basic {TEST_SECRET}"},
        {"authorization": f"Bearer {TEST_SECRET[:-1]}"},
    ],
    ids=["none", "wrong", "basic", "truncated"],
)
async def test_a_bucket_refuses_calls_without_the_secret(
    cluster: Cluster, tmp_path: Path, metadata: dict[str, str] | None
) -> None:
    src = tmp_path / "f"
    make_file(src, 60_000)
    await cluster.client.upload(src, "kept")
    bucket = cluster.buckets[0]
    (kept,) = bucket.fragment_ids()
    fid = fragment_id(new_upload_id(), 0)

    assert await bare_call(bucket.port, "put", fid, metadata) is Status.UNAUTHENTICATED
    assert await bare_call(bucket.port, "delete", kept, metadata) is Status.UNAUTHENTICATED
    assert await bare_call(bucket.port, "list", fid, metadata) is Status.UNAUTHENTICATED
    assert bucket.fragment_ids() == [kept], "a refused call changed the bucket"
    assert bucket.tmp_files() == []
    got = await cluster.client.download("kept", tmp_path / "out")
    assert got.sha256 == sha256_of(src)

    # The same call with the secret goes through: the refusals were about the secret only.
    right = {"authorization": f"Bearer {TEST_SECRET}"}
    assert await bare_call(bucket.port, "put", fid, right) is Status.OK
    assert fid in bucket.fragment_ids()


async def _put(client: BucketClient, fid: str, data: bytes) -> None:
    async with client.open_put(fid, len(data)) as writer:
        await writer.send(data)
        await writer.finish()


async def test_an_api_with_a_wrong_secret_gets_authentication_failed(cluster: Cluster) -> None:
    bucket = cluster.buckets[0]
    async with open_portal() as portal:
        client = await connect_bucket(
            portal,
            bucket.bucket_id,
            f"127.0.0.1:{bucket.port}",
            close_timeout=5,
            security=ChannelSecurity("wrong-secret-0123456789"),
        )
        try:
            with pytest.raises(BucketUnavailable, match="authentication failed"):
                await client.delete_upload(new_upload_id())
            with pytest.raises(BucketUnavailable, match="authentication failed"):
                await _put(client, fragment_id(new_upload_id(), 0), b"abc")
        finally:
            await client.aclose()
    assert bucket.tmp_files() == []
    assert bucket.fragment_ids() == []


async def test_a_bucket_with_a_wrong_secret_cannot_register(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, ready, log = tmp_path / "intruder", tmp_path / "intruder.ready", tmp_path / "intruder.log"
    env = cli_env(KARMA8_BUCKET_SECRET="wrong-secret-0123456789")
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            karma8_cmd(
                "bucket",
                "--data-dir",
                str(data),
                "--port",
                "0",
                "--api",
                f"127.0.0.1:{cluster.membership_port}",
                "--ready-file",
                str(ready),
            ),
            env=env,
            stderr=err,
        )
    try:
        await wait_until(lambda: "the API at" in log.read_text(), "the intruder's first heartbeat")
        assert "refused our secret" in log.read_text()
        status = await cluster.client.status()
        assert status["live"] == 6
        assert len(status["buckets"]) == 6, "the intruder is known to the API"
    finally:
        await stop_process(proc)
    refused = [r.getMessage() for r in caplog.records if "membership endpoint refused" in r.getMessage()]
    assert refused, "the API logged no refused heartbeat"
    assert all("wrong credential" in line and "wrong-secret" not in line for line in refused)


@pytest.mark.parametrize("role", ["bucket", "api"])
async def test_no_secret_no_start(tmp_path: Path, role: str) -> None:
    data = tmp_path / "data"
    args = [role, "--data-dir", str(data), "--port", "0"]
    if role == "api":
        args += ["--membership-port", "0"]
    with trio.fail_after(30):
        proc = await trio.run_process(
            karma8_cmd(*args), env=cli_env(), capture_stdout=True, capture_stderr=True, check=False
        )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    prefix = "[bucket] secret" if role == "bucket" else "[api] bucket_secret"
    assert err.startswith(f"karma8: error: {prefix} is not set"), err
    assert "insecure = true" in err
    assert not data.exists(), "a process that refused to start created its data directory"


async def test_insecure_true_serves_without_a_secret(tmp_path: Path) -> None:
    ready, log = tmp_path / "b.ready", tmp_path / "b.log"
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            karma8_cmd(
                "bucket",
                "--data-dir",
                str(tmp_path / "b"),
                "--port",
                "0",
                "--api",
                f"127.0.0.1:{free_port()}",
                "--ready-file",
                str(ready),
            ),
            env=cli_env(KARMA8_BUCKET_INSECURE="true"),
            stderr=err,
        )
    try:
        await wait_until(ready.exists, "the insecure bucket to start")
        assert "anyone who reaches" in log.read_text()
    finally:
        await stop_process(proc)


# -- the client token ------------------------------------------------------------------


async def test_the_api_can_require_a_client_token(tmp_path: Path) -> None:
    async with open_secured_cluster(
        tmp_path, client_settings={"token": TOKEN}, client_token=TOKEN
    ) as cluster:
        src = tmp_path / "f"
        make_file(src, 100_000)
        for token in ("", "wrong-token-0123456789abcdef", TOKEN[:-1]):
            stranger = Client(ClientConfig.model_validate({"api": cluster.url, "token": token}))
            with pytest.raises(RemoteError) as info:
                await stranger.upload(src, "nope")
            assert info.value.code == "unauthorized"
            with pytest.raises(RemoteError, match="client token refused"):
                await stranger.status()
        assert cluster.all_files() == []
        assert cluster.uploads_recorded() == 0

        # On the wire: the error frame, then close code 4401.
        async with open_raw(cluster.url, "/files") as ws:
            assert (await expect_error(ws))["error"] == "unauthorized"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == CloseCode.UNAUTHORIZED
            assert CloseCode.UNAUTHORIZED.value == 4401

        await cluster.client.upload(src, "welcome")
        assert [f["name"] for f in await cluster.client.list()] == ["welcome"]


# -- karma8 up -------------------------------------------------------------------------


async def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            karma8_cmd(*args), env=cli_env(**env), capture_stdout=True, capture_stderr=True, check=False
        )


async def test_up_generates_keeps_and_hides_its_secret(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    log = tmp_path / "up.log"
    async with karma8_up(data, log, KARMA8_API_CLIENT_TOKEN=TOKEN) as stack:
        up, url = stack.proc, stack.url
        secret_file = data / "secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        children = [(pid, cmd) for pid, cmd in processes_mentioning(str(data)) if pid != up.pid]
        workers = StackConfig().workers  # API worker processes, one per core, beside their supervisor
        assert len(children) == 7 + (workers if workers > 1 else 0), children  # the API server and 6 buckets
        for pid, cmdline in children:
            assert secret not in cmdline
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"KARMA8_BUCKET_SECRET={secret}".encode() in environ
            assert f"KARMA8_API_BUCKET_SECRET={secret}".encode() in environ

        # The token this stack was started with is required; up itself passed it.
        refused = await _cli("status", "--api", url)
        assert refused.returncode == 1
        assert refused.stderr.decode().startswith("karma8: error: unauthorized:"), refused.stderr
        assert (await _cli("status", "--api", url, KARMA8_CLIENT_TOKEN=TOKEN)).returncode == 0
        await stop_with_ctrl_c(stack)

    async with karma8_up(data, log) as stack:
        url = stack.url
        assert (data / "secret").read_text().strip() == secret, "a restart made a new secret"
        ok = await _cli("status", "--api", url)  # no token by default
        assert ok.returncode == 0, ok.stderr
        assert "6 live bucket(s)" in ok.stdout.decode()
        await stop_with_ctrl_c(stack)
