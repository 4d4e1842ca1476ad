"""Configuration: one frozen, validated object per process.

Values come, in rising precedence, from the defaults below, a TOML file (``--config``,
one table per role: ``[api]``, ``[bucket]``, ``[client]``, ``[stack]``), ``KARMA8_*``
environment variables (``KARMA8_API_PORT``, ``KARMA8_BUCKET_DATA_DIR``, ...; the client's
API address is plain ``KARMA8_API``), and command-line options. Unknown keys, unknown
``KARMA8_<ROLE>_*`` variables and bad values are errors. docs/configuration.md lists
every key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from karma8.core.auth import CREDENTIAL, CREDENTIAL_RULE
from karma8.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": 1024 * GiB,
    "tb": 1024 * GiB,
    "tib": 1024 * GiB,
}
_SIZE = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> object:
    """Accept ``1048576``, ``"1MiB"``, ``"256k"`` (binary units) for byte sizes."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {value!r} (try 1048576, '256KiB', '1MiB')")
        return int(match.group(1)) * _UNITS[match.group(2).lower()]
    return value


def _not_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1; a boolean is never a number here.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
ByteSize = Annotated[int, BeforeValidator(parse_size), BeforeValidator(_not_bool), Field(ge=0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), BeforeValidator(_not_bool), Field(gt=0)]
Port = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


def _credential(value: SecretStr) -> SecretStr:
    # It travels as "authorization: Bearer <value>", so it must fit in a header as is.
    if value.get_secret_value() and not CREDENTIAL.fullmatch(value.get_secret_value()):
        raise ValueError(f"must be empty or {CREDENTIAL_RULE}")
    return value


