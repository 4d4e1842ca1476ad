"""Configuration: defaults < TOML < environment < overrides, validated and frozen."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from karma8.bucket.app import local_address_towards
from karma8.config import (
    ApiConfig,
    BucketConfig,
    ClientConfig,
    GiB,
    KiB,
    MiB,
    StackConfig,
    load,
)
from karma8.errors import ConfigError

Role = type[ApiConfig] | type[BucketConfig] | type[ClientConfig] | type[StackConfig]


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "karma8.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    api = load(ApiConfig, environ={})
    bucket = load(BucketConfig, environ={})
    client = load(ClientConfig, environ={})
    stack = load(StackConfig, environ={})

    assert (api.host, api.port, api.membership_port, api.parts) == ("127.0.0.1", 8080, 8081, 6)
    assert (api.stripe_unit, api.queue_depth, api.grpc_stream_window) == (512 * KiB, 1, MiB)
    assert api.max_file_size == 10 * GiB
    assert api.ready_file is None
    assert api.registry_path == Path("karma8-data/api/registry.sqlite3")
    assert (bucket.port, bucket.capacity, bucket.fsync) == (9100, 0, True)
    assert (api.metrics_host, api.metrics_port) == ("127.0.0.1", 9090)
    assert (bucket.metrics_host, bucket.metrics_port) == ("127.0.0.1", 9101)
    assert bucket.max_chunk == 4 * MiB
    assert client.api == "ws://127.0.0.1:8080"
    assert client.receive_buffer == 256 * KiB
    assert (stack.buckets, stack.membership_port, stack.metrics_port) == (8, 0, 0)
    assert (api.parity, api.quorum, api.degraded_writes) == (2, 7, True)


def test_no_file_is_like_an_empty_file(tmp_path: Path) -> None:
    assert load(ApiConfig, None, environ={}) == load(ApiConfig, _toml(tmp_path, ""), environ={})


def test_precedence(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [api]
        host = "0.0.0.0"
        port = 1000
        parts = 3
        data_dir = "from-toml"
        """,
    )
    environ = {"KARMA8_API_PORT": "2000", "KARMA8_API_PARTS": "4", "UNRELATED": "x"}

    config = load(ApiConfig, path, environ=environ, parts=5, data_dir=None)

    assert config.host == "0.0.0.0"  # TOML over the default
    assert config.port == 2000  # environment over TOML
    assert config.parts == 5  # override over environment
    assert config.data_dir == Path("from-toml")  # None overrides are ignored
    assert config.membership_port == 8081  # untouched default


