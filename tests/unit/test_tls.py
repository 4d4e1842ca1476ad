"""TLS contexts built from config (karma8/tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from karma8.config import ApiConfig, BucketConfig, ClientConfig
from karma8.errors import ConfigError
from karma8.tls import api_tls, bucket_tls, client_tls


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1, as PEM files."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def test_everything_is_plaintext_by_default() -> None:
    api = api_tls(ApiConfig())
    assert (api.websocket, api.membership, api.buckets) == (None, None, None)
    bucket = bucket_tls(BucketConfig())
    assert (bucket.server, bucket.heartbeat) == (None, None)
    assert client_tls(ClientConfig(api="ws://127.0.0.1:8080")) is None


def test_contexts_from_files(pem: dict[str, Path]) -> None:
    api = api_tls(ApiConfig(tls_cert=pem["cert"], tls_key=pem["key"], tls_ca=pem["ca"]))
    assert isinstance(api.websocket, ssl.SSLContext)
    assert isinstance(api.membership, ssl.SSLContext)
    assert api.buckets is not None
    assert api.buckets.verify_mode is ssl.CERT_REQUIRED
    assert api.buckets.check_hostname
    bucket = bucket_tls(BucketConfig(tls_cert=pem["cert"], tls_key=pem["key"]))
    assert isinstance(bucket.server, ssl.SSLContext)
    assert bucket.heartbeat is None  # no tls_ca: heartbeats stay plaintext


def test_the_client_uses_tls_for_wss_only(pem: dict[str, Path]) -> None:
    assert client_tls(ClientConfig(api="ws://h:1", tls_ca=pem["ca"])) is None
    context = client_tls(ClientConfig(api="wss://h:1", tls_ca=pem["ca"]))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert client_tls(ClientConfig(api="wss://h:1")) is not None  # the system's CAs


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key"])
def test_half_a_certificate_pair_is_an_error(pem: dict[str, Path], missing: str) -> None:
    settings = {"tls_cert": pem["cert"], "tls_key": pem["key"], missing: None}
    with pytest.raises(ConfigError, match=r"\[bucket\] tls_cert and tls_key must be set together"):
        bucket_tls(BucketConfig.model_validate(settings))


def test_unloadable_files_are_one_line_errors(pem: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[api\] cannot load tls_cert") as info:
        api_tls(ApiConfig(tls_cert=tmp_path / "nope.pem", tls_key=pem["key"]))
    assert "\n" not in info.value.message
    with pytest.raises(ConfigError, match=r"\[api\] cannot load tls_cert"):
        api_tls(ApiConfig(tls_cert=pem["key"], tls_key=pem["cert"]))  # swapped
    with pytest.raises(ConfigError, match=r"\[client\] cannot load tls_ca"):
        client_tls(ClientConfig(api="wss://h:1", tls_ca=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"\[bucket\] cannot load tls_ca"):
        bucket_tls(BucketConfig(tls_ca=pem["key"]))  # not a certificate