#: A shared secret or token: empty (unset) or CREDENTIAL; never shown in repr or logs.
Credential = Annotated[SecretStr, AfterValidator(_credential)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    #: The TOML table of this role.
    section: ClassVar[str]
    #: Prefix of this role's environment variables.
    env_prefix: ClassVar[str]
    #: Extra environment variables that set a field: {"KARMA8_API": "api"}.
    env_aliases: ClassVar[dict[str, str]] = {}


class ApiConfig(_Section):
    """The API server (``karma8 api``)."""

    section = "api"
    env_prefix = "KARMA8_API_"

    host: str = Field("127.0.0.1", description="Address the WebSocket server binds.")
    port: Port = Field(8080, description="WebSocket port for clients (0 picks a free one).")
    membership_host: str = Field(
        "127.0.0.1", description="Address of the gRPC endpoint buckets register with."
    )
    membership_port: Port = Field(8081, description="gRPC port buckets register with (0 picks a free one).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the /metrics, /healthz, /ready endpoint binds."
    )
    metrics_port: Port = Field(
        9090, description="HTTP port of /metrics, /healthz and /ready (0 picks a free one)."
    )
    data_dir: Path = Field(Path("karma8-data/api"), description="Holds the registry database.")
    server_id: str = Field(
        "",
        description="This API server's name among those sharing the registry (stable across"
        " restarts); empty: HOSTNAME:PORT, or HOSTNAME:DATA_DIR when the port is 0.",
    )
    server_timeout: Seconds = Field(
        30.0,
        description="Silence after which another API server counts as dead: its uploads in"
        " progress fail and its moves are abandoned.",
    )
    job_lease: Seconds = Field(
        10.0,
        description="Lease of a background job (janitor, rebalancer, reconciliation, repair) held"
        " by one API server and renewed every heartbeat interval; another takes the job over"
        " within this time when the holder dies.",
    )
    registry_url: SecretStr = Field(
        SecretStr(""),
        description="The registry's database: postgresql://USER:PASSWORD@HOST/DB (shared by several"
        " API servers) or sqlite:PATH; empty: data_dir/registry.sqlite3.",
    )
    parts: Int = Field(6, ge=1, le=64, description="Data parts per file, each on a distinct bucket.")
    parity: Int = Field(
        2,
        ge=0,
        le=16,
        description="Parity parts per file (erasure coding): a file survives the loss of this many"
        " of its buckets (0: none).",
    )
    write_quorum: Int = Field(
        0,
        ge=0,
        le=80,
        description="Fragments durable before an upload is acknowledged (0: parts + 1 with parity;"
        " parts + parity: every fragment).",
    )
    degraded_writes: bool = Field(
        True,
        description="With fewer live buckets than the write quorum, write to all of them (at least"
        " parts) and owe the rest to repair; false: refuse with not_enough_buckets.",
    )
    stripe_timeout: Seconds = Field(
        5.0,
        description="A fragment that delivers nothing this long while a download waits for it is"
        " read around (decoded from the others).",
    )
    stripe_unit: PositiveSize = Field(
        512 * KiB, description="Largest stripe unit (also the gRPC chunk size)."
    )
    max_frame: PositiveSize = Field(MiB, description="Largest WebSocket data frame accepted or sent.")
    max_file_size: PositiveSize = Field(10 * GiB, description="Largest file accepted.")
    queue_depth: Int = Field(1, ge=1, le=64, description="Chunks buffered per bucket stream.")
    receive_buffer: PositiveSize = Field(256 * KiB, description="WebSocket socket read size.")
    bucket_timeout: Seconds = Field(10.0, description="Silence after which a bucket is not live.")
    heartbeat_interval: Seconds = Field(2.0, description="How often buckets are told to heartbeat.")
    connect_timeout: Seconds = Field(5.0, description="Limit for opening a gRPC stream to a bucket.")
    idle_timeout: Seconds = Field(60.0, description="Limit for a client that stops sending or reading.")
    handshake_timeout: Seconds = Field(
        10.0, description="Limit for a client to complete (or close) the WebSocket handshake."
    )
    cleanup_timeout: Seconds = Field(30.0, description="Deadline of the shielded cleanup of a failed upload.")
    janitor_interval: Seconds = Field(5.0, description="How often pending fragment deletions are retried.")
    grpc_stream_window: PositiveSize = Field(
        MiB, description="HTTP/2 receive window per bucket stream (bounds buffered data)."
    )
    grpc_connection_window: PositiveSize = Field(
        16 * MiB, description="HTTP/2 receive window per bucket connection."
    )
    reconcile_interval: Seconds = Field(
        600.0, description="How often every live bucket's listing is reconciled with the registry."
    )
    orphan_grace: Seconds = Field(
        3600.0, description="Age after which a fragment unknown to the registry is deleted."
    )
    janitor_concurrency: Int = Field(16, ge=1, le=1024, description="Uploads deleted at once by the janitor.")
    rpc_timeout: Seconds = Field(10.0, description="Limit for one Delete/List/usage call to a bucket.")
    rebalance_auto: bool = Field(
        True, description="Rebalance by itself when buckets join and when the spread exceeds the threshold."
    )
    rebalance_threshold: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Rebalance when the fullest bucket is this much fuller than the emptiest (0.05: 5%);"
        " a rebalance evens them to half of it.",
    )
    rebalance_interval: Seconds = Field(60.0, description="How often the spread is checked.")
    rebalance_delay: float = Field(
        5.0, ge=0, description="Wait after a bucket joins before rebalancing (buckets added together)."
    )
    rebalance_bandwidth: ByteSize = Field(
        32 * MiB, description="Bytes per second the rebalancer copies at most (0: unlimited)."
    )
    rebalance_concurrency: Int = Field(2, ge=1, le=64, description="Fragments the rebalancer moves at once.")
    repair_after: Seconds = Field(
        600.0,
        description="A bucket not live for this long is lost: its fragments are rebuilt elsewhere"
        " (a bucket down for less triggers nothing).",
    )
    repair_interval: Seconds = Field(
        10.0, description="How often the repair queue and lost buckets are checked (also on demand)."
    )
    repair_bandwidth: ByteSize = Field(
        64 * MiB,
        description="Bytes per second repairs read at most (0: unlimited); files with no fragment"
        " to spare are repaired unthrottled.",
    )
    repair_concurrency: Int = Field(2, ge=1, le=64, description="Files repaired at once.")
    ready_file: Path | None = Field(None, description="Write the bound ports here as JSON once serving.")
    uvloop: bool = Field(True, description="Run the gRPC side on uvloop when it is installed.")
    workers: Int = Field(
        1,
        ge=1,
        le=64,
        description="API processes on this host, sharing its ports (SO_REUSEPORT) and the registry:"
        " one per core uses every core.",
    )
    share_ports: bool = Field(
        False,
        description="Bind the WebSocket and membership ports with SO_REUSEPORT (set for each"
        " process of workers > 1).",
    )
    bucket_secret: Credential = Field(
        SecretStr(""), description="Shared secret sent to buckets and required of their heartbeats."
    )
    insecure: bool = Field(
        False, description="Allow running without bucket_secret (unauthenticated buckets)."
    )
    client_token: Credential = Field(
        SecretStr(""), description="Token clients must send (empty: no token required)."
    )
    tls_cert: Path | None = Field(None, description="Certificate (PEM): serve wss and TLS membership.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of tls_cert.")
    tls_ca: Path | None = Field(
        None, description="CA (PEM) of the buckets' certificates: dial buckets over TLS."
    )

    @model_validator(mode="after")
    def _coding(self) -> ApiConfig:
        if self.parts + self.parity > 64:
            raise ValueError(f"parts + parity is {self.parts + self.parity}; at most 64")
        if self.write_quorum and not self.parts <= self.write_quorum <= self.parts + self.parity:
            raise ValueError(
                f"write_quorum {self.write_quorum} must be between parts ({self.parts})"
                f" and parts + parity ({self.parts + self.parity}), or 0 for the default"
            )
        return self

    @property
    def quorum(self) -> int:
        """Fragments that must be durable for an upload's ack (write_quorum resolved)."""
        return self.write_quorum or self.parts + min(1, self.parity)

    @property
    def registry_path(self) -> Path:
        """The default (SQLite) registry database."""
        return self.data_dir / "registry.sqlite3"

    @property
    def server_name(self) -> str:
        """``server_id``, or its default: HOSTNAME:PORT, HOSTNAME:DATA_DIR when the port is 0
        (stable across restarts, so a restart ends its own uploads at once)."""
        return self.server_id or f"{socket.gethostname()}:{self.port or self.data_dir.resolve()}"

    @property
    def registry(self) -> str:
        """Where the registry is: ``registry_url``, or the SQLite file in ``data_dir``."""
        return self.registry_url.get_secret_value() or str(self.registry_path)


