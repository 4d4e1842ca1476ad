"""Erasure coding of stripes (karma8.core.coding): golden vectors and any-k-of-n properties."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karma8.core.coding import DEFAULT_CODEC, NO_CODEC, Scheme, StripeCoder, UndecodableError, _driver
from karma8.core.layout import Layout


def pattern(n: int, seed: str) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


# Recorded with pyeclib 1.8.0 (liberasurecode 1.6.x and ISA-L in its wheel). Stored files
# depend on these bytes: if this test fails after an upgrade, the upgrade must not ship.
GOLDEN = {
    (6, 2, 4096): (
        ["96294726d67beddd32fb396f51deec65", "9d702cc0df8a5f40a8fb28eb912d8d5e"],
        "c34c444bd2ddae39a3524c85083091f034b794deeb3381d854b89c6cf765154d",
    ),
    (6, 1, 4096): (
        ["a34ddab29c497534a28604c00db4a2f9"],
        "337a765ad437f4192fa8ababba8b7f49ec33ca16de6480bc67f111cd3e6644be",
    ),
    (4, 2, 1000): (
        ["230249c33fcdcaa8f13d2fcea5e70560", "09401ed03ab8116ca63c6ad11cd2048f"],
        "f1e9bd5d8bf11bb04d059ff242daa74106c98a1eebf636434d0fa1b175e4b25e",
    ),
}


@pytest.mark.parametrize(("k", "m", "length"), sorted(GOLDEN))
def test_golden_vectors(k: int, m: int, length: int) -> None:
    parity_digests, header_digest = GOLDEN[(k, m, length)]
    units = [pattern(length, f"{k}{m}{i}") for i in range(k)]
    parity = StripeCoder(Scheme.of(k, m)).encode(units)
    assert [hashlib.sha256(p).hexdigest()[:32] for p in parity] == parity_digests
    fragments = _driver(DEFAULT_CODEC, k, m).encode(b"".join(units))
    assert hashlib.sha256(b"".join(f[:80] for f in fragments)).hexdigest() == header_digest


def test_parity_rows_are_nested() -> None:
    """Parity unit j of a k+m file equals parity unit j of a k+m' file (j < m, m')."""
    units = [pattern(777, f"n{i}") for i in range(6)]
    p1 = StripeCoder(Scheme.of(6, 1)).encode(units)
    p2 = StripeCoder(Scheme.of(6, 2)).encode(units)
    p3 = StripeCoder(Scheme.of(6, 3)).encode(units)
    assert p1[0] == p2[0] == p3[0]
    assert p2[1] == p3[1]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 8),
    m=st.integers(1, 4),
    length=st.integers(1, 3000),
    short=st.integers(0, 8),
    seed=st.integers(0, 10**6),
)
def test_any_k_units_give_the_stripe_back(k: int, m: int, length: int, short: int, seed: int) -> None:
    # The last stripe of a file: later units shorter or absent.
    lengths = [length] + [max(0, length - short * (i + 1)) for i in range(k - 1)]
    units = [pattern(n, f"{seed}:{i}") for i, n in enumerate(lengths)]
    coder = StripeCoder(Scheme.of(k, m))
    stored = {i: u for i, u in enumerate(units)}
    stored.update({k + j: p for j, p in enumerate(coder.encode([u for u in units if u]))})
    assert all(len(stored[k + j]) == length for j in range(m))
    for keep in itertools.islice(itertools.combinations(range(k + m), k), 40):
        available = {i: stored[i] for i in keep}
        assert coder.decode(available, lengths) == units
        missing = [i for i in range(k + m) if i not in keep][::-1]
        assert coder.reconstruct(available, missing, lengths) == [stored[i] for i in missing]


def test_fewer_than_k_units_is_an_error() -> None:
    coder = StripeCoder(Scheme.of(6, 2))
    units = [pattern(64, str(i)) for i in range(6)]
    available = {i: units[i] for i in range(5)}
    with pytest.raises(UndecodableError):
        coder.decode(available, [64] * 6)


def test_scheme_rules() -> None:
    assert Scheme.of(6, 0) == Scheme(NO_CODEC, 6, 0)
    assert Scheme.of(6, 2).width == 8
    assert str(Scheme.of(6, 2)) == "6+2 (isa_l_rs_cauchy)"
    with pytest.raises(ValueError, match="codec"):
        Scheme(NO_CODEC, 6, 2)
    with pytest.raises(ValueError, match="unknown codec"):
        Scheme("zfec", 6, 2)
    with pytest.raises(ValueError, match="nothing to code"):
        StripeCoder(Scheme.of(6, 0))


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 10**6), parts=st.integers(1, 12), unit=st.integers(1, 5000), parity=st.integers(0, 4)
)
def test_parity_parts_are_as_long_as_part_zero(size: int, parts: int, unit: int, parity: int) -> None:
    layout = Layout.for_size(size, parts, unit, parity)
    sizes = layout.part_sizes()
    assert len(sizes) == parts + parity
    assert sum(sizes[:parts]) == size
    assert all(s == sizes[0] for s in sizes[parts:])
    stripes = [layout.stripe_lengths(s) for s in range(layout.stripe_count)]
    assert sum(s[0] for s in stripes) == sizes[0]
    assert [sum(s[p] for s in stripes) for p in range(parts)] == sizes[:parts]
    assert all(s == sorted(s, reverse=True) for s in stripes)
