"""TLS: every :class:`ssl.SSLContext` karma8 uses, built from the config in one place.

A server role serves TLS when its ``tls_cert`` (and ``tls_key``) is set; a role dials
TLS when its ``tls_ca`` is set, and then verifies the peer's certificate against that CA
and the host name it dials. The client also uses TLS for any ``wss://`` URL (with the
system's CAs when ``tls_ca`` is unset). gRPC contexts negotiate HTTP/2 by ALPN and use
the cipher suites HTTP/2 allows, like grpclib's own default context.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from karma8.config import ApiConfig, BucketConfig, ClientConfig
from karma8.errors import ConfigError

# RFC 7540 section 9.2.2 forbids the rest for HTTP/2 over TLS 1.2 (TLS 1.3 is unaffected).
_H2_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class ApiTls:
    """The API server's contexts; None where TLS is off."""

    #: Serves the WebSocket side (wss).
    websocket: ssl.SSLContext | None
    #: Serves the membership endpoint buckets heartbeat to.
    membership: ssl.SSLContext | None
    #: Dials the buckets.
    buckets: ssl.SSLContext | None


@dataclass(frozen=True, slots=True)
class BucketTls:
    """A bucket's contexts; None where TLS is off."""

    #: Serves the Bucket gRPC service.
    server: ssl.SSLContext | None
    #: Dials the API server's membership endpoint.
    heartbeat: ssl.SSLContext | None


def api_tls(config: ApiConfig) -> ApiTls:
    """The API server's contexts.

    Raises:
        ConfigError: half a certificate pair, or a file that cannot be loaded.
    """
    return ApiTls(
        websocket=_server_context("api", config.tls_cert, config.tls_key, http2=False),
        membership=_server_context("api", config.tls_cert, config.tls_key, http2=True),
        buckets=_client_context("api", config.tls_ca, http2=True) if config.tls_ca else None,
    )


def bucket_tls(config: BucketConfig) -> BucketTls:
    """A bucket's contexts.

    Raises:
        ConfigError: half a certificate pair, or a file that cannot be loaded.
    """
    return BucketTls(
        server=_server_context("bucket", config.tls_cert, config.tls_key, http2=True),
        heartbeat=_client_context("bucket", config.tls_ca, http2=True) if config.tls_ca else None,
    )


def client_tls(config: ClientConfig) -> ssl.SSLContext | None:
    """The client's context for a ``wss://`` API URL; None for ``ws://``.

    Raises:
        ConfigError: ``tls_ca`` cannot be loaded.
    """
    if urlsplit(config.api).scheme != "wss":
        return None
    return _client_context("client", config.tls_ca, http2=False)


def _server_context(
    section: str, cert: Path | None, key: Path | None, *, http2: bool
) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"[{section}] tls_cert and tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[{section}] cannot load tls_cert {cert} with tls_key {key}: {_reason(exc)}"
        ) from None
    if http2:
        context.set_ciphers(_H2_CIPHERS)
        context.set_alpn_protocols(["h2"])
    return context


def _client_context(section: str, ca: Path | None, *, http2: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[{section}] cannot load tls_ca {ca}: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if http2:
        context.set_ciphers(_H2_CIPHERS)
        context.set_alpn_protocols(["h2"])
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return str(exc.strerror or exc)
