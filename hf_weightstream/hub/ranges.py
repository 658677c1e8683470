"""Byte ranges of a file: which ones we hold, and how a range is cut into requests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class RangeSet:
    """Disjoint, sorted half-open byte ranges ``[start, end)``; touching ranges are merged."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        kept = []
        for s, e in self._ranges:
            if e < start or s > end:
                kept.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        kept.append((start, end))
        kept.sort()
        self._ranges = kept

    def update(self, other: Iterable[tuple[int, int]]) -> None:
        for start, end in other:
            self.add(start, end)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not covered."""
        out = []
        pos = start
        for s, e in self._ranges:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = e
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
        return out

    def covers(self, start: int, end: int) -> bool:
        return not self.gaps(start, end)

    def gap_bytes(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` are not covered."""
        return sum(e - s for s, e in self.gaps(start, end))

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self._ranges)

    def copy(self) -> RangeSet:
        clone = RangeSet()
        clone._ranges = list(self._ranges)
        return clone

    def as_list(self) -> list[list[int]]:
        return [[s, e] for s, e in self._ranges]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._ranges))

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges})"


def even_pieces(start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into equal pieces of at most ``limit`` bytes (equal, so parallel pieces end together)."""
    count = max(1, -(-(end - start) // limit))
    step = -(-(end - start) // count)
    return [(s, min(s + step, end)) for s in range(start, end, step)]
