"""What every parser gives, and what the parsers share: :class:`ParsedFile`, the check that a
header names each column once, and how sizes (in messages) and durations (in values) are
written."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

from sluice.errors import FileFormatError
from sluice.schemas.formats import ParsedRow, RowProblem, Sniffed


class ParsedFile:
    """An uploaded file being read: what it is, its header, and its records (iterate once).

    `progress` says how far the reader got, in bytes of the upload as stored.
    """

    def __init__(
        self,
        sniffed: Sniffed,
        header: list[str] | None,
        rows: Iterator[ParsedRow | RowProblem],
        progress: Callable[[], int],
    ) -> None:
        self.sniffed = sniffed
        self.header = header
        self._rows: Iterator[ParsedRow | RowProblem] | None = rows
        self._progress = progress

    @property
    def bytes_read(self) -> int:
        """Bytes of the upload as stored (compressed, if it is) consumed so far."""
        return self._progress()

    def __iter__(self) -> Iterator[ParsedRow | RowProblem]:
        rows, self._rows = self._rows, None
        if rows is None:
            raise RuntimeError("a ParsedFile can be iterated only once: call parse_file again")
        return rows


def refuse_duplicate_names(
    header: list[str], where: str, label: Callable[[int], str] = str
) -> None:
    """Raise :class:`FileFormatError` if `header` names a column more than once: the mapping
    from names to fields would be ambiguous. `where` says where the header is; `label` names a
    column by its 1-based position (a number, or a spreadsheet's column letter)."""
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header, 1):
        positions.setdefault(name, []).append(index)
    duplicates = [
        f"{name!r} (columns {', '.join(map(label, at))})"
        for name, at in positions.items()
        if len(at) > 1
    ]
    if duplicates:
        raise FileFormatError(
            f"the header row ({where}) names a column more than once: "
            f"{'; '.join(duplicates)}. Rename the columns so each name is unique"
        )


def human_size(size: int) -> str:
    """``size`` bytes as a message says it: ``1.5 MiB``."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"


def duration_text(value: dt.timedelta) -> str:
    """A duration as PostgreSQL reads an interval, in hours: ``-26:03:00.5``. (Python would
    write ``-2 days, 21:57:00``, which PostgreSQL refuses.)"""
    micro = abs(value) // dt.timedelta(microseconds=1)
    seconds, micro = divmod(micro, 1_000_000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    sign = "-" if value < dt.timedelta(0) else ""
    fraction = f".{micro:06d}".rstrip("0") if micro else ""
    return f"{sign}{hours:02d}:{minutes:02d}:{seconds:02d}{fraction}"


def file_size(raw: BinaryIO) -> int:
    """The size of a seekable file, which is left where it was."""
    here = raw.tell()
    size = raw.seek(0, os.SEEK_END)
    raw.seek(here)
    return size
