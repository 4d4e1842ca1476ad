"""Stripe arithmetic (Layout) and the stream cutter (Striper)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karma8.core.layout import Layout, Striper

MiB = 1024 * 1024

sizes = st.integers(min_value=0, max_value=50 * MiB)
parts_counts = st.integers(min_value=1, max_value=12)
max_units = st.integers(min_value=1, max_value=4096)


@settings(max_examples=300, deadline=None)
@given(size=sizes, parts=parts_counts, max_unit=max_units)
def test_part_sizes_add_up_and_are_balanced(size: int, parts: int, max_unit: int) -> None:
    layout = Layout.for_size(size, parts, max_unit)
    part_sizes = layout.part_sizes()

    assert len(part_sizes) == parts
    assert sum(part_sizes) == size
    assert 1 <= layout.unit <= max_unit
    for part_size in part_sizes:
        assert abs(part_size - size / parts) <= layout.unit
    if size >= parts:
        assert all(part_size > 0 for part_size in part_sizes)


@settings(max_examples=300, deadline=None)
@given(size=sizes, parts=parts_counts, max_unit=max_units)
def test_units_cover_the_file(size: int, parts: int, max_unit: int) -> None:
    layout = Layout.for_size(size, parts, max_unit)
    n = layout.unit_count

    if size == 0:
        assert n == 0
    else:
        assert (n - 1) * layout.unit < size <= n * layout.unit
        # Every unit is whole except possibly the last one.
        assert layout.unit_length(0) == min(layout.unit, size)
        if n > 1:
            assert layout.unit_length(n - 2) == layout.unit
        assert 0 < layout.unit_length(n - 1) <= layout.unit
        assert (n - 1) * layout.unit + layout.unit_length(n - 1) == size
    with pytest.raises(IndexError):
        layout.unit_length(n)
    with pytest.raises(IndexError):
        layout.unit_length(-1)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=20_000),
    parts=parts_counts,
    max_unit=max_units,
)
def test_unit_lengths_sum_to_size_and_match_parts(size: int, parts: int, max_unit: int) -> None:
    layout = Layout.for_size(size, parts, max_unit)
    per_part = [0] * parts
    for k in range(layout.unit_count):
        per_part[layout.part_of(k)] += layout.unit_length(k)

    assert sum(per_part) == size
    assert per_part == layout.part_sizes()


def test_empty_file_has_no_units_and_empty_parts() -> None:
    layout = Layout.for_size(0, 6, 1024)

    assert layout.unit_count == 0
    assert layout.part_sizes() == [0] * 6


def test_small_file_puts_data_on_every_part() -> None:
    # 6 bytes over 6 parts: one byte per part even though max_unit is large.
    layout = Layout.for_size(6, 6, 1 << 20)

    assert layout.unit == 1
    assert layout.part_sizes() == [1] * 6


def test_big_file_uses_max_unit() -> None:
    layout = Layout.for_size(10 * MiB + 5, 6, MiB)

    assert layout.unit == MiB
    assert layout.unit_count == 11
    # Units 0..10: parts 0..4 get two units, part 5 one; unit 10 (part 4) holds 5 bytes.
    assert layout.part_sizes() == [2 * MiB, 2 * MiB, 2 * MiB, 2 * MiB, MiB + 5, MiB]


@pytest.mark.parametrize(
    ("size", "parts", "unit"),
    [(-1, 1, 1), (0, 0, 1), (0, 1, 0)],
)
def test_invalid_layouts_are_refused(size: int, parts: int, unit: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        Layout(size=size, parts=parts, unit=unit)


def test_part_size_out_of_range() -> None:
    layout = Layout.for_size(100, 3, 10)

    with pytest.raises(IndexError):
        layout.part_size(3)
    with pytest.raises(IndexError):
        layout.part_size(-1)


def _frames(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=20_000),
    parts=parts_counts,
    max_unit=max_units,
    seed=st.integers(min_value=0, max_value=2**32),
    draw=st.data(),
)
def test_striper_reassembles_any_frame_split(
    size: int, parts: int, max_unit: int, seed: int, draw: st.DataObject
) -> None:
    data = random.Random(seed).randbytes(size)
    layout = Layout.for_size(size, parts, max_unit)
    striper = Striper(layout)
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=size), max_size=30), label="cuts")

    units: list[tuple[int, bytes]] = []
    frames = _frames(data, cuts)
    fed = 0
    for frame in frames:
        units.extend(striper.feed(frame))
        fed += len(frame)
        assert striper.complete == (fed == size)
    assert striper.complete
    assert striper.received == size

    assert len(units) == layout.unit_count
    assert b"".join(chunk for _, chunk in units) == data
    per_part = [bytearray() for _ in range(parts)]
    for k, (part, chunk) in enumerate(units):
        assert part == k % parts
        assert len(chunk) == layout.unit_length(k)
        per_part[part] += chunk
    assert [len(p) for p in per_part] == layout.part_sizes()


def test_striper_complete_only_after_the_last_byte() -> None:
    striper = Striper(Layout.for_size(10, 2, 4))

    assert not striper.complete
    striper.feed(b"abcd")
    assert not striper.complete
    striper.feed(b"efghi")
    assert not striper.complete
    striper.feed(b"j")
    assert striper.complete


def test_empty_file_is_complete_at_once() -> None:
    striper = Striper(Layout.for_size(0, 6, 4))

    assert striper.complete
    assert striper.feed(b"") == []
    assert striper.complete


@pytest.mark.parametrize("split", [0, 3, 10])
def test_striper_refuses_bytes_past_the_size(split: int) -> None:
    striper = Striper(Layout.for_size(10, 2, 4))
    units = striper.feed(b"x" * split)

    with pytest.raises(OverflowError):
        striper.feed(b"y" * (11 - split))
    # The refused frame changed nothing: the rest of the file still fits.
    assert striper.received == split
    units += striper.feed(b"z" * (10 - split))
    assert striper.complete
    assert b"".join(chunk for _, chunk in units) == b"x" * split + b"z" * (10 - split)
    with pytest.raises(OverflowError):
        striper.feed(b"!")


def test_frame_equal_to_a_unit_is_passed_through() -> None:
    layout = Layout.for_size(12, 3, 4)
    striper = Striper(layout)
    frames = [bytes([i]) * 4 for i in range(3)]

    for k, frame in enumerate(frames):
        ((part, chunk),) = striper.feed(frame)
        assert part == k
        assert chunk is frame


def test_frame_holding_several_units_is_cut() -> None:
    striper = Striper(Layout.for_size(12, 3, 4))

    out = striper.feed(b"aaaabbbbcc")
    assert out == [(0, b"aaaa"), (1, b"bbbb")]
    assert striper.feed(b"cc") == [(2, b"cccc")]
