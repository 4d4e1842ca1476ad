"""Stripe arithmetic: how a file's bytes map onto its parts.

A file of ``size`` bytes is cut into stripe units of ``unit`` bytes (the last unit may be
shorter); unit ``k`` belongs to part ``k % parts``. Parts therefore differ from
``size / parts`` by less than one unit. A stripe is one unit of every data part; each of
the ``parity`` parity parts holds one unit per stripe, as long as the stripe's first
(longest) unit, so a parity part is as long as part 0.

The unit is chosen per file: ``min(max_unit, size // parts)`` (at least 1), so that a file
of at least ``parts`` bytes puts data on every part, while big files use ``max_unit`` and
stream in large chunks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Layout:
    """The striping of one file."""

    size: int
    parts: int
    unit: int
    parity: int = 0

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if self.parts < 1:
            raise ValueError(f"parts must be >= 1, got {self.parts}")
        if self.unit < 1:
            raise ValueError(f"unit must be >= 1, got {self.unit}")
        if self.parity < 0:
            raise ValueError(f"parity must be >= 0, got {self.parity}")

    @classmethod
    def for_size(cls, size: int, parts: int, max_unit: int, parity: int = 0) -> Layout:
        """The layout karma8 uses for a new file of ``size`` bytes."""
        return cls(size=size, parts=parts, unit=max(1, min(max_unit, size // parts)), parity=parity)

    @property
    def width(self) -> int:
        """Fragments of the file: data parts and parity parts."""
        return self.parts + self.parity

    @property
    def stripe_count(self) -> int:
        """How many stripes the file has (0 for an empty file)."""
        return -(-self.unit_count // self.parts)

    def stripe_lengths(self, s: int) -> list[int]:
        """Length of each data unit of stripe ``s`` (0 where the file ended before it)."""
        if not 0 <= s < self.stripe_count:
            raise IndexError(s)
        first = s * self.parts
        n = self.unit_count
        return [self.unit_length(u) if u < n else 0 for u in range(first, first + self.parts)]

    @property
    def unit_count(self) -> int:
        """How many stripe units the file has (0 for an empty file)."""
        return -(-self.size // self.unit)

    def unit_length(self, k: int) -> int:
        """Length of unit ``k`` (only the last one can be short)."""
        if not 0 <= k < self.unit_count:
            raise IndexError(k)
        return min(self.unit, self.size - k * self.unit)

    def part_of(self, k: int) -> int:
        """Which part unit ``k`` belongs to."""
        return k % self.parts

    def part_size(self, part: int) -> int:
        """Exact byte size of ``part`` (a parity part is as long as part 0)."""
        if not 0 <= part < self.width:
            raise IndexError(part)
        if part >= self.parts:
            return self.part_size(0)
        n = self.unit_count
        if part >= n:
            return 0
        units = -(-(n - part) // self.parts)
        size = units * self.unit
        if (n - 1) % self.parts == part:
            size -= n * self.unit - self.size  # the short last unit
        return size

    def part_sizes(self) -> list[int]:
        """Sizes of all parts, data then parity, in part order."""
        return [self.part_size(p) for p in range(self.width)]


class Striper:
    """Cuts an incoming byte stream into ``(part, chunk)`` pieces, one per stripe unit.

    Frames may arrive in any sizes; each output chunk is exactly one stripe unit. When a
    frame holds a whole unit it is passed through without copying.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._next = 0  # index of the unit being filled
        self._pending = bytearray()
        self.received = 0

    @property
    def complete(self) -> bool:
        """True once every byte of the file has arrived."""
        return self.received == self._layout.size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Consume ``data``; return the units it completed.

        Raises:
            OverflowError: ``data`` goes past the file's announced size.
        """
        if self.received + len(data) > self._layout.size:
            raise OverflowError(self.received + len(data) - self._layout.size)
        self.received += len(data)
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        while view:
            need = self._layout.unit_length(self._next) - len(self._pending)
            part = self._layout.part_of(self._next)
            if not self._pending and len(view) >= need:
                whole = need == len(view) == len(data)
                out.append((part, data if whole else bytes(view[:need])))
                view = view[need:]
            else:
                taken = view[:need]
                self._pending += taken
                view = view[len(taken) :]
                if len(self._pending) < self._layout.unit_length(self._next):
                    break
                out.append((part, bytes(self._pending)))
                self._pending.clear()
            self._next += 1
        return out