def test_each_role_reads_its_own_table_and_variables(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [api]
        port = 1
        [bucket]
        port = 2
        [stack]
        port = 3
        """,
    )
    environ = {"KARMA8_BUCKET_CAPACITY": "1GiB", "KARMA8_STACK_BUCKETS": "9"}

    assert load(ApiConfig, path, environ=environ).port == 1
    bucket = load(BucketConfig, path, environ=environ)
    assert (bucket.port, bucket.capacity) == (2, GiB)
    stack = load(StackConfig, path, environ=environ)
    assert (stack.port, stack.buckets) == (3, 9)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (12, 12),
        ("12", 12),
        ("5b", 5),
        ("256k", 256 * KiB),
        ("256KB", 256 * KiB),
        ("256KiB", 256 * KiB),
        ("1MiB", MiB),
        ("1mib", MiB),
        ("1M", MiB),
        (" 2 MiB ", 2 * MiB),
        ("3g", 3 * GiB),
        ("1TiB", 1024 * GiB),
    ],
)
def test_byte_sizes(value: object, expected: int) -> None:
    assert load(ApiConfig, environ={}, stripe_unit=value).stripe_unit == expected


def test_byte_sizes_from_toml_and_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[api]\nmax_frame = "256k"\nmax_file_size = 1048576\n')

    config = load(ApiConfig, path, environ={"KARMA8_API_STRIPE_UNIT": "64KiB"})

    assert (config.max_frame, config.max_file_size, config.stripe_unit) == (256 * KiB, MiB, 64 * KiB)


@pytest.mark.parametrize("value", ["1.5MiB", "-1", "1 XB", "MiB", "", "1 M i B", "0", 0, -5])
def test_bad_byte_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match="stripe_unit"):
        load(ApiConfig, environ={}, stripe_unit=value)


def test_zero_capacity_means_the_whole_disk() -> None:
    assert load(BucketConfig, environ={}, capacity="0").capacity == 0


def test_unknown_key_in_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[api]\nport = 1\nprot = 2\n")

    with pytest.raises(ConfigError, match="prot"):
        load(ApiConfig, path, environ={})


def test_unknown_key_in_another_roles_table_is_found_by_that_role(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[api]\nport = 1\n[bucket]\ncapacityy = 1\n")

    assert load(ApiConfig, path, environ={}).port == 1
    with pytest.raises(ConfigError, match="capacityy"):
        load(BucketConfig, path, environ={})


def test_unknown_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[api]\nport = 1\n[buckets]\nport = 2\n")

    with pytest.raises(ConfigError, match="buckets"):
        load(ApiConfig, path, environ={})


def test_role_entry_that_is_not_a_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "api = 3\n")

    with pytest.raises(ConfigError, match=r"\[api\] must be a table"):
        load(ApiConfig, path, environ={})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(ApiConfig, tmp_path / "missing.toml", environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[api\nport = \n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load(ApiConfig, path, environ={})


@pytest.mark.parametrize(
    ("cls", "variable"),
    [
        (ApiConfig, "KARMA8_API_PROT"),
        (ApiConfig, "KARMA8_API_"),
        (ApiConfig, "KARMA8_API_SECTION"),
        (BucketConfig, "KARMA8_BUCKET_DATADIR"),
        (ClientConfig, "KARMA8_CLIENT_URL"),
        (StackConfig, "KARMA8_STACK_BUCKET"),
    ],
)
def test_unknown_variable(cls: Role, variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load(cls, environ={variable: "1"})


def test_other_roles_variables_are_not_checked() -> None:
    environ = {"KARMA8_BUCKET_NOPE": "1", "KARMA8_API": "ws://elsewhere:1", "KARMA8_OTHER": "x"}

    assert load(ApiConfig, environ=environ).port == 8080


def test_log_format_variable_is_not_a_role_setting() -> None:
    # KARMA8_LOG_FORMAT is read by the CLI (--log-format), not by any role's config.
    for cls in (ApiConfig, BucketConfig, ClientConfig, StackConfig):
        load(cls, environ={"KARMA8_LOG_FORMAT": "json"})


@pytest.mark.parametrize("cls", [ApiConfig, BucketConfig])
def test_a_metrics_port_set_anywhere_is_known_as_set(
    tmp_path: Path, cls: type[ApiConfig | BucketConfig]
) -> None:
    """The servers insist on a metrics port that was set, but not on the default one."""
    variable = f"{cls.env_prefix}METRICS_PORT"
    path = _toml(tmp_path, f"[{cls.section}]\nmetrics_port = 9300\n")

    assert "metrics_port" not in load(cls, environ={}).model_fields_set
    assert "metrics_port" not in load(cls, environ={}, metrics_port=None).model_fields_set  # no option
    assert "metrics_port" in load(cls, path, environ={}).model_fields_set
    assert "metrics_port" in load(cls, environ={variable: "0"}).model_fields_set
    assert load(cls, environ={}, metrics_port=9301).metrics_port == 9301


def test_api_alias_sets_the_client_api() -> None:
    client = load(ClientConfig, environ={"KARMA8_API": "ws://10.0.0.1:9000"})

    assert client.api == "ws://10.0.0.1:9000"
    assert load(ClientConfig, environ={"KARMA8_API": "ws://a:1"}, api="ws://b:2").api == "ws://b:2"


def test_variables_are_case_insensitive_after_the_prefix() -> None:
    assert load(ApiConfig, environ={"KARMA8_API_Port": "1234"}).port == 1234


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (ApiConfig, "port", "http"),
        (ApiConfig, "port", "65536"),
        (ApiConfig, "port", "-1"),
        (ApiConfig, "parts", "0"),
        (ApiConfig, "parts", "65"),
        (ApiConfig, "queue_depth", "0"),
        (ApiConfig, "bucket_timeout", "0"),
        (ApiConfig, "idle_timeout", "soon"),
        (ApiConfig, "uvloop", "maybe"),
        (ApiConfig, "metrics_port", "65536"),
        (BucketConfig, "metrics_port", "-1"),
        (BucketConfig, "metrics_port", "metrics"),
        (BucketConfig, "capacity", "-1"),
        (BucketConfig, "heartbeat_interval", "-2"),
        (ClientConfig, "frame_size", "big"),
        (StackConfig, "buckets", "0"),
        (StackConfig, "buckets", "257"),
    ],
)
def test_bad_values_name_the_field(cls: Role, field: str, value: str) -> None:
    variable = f"{cls.env_prefix}{field.upper()}"

    with pytest.raises(ConfigError, match=f"{cls.section}.*{field}"):
        load(cls, environ={variable: value})


@pytest.mark.parametrize(("field", "value"), [("port", "true"), ("stripe_unit", "true")])
def test_booleans_are_not_numbers(tmp_path: Path, field: str, value: str) -> None:
    # A TOML boolean where a number belongs is a mistake, not 1 or 0.
    path = _toml(tmp_path, f"[api]\n{field} = {value}\n")

    with pytest.raises(ConfigError, match=field):
        load(ApiConfig, path, environ={})


def test_bad_value_in_toml_names_the_field(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[bucket]\nmax_chunk = "lots"\n')

    with pytest.raises(ConfigError, match="max_chunk"):
        load(BucketConfig, path, environ={})


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match="colour"):
        load(ApiConfig, environ={}, colour="blue")


def test_config_is_frozen() -> None:
    config = load(ApiConfig, environ={})

    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.port = 1  # type: ignore[misc]
    assert config.port == 8080


def test_config_is_hashable_and_comparable() -> None:
    assert load(ApiConfig, environ={}) == load(ApiConfig, environ={})
    assert hash(load(ApiConfig, environ={})) == hash(load(ApiConfig, environ={}))


@pytest.mark.parametrize(
    ("host", "advertise", "expected"),
    [
        ("0.0.0.0", "", "127.0.0.1"),
        ("::", "", "127.0.0.1"),
        ("10.1.2.3", "", "10.1.2.3"),
        ("0.0.0.0", "bucket-1.local", "bucket-1.local"),
    ],
)
def test_bucket_advertised_host(host: str, advertise: str, expected: str) -> None:
    config = load(BucketConfig, environ={}, host=host, advertise_host=advertise)

    assert config.advertised_host == expected


def test_a_wildcard_bucket_advertises_the_address_that_reaches_the_api() -> None:
    assert local_address_towards("127.0.0.1:8081") == "127.0.0.1"
    assert local_address_towards("not an address") is None
    assert local_address_towards("no-such-host.invalid:8081") is None
