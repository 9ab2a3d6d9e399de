"""What the file parsers read and produce: the options an importer gives them, what a file
turned out to be, and its records (good ones and unusable ones)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class FormatOptions:
    """How to read an uploaded file; every ``None`` or ``"auto"`` is detected from the bytes."""

    format: Literal["auto", "csv", "jsonl", "json", "xlsx", "parquet"] = "auto"
    delimiter: str | None = None
    encoding: str | None = None
    compression: Literal["auto", "gzip", "none"] = "auto"
    # The worksheet of an XLSX workbook to read; None reads the first visible one.
    sheet: str | None = None
    max_record_bytes: int = 16 * 2**20
    max_decompressed_bytes: int = 20 * 2**30
    # Deflate cannot do better than about 1030:1 (long runs of one byte); real delimited text and
    # JSON stay far below 100:1. A higher ratio past the first 128 MiB is a compression bomb.
    max_compression_ratio: int = 500

    def __post_init__(self) -> None:
        if self.format not in ("auto", "csv", "jsonl", "json", "xlsx", "parquet"):
            raise ValueError(
                f"unknown format {self.format!r}: use 'auto', 'csv', 'jsonl', 'json', 'xlsx' "
                f"or 'parquet'"
            )
        if self.sheet is not None and not self.sheet.strip():
            raise ValueError("sheet must be a sheet's name, or None for the first sheet")
        if self.compression not in ("auto", "gzip", "none"):
            raise ValueError(
                f"unknown compression {self.compression!r}: use 'auto', 'gzip' or 'none'"
            )
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in '"\r\n'):
            raise ValueError(
                f"delimiter must be a single character other than a quote or a line break, "
                f"got {self.delimiter!r}"
            )
        if self.encoding is not None:
            normalize_encoding(self.encoding)
        if self.max_record_bytes < 1 or self.max_decompressed_bytes < 1:
            raise ValueError("max_record_bytes and max_decompressed_bytes must be positive")
        if self.max_compression_ratio < 1:
            raise ValueError("max_compression_ratio must be positive")


@dataclass(frozen=True)
class Sniffed:
    """What a file turned out to be. A binary format (XLSX, Parquet) has no text encoding."""

    format: Literal["csv", "jsonl", "json", "xlsx", "parquet"]
    delimiter: str | None
    encoding: str | None
    compression: Literal["gzip", "none"]
    sheet: str | None = None  # the worksheet read, for XLSX
    sheets: tuple[str, ...] = ()  # the workbook's worksheets, for XLSX


@dataclass(slots=True)
class ParsedRow:
    """One record: ``number`` is 1-based and counts data records (blank lines excluded).

    ``values`` is a list with one entry per header column (str for delimited text, typed Python
    values for XLSX and Parquet), or the object of a JSON record.
    """

    number: int
    values: list[Any] | dict[str, Any]


@dataclass(slots=True)
class RowProblem:
    """One record that cannot be used; the rest of the file is still read."""

    number: int
    raw: Any
    reason: str


def normalize_encoding(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(
            f"unknown encoding {name!r}: use a Python codec name such as 'utf-8' or 'cp1252'"
        ) from None


class FileInspection(Protocol):
    """A pass over a file's bytes as it is stored: what the claim check records of it."""

    size: int
    compression: str | None
    error: str | None
    """Why the file cannot be read as text (it is refused when split), or None."""

    def feed(self, chunk: bytes) -> None: ...

    def sha256(self) -> str: ...

    def encoding(self) -> str | None:
        """The text encoding found (None for binary formats and unreadable files)."""
        ...


DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe", " ": "space"}


def delimiter_name(delimiter: str) -> str:
    """How people call a delimiter: "semicolon" for ``;``; others as they are, quoted."""
    return DELIMITER_NAMES.get(delimiter, repr(delimiter))


_READ_BY = {
    "field": "declared on the field",
    "importer": "the importer's default",
    "run": "the run's setting",
    "inferred": "inferred",
}


def reading_text(reading: dict[str, Any]) -> str:
    """A column's reading from a run's provenance (``provenance.readings``), as a phrase:
    "dates as %d.%m.%Y (inferred: '25.03.2024' has the day first ...)"."""
    if reading.get("date_format"):
        how = f"dates as {' or '.join(reading['date_format'])}"
    elif reading.get("decimal"):
        thousands = f", thousands {reading['thousands']!r}" if reading.get("thousands") else ""
        how = f"numbers with decimal {reading['decimal']!r}{thousands}"
    else:
        how = "as text"
    by = _READ_BY.get(str(reading.get("by")), str(reading.get("by")))
    why = f": {reading['why']}" if reading.get("why") else ""
    return f"{how} ({by}{why})"
