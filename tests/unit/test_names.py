"""File name rules and their percent-encoding in request paths."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from karma8.core.names import MAX_NAME_BYTES, decode_name, encode_name, validate_name
from karma8.errors import BadName

# -- validate_name ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "report.csv",
        "dir/sub/file.txt",
        "...",
        "a..b",
        ".hidden",
        "x/.config",
        "with space",
        "100%",
        "?#&=+",
        "日本語/ファイル",
        "😀",
        "tab-free\u00a0nbsp",
        "a\u2028b",
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


def test_empty_name() -> None:
    with pytest.raises(BadName, match="empty"):
        validate_name("")


@pytest.mark.parametrize(
    ("unit", "count"),
    [("a", 1), ("é", 2), ("日", 3), ("😀", 4)],
)
def test_length_is_counted_in_utf8_bytes(unit: str, count: int) -> None:
    longest = unit * (MAX_NAME_BYTES // count) + "a" * (MAX_NAME_BYTES % count)
    assert len(longest.encode()) == MAX_NAME_BYTES
    assert validate_name(longest) == longest

    # One more byte, or a last character that does not fit in whole.
    for too_long in (longest + "a", "a" * (MAX_NAME_BYTES - count + 1) + unit):
        assert len(too_long.encode()) == MAX_NAME_BYTES + 1
        with pytest.raises(BadName, match="1025 bytes"):
            validate_name(too_long)


def test_multibyte_name_of_few_characters_is_too_long() -> None:
    # 342 characters, but 1026 bytes.
    name = "日" * 342
    assert len(name) < MAX_NAME_BYTES
    with pytest.raises(BadName, match="bytes"):
        validate_name(name)


@pytest.mark.parametrize("ch", ["\x00", "\x01", "\n", "\r", "\t", "\x1f", "\x7f", "\x80", "\x85", "\x9f"])
def test_control_characters(ch: str) -> None:
    with pytest.raises(BadName, match=f"U\\+{ord(ch):04X}"):
        validate_name(f"a{ch}b")


@pytest.mark.parametrize(
    "name",
    [".", "..", "a/..", "../a", "a/../b", "a/./b", "./a", "a/.", "/a", "a/", "a//b", "/", "//"],
)
def test_bad_segments(name: str) -> None:
    with pytest.raises(BadName, match="segment"):
        validate_name(name)


def test_lone_surrogate() -> None:
    with pytest.raises(BadName, match="UTF-8"):
        validate_name("a\ud800b")


# -- decode_name / encode_name -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("plain", "plain"),
        ("a%20b", "a b"),
        ("a/b", "a/b"),
        ("a%2Fb", "a/b"),
        ("%C3%A9", "é"),
        ("%c3%a9", "é"),
        ("é", "é"),
        ("100%25", "100%"),
        ("%F0%9F%98%80", "😀"),
    ],
)
def test_decode(raw: str, name: str) -> None:
    assert decode_name(raw) == name


@pytest.mark.parametrize("raw", ["%ff", "a%C3", "%C3%28", "%ED%A0%80", "%80"])
def test_decode_invalid_utf8(raw: str) -> None:
    with pytest.raises(BadName, match="UTF-8"):
        decode_name(raw)


@pytest.mark.parametrize("raw", ["%zz", "a%", "a%4", "%g0", "ok%20then%", "%%41"])
def test_decode_malformed_escapes(raw: str) -> None:
    with pytest.raises(BadName, match="percent escape"):
        decode_name(raw)


@pytest.mark.parametrize("raw", ["", "%2e%2e", "a/%2E%2E/b", "a%2F%2Fb", "%00", "a%0Ab", "%C2%85", "%2F"])
def test_decode_applies_the_name_rules(raw: str) -> None:
    with pytest.raises(BadName):
        decode_name(raw)


def test_decode_counts_decoded_bytes() -> None:
    # Encoded, 1024 'é' is far longer than 1024 characters; decoded it is 1024 bytes.
    assert decode_name("%C3%A9" * 512) == "é" * 512
    with pytest.raises(BadName, match="1025 bytes"):
        decode_name("%C3%A9" * 512 + "a")


def test_encode_keeps_slashes_readable() -> None:
    assert encode_name("dir/a b?.txt") == "dir/a%20b%3F.txt"
    assert encode_name("100%") == "100%25"
    assert encode_name("é") == "%C3%A9"


@pytest.mark.parametrize("name", ["", "a/../b", "a\x00", "a" * 1025])
def test_encode_refuses_invalid_names(name: str) -> None:
    with pytest.raises(BadName):
        encode_name(name)


def _is_valid(name: str) -> bool:
    try:
        validate_name(name)
    except BadName:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(
    st.text(
        alphabet=st.one_of(st.characters(), st.sampled_from("/.%?#&+ ")),
        min_size=1,
        max_size=300,
    )
)
def test_encode_decode_round_trip(name: str) -> None:
    assume(_is_valid(name))

    raw = encode_name(name)

    assert raw.isascii()
    assert "?" not in raw
    assert "#" not in raw
    assert decode_name(raw) == name
