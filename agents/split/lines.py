"""COPY text lines held as one body of bytes: how a byte range's rows travel from the pool to the
split, and how the split cuts them into batches, without a Python object per row.

A range's rows for one partition used to come back as a list of ``str`` lines: made from
pyarrow's array one by one, pickled one by one through the pool's pipe, unpickled, joined and
encoded again for the batch message (about 45 ms of a range's 190 on 8 MiB, and the split's
event loop paid the last three). Here they are the bytes the batch message carries, with the
end offset of every line, so cutting a batch at its 5,000th row is an index, and a batch's
body is one join of slices of the bodies it spans.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, eq=False)
class CopyLines:
    """Lines ``lo`` to ``hi`` of ``body``: line i is ``body[ends[i - 1]:ends[i]]`` (line 0
    starts at 0). Each ends with its ``\\n``, the only one it holds (COPY text escapes the
    others). A slice is a view of the same body: no bytes are copied until a batch is joined."""

    body: bytes
    ends: array.array[int]
    lo: int = 0
    hi: int = -1
    """-1: to the last line"""

    def __post_init__(self) -> None:
        if self.hi < 0:
            object.__setattr__(self, "hi", len(self.ends))

    @classmethod
    def of(cls, lines: Sequence[str]) -> CopyLines:
        """Lines made in Python (``schemas.events.copy_lines``)."""
        encoded = [line.encode() for line in lines]
        return cls(b"".join(encoded), array.array("q", itertools.accumulate(map(len, encoded))))

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, part: slice) -> CopyLines:
        lo, hi, step = part.indices(len(self))
        assert step == 1, "lines are sliced in order"
        return CopyLines(self.body, self.ends, self.lo + lo, self.lo + max(lo, hi))

    def view(self) -> memoryview:
        """The bytes of these lines, without copying them."""
        if self.hi == self.lo:
            return memoryview(b"")
        start = self.ends[self.lo - 1] if self.lo else 0
        return memoryview(self.body)[start : self.ends[self.hi - 1]]

    def texts(self) -> list[str]:
        """The lines as text, each with its line end (the tests compare them)."""
        ends = self.ends[self.lo : self.hi]
        starts = itertools.chain([self.ends[self.lo - 1] if self.lo else 0], ends)
        return [self.body[s:e].decode() for s, e in zip(starts, ends, strict=False)]

    def first_field(self) -> str:
        """The first line's first field: its row number."""
        view = self.view()
        return bytes(view[: min(len(view), 32)]).split(b"\t", 1)[0].decode()

    def __eq__(self, other: object) -> bool:
        # The bytes are the lines: each ends with its own line end, the only one it holds.
        return isinstance(other, CopyLines) and self.view() == other.view()

    def __reduce__(self) -> tuple[type[CopyLines], tuple[bytes, array.array[int]]]:
        """Pickled as the lines alone (a view of a larger body sends only its own bytes)."""
        if self.lo == 0 and self.hi == len(self.ends):
            return CopyLines, (self.body, self.ends)
        base = self.ends[self.lo - 1] if self.lo else 0
        ends = array.array("q", (end - base for end in self.ends[self.lo : self.hi]))
        return CopyLines, (bytes(self.view()), ends)


def lines_in(pieces: Sequence[CopyLines]) -> int:
    return sum(map(len, pieces))


def cut(pieces: list[CopyLines], count: int) -> list[CopyLines]:
    """Take the first ``count`` lines off ``pieces`` (which keeps the rest): the pieces that
    hold them, the last one sliced where they end."""
    taken: list[CopyLines] = []
    while count and pieces:
        first = pieces[0]
        if len(first) <= count:
            taken.append(pieces.pop(0))
            count -= len(first)
        else:
            taken.append(first[:count])
            pieces[0] = first[count:]
            count = 0
    return taken


def steps(pieces: Sequence[CopyLines], step: int) -> Iterator[list[CopyLines]]:
    """``pieces`` in runs of ``step`` lines (the last may hold fewer)."""
    rest = list(pieces)
    while rest:
        yield cut(rest, step)
