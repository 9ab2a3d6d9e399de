"""Delimited text (CSV, TSV, semicolon- or pipe-separated): the header row, then one record per
row, each checked to have as many fields as the header."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from sluice.agents.split.parse.decompress import UploadSource
from sluice.agents.split.parse.encoding import decode_error
from sluice.agents.split.parse.parsed import refuse_duplicate_names
from sluice.agents.split.parse.sniff import DELIMITER_NAMES
from sluice.errors import FileFormatError
from sluice.schemas.formats import ParsedRow, RowProblem

_TEXT_CHUNK_CHARS = 64 * 1024  # measured best for csv over a TextIOWrapper


def read_delimited(
    source: UploadSource, encoding: str, delimiter: str, max_record_bytes: int
) -> tuple[list[str], Iterator[ParsedRow | RowProblem]]:
    """The header of the delimited text in `source` (read now: header problems and an empty
    file raise at once) and its records, read as they are iterated."""
    text = io.TextIOWrapper(source, encoding=encoding, errors="strict", newline="")
    # Fewer, larger reads from the Python-level source: the default is 8 KiB.
    text._CHUNK_SIZE = _TEXT_CHUNK_CHARS  # type: ignore[attr-defined]
    # The limit is global to the csv module; every parser sets its own before reading.
    csv.field_size_limit(max_record_bytes)
    # strict: a quote left open until the end of the file is an error, not a silent merge of
    # every line after it into one field.
    records = csv.reader(text, delimiter=delimiter, strict=True)
    header = _read_header(records, source, encoding, delimiter)
    return header, delimited_rows(records, len(header), source, encoding)


def _read_header(
    records: Iterator[list[str]], source: UploadSource, encoding: str, delimiter: str
) -> list[str]:
    try:
        first = next((record for record in records if record), None)
    except UnicodeDecodeError as exc:
        raise decode_error(exc, source.position, encoding) from exc
    except csv.Error as exc:
        raise _csv_file_error(exc, 0, getattr(records, "line_num", 0)) from exc
    if first is None:
        raise FileFormatError(
            "the file is empty: it has no header row. The first line must name the columns"
        )
    header = [name.strip() for name in first]
    header[0] = header[0].lstrip("\ufeff").strip()
    empty = [str(index) for index, name in enumerate(header, 1) if not name]
    if empty:
        separator = DELIMITER_NAMES.get(delimiter, repr(delimiter))
        raise FileFormatError(
            f"the header row (the first line) has columns without a name: column "
            f"{', '.join(empty)} of {len(header)} ({separator}-separated). Name every column "
            f"or delete the empty ones; a {separator} at the end of the line also makes one"
        )
    refuse_duplicate_names(header, "the first line")
    return header


class UnclosedQuote(FileFormatError):
    """A quote opened in a record is not closed before the end of the text read (for a byte
    range of a file: the range was cut inside a quoted field, see ``split.ranges``)."""


def delimited_rows(
    records: Iterator[list[str]],
    width: int,
    source: UploadSource | None,
    encoding: str,
    *,
    number: int = 0,
    lines: int = 0,
) -> Iterator[ParsedRow | RowProblem]:
    """The data records of ``records`` (a csv reader), numbered from ``number`` + 1; ``lines``:
    the lines before the reader's first, so that a reason names the line of the file. A
    ``source`` locates a byte that does not decode (text decoded beforehand has none)."""
    while True:
        try:
            # The hot loop of the whole importer: one length check per record, nothing more.
            for record in records:
                if len(record) == width:
                    number += 1
                    yield ParsedRow(number, record)
                elif record:  # a blank line reads as [] and is not a record
                    number += 1
                    line = lines + getattr(records, "line_num", 0)
                    yield RowProblem(number, record, wrong_width(width, len(record), line))
            return
        except UnicodeDecodeError as exc:
            if source is None:
                raise
            raise decode_error(exc, source.position, encoding) from exc
        except csv.Error as exc:
            line = lines + getattr(records, "line_num", 0)
            if "expected after" not in str(exc):
                raise _csv_file_error(exc, number + 1, line) from exc
            # A closing quote followed by more text: the reader drops the rest of that line
            # and goes on with the next one.
            number += 1
            yield RowProblem(
                number,
                None,
                f"a quoted field is followed by other text before the next delimiter on line "
                f"{line}: {exc}. Quote the whole field, and double any quote inside it",
            )


def wrong_width(width: int, found: int, line: int) -> str:
    """The reason of a record with ``found`` fields, not the header's ``width``."""
    return f"expected {width} fields as in the header, found {found} (record ending on line {line})"


def _csv_file_error(exc: csv.Error, number: int, line: int) -> FileFormatError:
    """`number` is the data record being read, 0 for the header."""
    record = f"data record {number}" if number else "the header row"
    unclosed = "end of data" in str(exc)
    if unclosed:
        what = (
            f"a quote opened in {record} is never closed, so everything up to the end of the "
            f"file (line {line}) would be one field"
        )
    elif "field limit" in str(exc):
        what = (
            f"a field of {record} (at line {line}) is longer than max_record_bytes; usually a "
            f"quote is opened and never closed, so the field runs on"
        )
    else:
        what = f"{record} (at line {line}) cannot be read: {exc}"
    error = UnclosedQuote if unclosed else FileFormatError
    return error(
        f"the file cannot be read as delimited text: {what}. Fix the quoting there and upload "
        f"the file again"
    )