#: Bind addresses that mean "every address of this host".
WILDCARD_HOSTS = frozenset({"0.0.0.0", "", "::"})


class BucketConfig(_Section):
    """A bucket server (``karma8 bucket``)."""

    section = "bucket"
    env_prefix = "KARMA8_BUCKET_"

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: Port = Field(9100, description="gRPC port (0 picks a free one).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the /metrics, /healthz, /ready endpoint binds."
    )
    metrics_port: Port = Field(
        9101, description="HTTP port of /metrics, /healthz and /ready (0 picks a free one)."
    )
    advertise_host: str = Field("", description="Host the API should dial (default: host).")
    data_dir: Path = Field(Path("karma8-data/bucket"), description="Fragments and the bucket's identity.")
    api: str = Field(
        "127.0.0.1:8081",
        description="host:port of the API server's membership endpoint; several API servers on one"
        " registry: a comma-separated list (heartbeats go to one, the next when it fails).",
    )
    capacity: ByteSize = Field(0, description="Bytes this bucket may hold (0: the whole filesystem).")
    max_chunk: PositiveSize = Field(4 * MiB, description="Largest data message accepted in a Put.")
    read_chunk_max: PositiveSize = Field(4 * MiB, description="Largest chunk a Get may ask for.")
    heartbeat_interval: Seconds = Field(2.0, description="Heartbeat period until the API says otherwise.")
    idle_timeout: Seconds = Field(
        120.0, description="A Put that receives nothing for this long is dropped (its sender is gone)."
    )
    retry_max: Seconds = Field(5.0, description="Longest backoff between registration attempts.")
    fsync: bool = Field(True, description="fsync fragments before acknowledging them.")
    volume_size: PositiveSize = Field(
        256 * MiB, description="A volume (small fragments appended as needles) is sealed at this size."
    )
    compact_interval: Seconds = Field(60.0, description="Period of the check for volumes to compact.")
    compact_garbage: float = Field(
        0.5, gt=0, le=1, description="A sealed volume is compacted once this share of its bytes is dead."
    )
    shutdown_timeout: Seconds = Field(5.0, description="Deadline for a graceful shutdown.")
    ready_file: Path | None = Field(None, description="Write the bound ports here as JSON once serving.")
    uvloop: bool = Field(True, description="Use uvloop when it is installed.")
    secret: Credential = Field(
        SecretStr(""), description="Shared secret required of every call and sent with heartbeats."
    )
    insecure: bool = Field(False, description="Allow serving without a secret (anyone can read and write).")
    tls_cert: Path | None = Field(None, description="Certificate (PEM): serve gRPC over TLS.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of tls_cert.")
    tls_ca: Path | None = Field(None, description="CA (PEM) of the API's certificate: heartbeat over TLS.")

    @property
    def apis(self) -> list[str]:
        """The membership endpoints of ``api``, in order (``host:port`` each)."""
        return [a.strip() for a in self.api.split(",") if a.strip()]

    @property
    def advertised_host(self) -> str:
        """The host part of the address sent to the API."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host


class ClientConfig(_Section):
    """The client library and CLI commands that talk to an API server."""

    section = "client"
    env_prefix = "KARMA8_CLIENT_"
    env_aliases = {"KARMA8_API": "api"}

    api: str = Field("ws://127.0.0.1:8080", description="WebSocket URL of the API server.")
    frame_size: PositiveSize = Field(MiB, description="Data frame size for uploads (<= server max_frame).")
    max_message: PositiveSize = Field(
        64 * MiB, description="Largest frame accepted from the server (/files replies can be big)."
    )
    receive_buffer: PositiveSize = Field(256 * KiB, description="WebSocket socket read size.")
    connect_timeout: Seconds = Field(10.0, description="Limit for connecting to the API server.")
    idle_timeout: Seconds = Field(120.0, description="Limit for a server that stops answering.")
    token: Credential = Field(SecretStr(""), description="Token sent to the API server (its client_token).")
    tls_ca: Path | None = Field(
        None, description="CA (PEM) of the API's certificate for wss:// (default: system CAs)."
    )


class StackConfig(_Section):
    """The local stack (``karma8 up``): an API server and buckets as child processes."""

    section = "stack"
    env_prefix = "KARMA8_STACK_"

    data: Path = Field(Path("karma8-data"), description="Root data directory (api/, bucket-N/).")
    buckets: Int = Field(8, ge=1, le=256, description="How many buckets to start.")
    port: Port = Field(8080, description="WebSocket port of the API server.")
    membership_port: Port = Field(
        0, description="Membership gRPC port of the API server (0 picks a free one, kept across restarts)."
    )
    metrics_port: Port = Field(
        0, description="The API server's /metrics port (0 picks a free one, kept across restarts)."
    )
    api_workers: Int = Field(
        0, ge=0, le=64, description="API processes (karma8 api --workers): 0 starts one per core."
    )
    registry: SecretStr = Field(
        SecretStr(""),
        description="The API's registry: a postgresql:// URL of an existing database; empty: SQLite"
        " in DATA/api.",
    )
    start_timeout: Seconds = Field(30.0, description="Limit for the stack to become ready.")
    stop_timeout: Seconds = Field(10.0, description="Limit for children to exit before SIGKILL.")
    restart_delay_max: Seconds = Field(
        30.0, description="Longest wait before restarting a child that exited (the wait doubles from 0.5 s)."
    )
    start_failures: Int = Field(
        5, ge=1, le=1000, description="A child that fails to start this many times in a row stops the stack."
    )

    @property
    def workers(self) -> int:
        """API processes to run: ``api_workers``, or one per core."""
        return self.api_workers or max(1, min(os.cpu_count() or 1, 64))


S = TypeVar("S", bound=_Section)

SECTIONS: tuple[type[_Section], ...] = (ApiConfig, BucketConfig, ClientConfig, StackConfig)


def read_toml(path: Path | None) -> dict[str, Any]:
    """Read a config file; unknown tables are errors."""
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {s.section for s in SECTIONS}
    if unknown:
        raise ConfigError(f"config {path}: unknown table(s) {sorted(unknown)}")
    return data


def env_values(cls: type[_Section], environ: Mapping[str, str]) -> dict[str, str]:
    """The fields ``environ`` sets for ``cls``; unknown ``KARMA8_<ROLE>_*`` are errors."""
    # Aliases first, so that the role's own variable (KARMA8_CLIENT_API) wins over one.
    values = {field: environ[key] for key, field in cls.env_aliases.items() if key in environ}
    for key, value in environ.items():
        if key.startswith(cls.env_prefix):
            field = key[len(cls.env_prefix) :].lower()
            if field not in cls.model_fields:
                raise ConfigError(f"unknown setting {key} (see docs/configuration.md)")
            values[field] = value
    return values


def load(
    cls: type[S],
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> S:
    """Build the config of one role: defaults < TOML < environment < overrides.

    ``overrides`` whose value is None are ignored, so CLI options can be passed as is.

    Raises:
        ConfigError: unknown key or variable, bad value, unreadable file.
    """
    section = read_toml(path).get(cls.section, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{cls.section}] must be a table")
    values: dict[str, Any] = dict(section)
    values.update(env_values(cls, os.environ if environ is None else environ))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid [{cls.section}] configuration: {problems}") from None
