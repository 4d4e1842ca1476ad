"""Upload and fragment ids: the only strings a bucket turns into file names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karma8.core.fragments import (
    MAX_PARTS,
    check_upload_id,
    fragment_id,
    new_upload_id,
    parse_fragment_id,
)
from karma8.errors import BadRequest

UID = "0123456789abcdef0123456789abcdef"


def test_new_upload_ids_are_well_formed_and_fresh() -> None:
    ids = {new_upload_id() for _ in range(100)}

    assert len(ids) == 100
    for upload_id in ids:
        assert check_upload_id(upload_id) == upload_id


@settings(max_examples=200, deadline=None)
@given(
    upload_id=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    part=st.integers(min_value=0, max_value=MAX_PARTS - 1),
)
def test_fragment_id_round_trip(upload_id: str, part: int) -> None:
    fid = fragment_id(upload_id, part)

    assert fid == f"{upload_id}.{part}"
    assert parse_fragment_id(fid) == (upload_id, part)


@pytest.mark.parametrize("part", [0, 1, 9, 10, 63])
def test_fragment_id_parts(part: int) -> None:
    assert parse_fragment_id(f"{UID}.{part}") == (UID, part)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        UID,
        f"{UID}.",
        f".{UID}.0",
        f"{UID}.64",
        f"{UID}.99",
        f"{UID}.100",
        f"{UID}.01",
        f"{UID}.00",
        f"{UID}.-1",
        f"{UID}.+1",
        f"{UID}. 1",
        f"{UID}.1 ",
        f"{UID}.0\n",
        f"{UID}\n.0",
        f"\n{UID}.0",
        f"{UID}.0.0",
        f"{UID}.\u0663",  # an Arabic-Indic digit three is not a part number
        f"{UID.upper()}.0",
        f"{UID[:-1]}A.0",
        f"{UID[:-1]}.0",
        f"{UID}0.0",
        f"{UID[:-1]}g.0",
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        f"/{UID}.0",
        f"{UID}.0/../..",
        f"{UID[:2]}/{UID}.0",
        f"../{UID}.0",
        "x" * 32 + ".0/../..",
        f"{UID}.0\x00",
        f"{UID}.0/",
        f"{UID}.0\\..",
    ],
)
def test_hostile_fragment_ids_are_rejected(value: str) -> None:
    with pytest.raises(BadRequest, match="malformed fragment id"):
        parse_fragment_id(value)


@pytest.mark.parametrize(
    "value",
    ["", UID.upper(), UID[:-1], UID + "0", UID + "\n", "../" + UID[3:], f"{UID}.0", " " * 32, "g" * 32],
)
def test_hostile_upload_ids_are_rejected(value: str) -> None:
    with pytest.raises(BadRequest, match="malformed upload id"):
        check_upload_id(value)


def test_fragment_id_checks_the_upload_id() -> None:
    with pytest.raises(BadRequest):
        fragment_id("../../etc", 0)
