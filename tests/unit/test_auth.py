"""Bearer credentials (karma8/core/auth.py) and how config validates them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.config import ApiConfig, BucketConfig, ClientConfig, load
from karma8.core.auth import CREDENTIAL, bearer, bearer_credential, header_value, refusal
from karma8.errors import ConfigError

SECRET = "s3cret-0123456789abcdef"

credentials = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=16)


@given(credentials)
def test_a_credential_survives_the_bearer_header(credential: str) -> None:
    assert CREDENTIAL.fullmatch(credential)
    assert bearer_credential(bearer(credential)) == credential
    assert refusal(bearer(credential), credential) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_credential(value: str | None, expected: str | None) -> None:
    assert bearer_credential(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "no credential"),
        (f"Basic {SECRET}", "not a Bearer credential"),
        (SECRET, "not a Bearer credential"),
        ("Bearer wrong-0123456789abcdef", "wrong credential"),
        (f"Bearer {SECRET[:-1]}", "wrong credential"),
        (f"Bearer {SECRET}x", "wrong credential"),
        (f"Bearer {SECRET} {SECRET}", "wrong credential"),
        (f"Bearer {SECRET}", None),
    ],
)
def test_refusal_says_why_without_revealing_anything(value: str | None, reason: str | None) -> None:
    assert refusal(value, SECRET) == reason
    assert SECRET not in (reason or "")


def test_header_value_is_case_insensitive() -> None:
    headers = [(b"Host", b"x"), (b"AUTHORIZATION", b"Bearer t"), (b"authorization", b"second")]
    assert header_value(headers, "authorization") == "Bearer t"
    assert header_value(headers, "cookie") is None


@pytest.mark.parametrize(
    ("cls", "key"),
    [
        (ApiConfig, "bucket_secret"),
        (ApiConfig, "client_token"),
        (BucketConfig, "secret"),
        (ClientConfig, "token"),
    ],
)
@pytest.mark.parametrize("bad", ["short", "has a space in it ok", "tab\there-0123456789", "é" * 20])
def test_config_refuses_credentials_that_cannot_travel_in_a_header(
    cls: type[ApiConfig | BucketConfig | ClientConfig], key: str, bad: str
) -> None:
    variable = f"{cls.env_prefix}{key.upper()}"
    with pytest.raises(ConfigError, match=key) as info:
        load(cls, environ={variable: bad})
    assert bad not in info.value.message


def test_config_keeps_credentials_out_of_repr() -> None:
    config = load(BucketConfig, environ={"KARMA8_BUCKET_SECRET": SECRET})
    assert config.secret.get_secret_value() == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config.model_dump())
    assert load(BucketConfig, environ={}).secret.get_secret_value() == ""
