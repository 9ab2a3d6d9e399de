"""XLSX workbooks and Parquet files, read into the same rows as delimited text.

Both formats are binary and read from their end (the ZIP central directory, the Parquet
footer), so they need a seekable file: :func:`sluice.formats.parse_file` tells them by their
first bytes and hands them over here. Cells keep their type (str, int, float, Decimal, bool,
date, datetime, time, None, and lists or dicts for nested Parquet columns): the mapper fits
them to the fields, so a date column reads the same from a workbook as from a CSV.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
import zipfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any, BinaryIO

import openpyxl
from openpyxl.utils import get_column_letter

from sluice.formats import (
    FileFormatError,
    FormatOptions,
    ParsedFile,
    ParsedRow,
    RowProblem,
    Sniffed,
    check_decompression,
    refuse_duplicate_names,
)

__all__ = ["PARQUET_BATCH_ROWS", "PARQUET_EXTRA", "duration_text", "read_parquet", "read_xlsx"]

PARQUET_EXTRA = "reading Parquet needs the optional extra: pip install 'sluice[parquet]'"
# Rows per Parquet batch: the most rows the reader holds decoded at once.
PARQUET_BATCH_ROWS = 4096
# Without a read buffer pyarrow reads each column chunk of a row group whole, and a row group
# can be hundreds of megabytes; with one it reads a page at a time.
_PARQUET_BUFFER_BYTES = 1 << 20
_MIDNIGHT = dt.time()
# Excel stores every number as a float; integral ones are ints up to 2**53, where a float
# stops holding every integer (Excel keeps 15 significant digits anyway).
_EXACT_FLOAT = 2**53
_FIX_XLSX = (
    "Open it in Excel and save it again as .xlsx (Excel Workbook), or as CSV, and upload that"
)


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


def _file_size(raw: BinaryIO) -> int:
    here = raw.tell()
    size = raw.seek(0, os.SEEK_END)
    raw.seek(here)
    return size


# ---------------------------------------------------------------------------------------------
# XLSX


def _unreadable_xlsx(exc: Exception) -> FileFormatError:
    detail = str(exc) or type(exc).__name__
    return FileFormatError(
        f"the file cannot be read as an XLSX workbook ({detail}): it is damaged, encrypted, or "
        f"another kind of ZIP archive (.xlsb, .ods, .docx, ...). {_FIX_XLSX}"
    )


def _cell_value(value: Any) -> Any:
    """A cell as a record carries it. Excel has no integer and no date type: an integral float
    is an int, and a date and time at midnight a date, as a CSV of the same sheet spells them.
    A duration is interval text."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _EXACT_FLOAT else value
    if isinstance(value, dt.datetime):
        return value.date() if value.time() == _MIDNIGHT else value
    if isinstance(value, dt.timedelta):
        return duration_text(value)
    return value


def _header_name(value: Any) -> str:
    value = _cell_value(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return "" if value is None else str(value).strip()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _SheetProgress:
    """How far into the workbook the rows are, in bytes of the upload: the share of the sheet's
    compressed data read so far (zipfile reads it in order, through the upload's file), applied
    to the file's size. An estimate while reading, exact at the end."""

    def __init__(self, raw: BinaryIO, entry: zipfile.ZipInfo | None, size: int) -> None:
        self._raw = raw
        self._entry = entry
        self._size = size
        self.finished = False

    def __call__(self) -> int:
        if self.finished:
            return self._size
        if self._entry is None:
            return 0
        into = min(max(self._raw.tell() - self._entry.header_offset, 0), self._entry.compress_size)
        return self._size * into // max(self._entry.compress_size, 1)


def read_xlsx(raw: BinaryIO, options: FormatOptions) -> ParsedFile:
    """Read a worksheet of the workbook in `raw` (seekable): ``options.sheet``, else the first
    visible one. Its first row that is not empty is the header, every later row that is not
    empty a record. The workbook is streamed (openpyxl's read-only mode); only its shared
    strings are held in memory whole.
    """
    size = _file_size(raw)
    try:
        with zipfile.ZipFile(raw) as archive:
            entries = archive.infolist()
    except Exception as exc:  # a damaged file fails in zipfile in many ways: all mean the same
        raise _unreadable_xlsx(exc) from exc
    # zipfile stops every entry at its declared size (and fails its checksum past it), so the
    # declared sizes bound what reading the workbook can unpack.
    check_decompression(
        sum(entry.file_size for entry in entries),
        size,
        max_decompressed_bytes=options.max_decompressed_bytes,
        max_compression_ratio=options.max_compression_ratio,
        fix="Save the data as CSV and upload that",
    )
    try:
        # openpyxl warns about the parts of a workbook it drops (data validation, conditional
        # formatting, a missing default style): none matters for reading values.
        with warnings.catch_warnings(action="ignore"):
            workbook = openpyxl.load_workbook(raw, read_only=True, data_only=True, keep_links=False)
    except Exception as exc:  # as above, and openpyxl adds its own (KeyError, XML errors, ...)
        raise _unreadable_xlsx(exc) from exc
    try:
        sheet = _choose_sheet(workbook, options.sheet)
        # Tools other than Excel write wrong <dimension> tags; rows past them would be lost.
        sheet.reset_dimensions()
        rows = _sheet_rows(sheet)
        header = _xlsx_header(rows, sheet.title)
    except BaseException:
        workbook.close()
        raise
    # openpyxl keeps the sheet's path in the archive only in a private attribute.
    by_name = {entry.filename: entry for entry in entries}
    progress = _SheetProgress(raw, by_name.get(sheet._worksheet_path), size)
    sniffed = Sniffed("xlsx", None, None, "none", sheet=sheet.title)
    records = _xlsx_records(workbook, rows, header, sheet.title, progress)
    return ParsedFile(sniffed, header, records, progress)


def _choose_sheet(workbook: Any, name: str | None) -> Any:
    worksheets = workbook.worksheets  # charts are sheets too, but not worksheets
    if name is None:
        if not worksheets:
            raise FileFormatError(
                "the workbook has no worksheet, only charts: put the data in a worksheet, or "
                "export it as CSV"
            )
        visible = [sheet for sheet in worksheets if sheet.sheet_state == "visible"]
        return (visible or worksheets)[0]
    names = ", ".join(repr(sheet.title) for sheet in worksheets)
    if name not in workbook.sheetnames:
        raise FileFormatError(
            f"the workbook has no sheet named {name!r}; its sheets are: {names}. Set the sheet "
            f"option to one of them (the name as Excel shows it on the tab)"
        )
    sheet = workbook[name]
    if sheet not in worksheets:
        raise FileFormatError(
            f"sheet {name!r} of the workbook is a chart, not cells; its worksheets are: {names}"
        )
    return sheet


def _sheet_rows(sheet: Any) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """The sheet's rows of cells with their row number, empty ones included."""
    rows = sheet.iter_rows()
    number = 0
    while True:
        try:
            # A date out of Excel's range is warned about, and read as the error #VALUE!.
            with warnings.catch_warnings(action="ignore"):
                cells = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # the sheet's XML is damaged, or cut short in the archive
            raise _unreadable_xlsx(exc) from exc
        number += 1
        yield number, cells


def _xlsx_header(rows: Iterator[tuple[int, tuple[Any, ...]]], title: str) -> list[str]:
    header: list[str] = []
    number = 0
    while not header:
        number, cells = next(rows, (0, ()))
        if not number:
            raise FileFormatError(
                f"sheet {title!r} of the workbook is empty: it has no header row. The first row "
                f"with values must name the columns"
            )
        header = [_header_name(cell.value) for cell in cells]
        while header and not header[-1]:
            header.pop()
    where = f"row {number} of sheet {title!r}"
    empty = [get_column_letter(index) for index, name in enumerate(header, 1) if not name]
    if empty:
        raise FileFormatError(
            f"the header row ({where}) has columns without a name: column {', '.join(empty)}. "
            f"Name every column, or delete the empty ones"
        )
    refuse_duplicate_names(header, where, get_column_letter)
    return header


def _xlsx_records(
    workbook: Any,
    rows: Iterator[tuple[int, tuple[Any, ...]]],
    header: list[str],
    title: str,
    progress: _SheetProgress,
) -> Iterator[ParsedRow | RowProblem]:
    width = len(header)
    last_column = get_column_letter(width)
    number = 0
    try:
        for sheet_row, cells in rows:
            values = [_cell_value(cell.value) for cell in cells]
            used = len(values)
            while used and _blank(values[used - 1]):
                used -= 1
            if not used:
                continue
            number += 1
            del values[used:]
            if used > width:
                yield RowProblem(
                    number,
                    values,
                    f"expected {width} fields as in the header, found {used} (row {sheet_row} of "
                    f"sheet {title!r}: cell {get_column_letter(used)}{sheet_row} is right of the "
                    f"last named column, {last_column}). Name the column in the header, or clear "
                    f"the cell",
                )
                continue
            # openpyxl gives an error cell as its text ("#DIV/0!"): only its type tells it from
            # a string typed in.
            errors = [
                f"column {header[index]!r} holds the Excel error {cells[index].value}; fix the "
                f"formula or clear the cell ({get_column_letter(index + 1)}{sheet_row} on sheet "
                f"{title!r})"
                for index in range(used)
                if cells[index].data_type == "e"
            ]
            if errors:
                yield RowProblem(number, values, "; ".join(errors))
                continue
            values.extend([None] * (width - used))
            yield ParsedRow(number, values)
        progress.finished = True
    finally:
        workbook.close()


# ---------------------------------------------------------------------------------------------
# Parquet


def _pyarrow() -> tuple[ModuleType, ModuleType]:
    """pyarrow and pyarrow.parquet, which come with the optional extra ``parquet``: pyarrow is
    too large for the base install."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise FileFormatError(f"the file is a Parquet file, and {PARQUET_EXTRA}") from None
    return pyarrow, pyarrow.parquet


def _unreadable_parquet(exc: Exception) -> FileFormatError:
    return FileFormatError(
        f"the file cannot be read as Parquet ({exc}): it is damaged or cut short, or uses a "
        f"feature pyarrow does not support. Write the file again and upload it as it was written"
    )


class _ParquetProgress:
    """Bytes of the upload read so far: the compressed size of every row group started."""

    def __init__(self) -> None:
        self.read = 0

    def __call__(self) -> int:
        return self.read


def read_parquet(raw: BinaryIO, options: FormatOptions) -> ParsedFile:
    """Read the Parquet file in `raw` (seekable) row group by row group, in batches of
    :data:`PARQUET_BATCH_ROWS` rows. The header is the schema's column names. Binary values
    must be UTF-8 text (a record travels as JSON); nanosecond timestamps, times and durations
    are cut to microseconds, the precision of Python and PostgreSQL.
    """
    pa, pq = _pyarrow()
    size = _file_size(raw)
    try:
        parquet = pq.ParquetFile(raw, buffer_size=_PARQUET_BUFFER_BYTES)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
        group_bytes = [
            sum(
                metadata.row_group(group).column(column).total_compressed_size
                for column in range(metadata.num_columns)
            )
            for group in range(metadata.num_row_groups)
        ]
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable_parquet(exc) from exc
    header = list(schema.names)
    if not header:
        raise FileFormatError("the Parquet file has no columns: write it again with its data")
    empty = [str(index) for index, name in enumerate(header, 1) if not name.strip()]
    if empty:
        raise FileFormatError(
            f"the Parquet file's schema has columns without a name: column {', '.join(empty)} "
            f"of {len(header)}. Name every column when writing the file"
        )
    refuse_duplicate_names(header, "the Parquet file's schema")
    casts = [_microseconds(pa, field.type) for field in schema]
    # Columns whose values may hold bytes or durations, which JSON cannot carry: a false
    # positive (a struct with a field named "binary") only costs the slower path.
    convert = [
        index
        for index, field in enumerate(schema)
        if "binary" in str(field.type) or "duration" in str(field.type)
    ]
    progress = _ParquetProgress()
    rows = _parquet_rows(pa, parquet, header, casts, convert, group_bytes, progress, size)
    return ParsedFile(Sniffed("parquet", None, None, "none"), header, rows, progress)


def _microseconds(pa: ModuleType, kind: Any) -> Any:
    """The microsecond type to cast a nanosecond timestamp, time or duration column to (Python
    has no nanoseconds), or None."""
    if getattr(kind, "unit", None) != "ns":
        return None
    if pa.types.is_timestamp(kind):
        return pa.timestamp("us", kind.tz)
    if pa.types.is_time64(kind):
        return pa.time64("us")
    if pa.types.is_duration(kind):
        return pa.duration("us")
    return None


def _parquet_rows(
    pa: ModuleType,
    parquet: Any,
    header: list[str],
    casts: list[Any],
    convert: list[int],
    group_bytes: list[int],
    progress: _ParquetProgress,
    size: int,
) -> Iterator[ParsedRow | RowProblem]:
    number = 0
    for group, compressed in enumerate(group_bytes):
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group])
        progress.read += compressed
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable_parquet(exc) from exc
            columns = [
                _column_values(pa, batch.column(index), header[index], casts[index])
                for index in range(len(header))
            ]
            for values in zip(*columns, strict=True):
                number += 1
                row = list(values)
                reasons = [v.reason for v in row if isinstance(v, _Unrepresentable)]
                if reasons:
                    row = [None if isinstance(v, _Unrepresentable) else v for v in row]
                for index in convert:
                    try:
                        row[index] = _plain(row[index])
                    except UnicodeDecodeError as exc:
                        reasons.append(
                            f"column {header[index]!r} holds binary data that is not UTF-8 text "
                            f"(byte 0x{exc.object[exc.start]:02X} at offset {exc.start}); only "
                            f"text can be stored: write the column as a string (hex or base64, "
                            f"for example), or leave it out"
                        )
                if reasons:
                    yield RowProblem(number, row, "; ".join(reasons))
                else:
                    yield ParsedRow(number, row)
    progress.read = size


def _column_values(pa: ModuleType, column: Any, name: str, cast: Any) -> list[Any]:
    try:
        if cast is not None:
            column = column.cast(cast, safe=False)
        values: list[Any] = column.to_pylist()
    except OverflowError:
        # A date or timestamp past what Python holds (year 9999): only its rows are lost.
        return [_one_value(pa, column, i, name) for i in range(len(column))]
    except (pa.ArrowException, ValueError) as exc:
        raise FileFormatError(
            f"column {name!r} of the Parquet file holds values Python cannot represent: {exc}. "
            f"Write the column with another type (microseconds for times, for example)"
        ) from exc
    return values


class _Unrepresentable:
    """A Parquet value Python cannot hold; the row it is in becomes a RowProblem."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _one_value(pa: ModuleType, column: Any, index: int, name: str) -> Any:
    try:
        return column[index].as_py()
    except (OverflowError, ValueError, pa.ArrowException) as exc:
        return _Unrepresentable(
            f"column {name!r} holds a value Python cannot represent ({exc}); write it within "
            f"the years 1 to 9999, or as text"
        )


def _plain(value: Any) -> Any:
    """`value` with bytes decoded as UTF-8 and durations as interval text, nested ones too: a
    record travels as JSON. Raises UnicodeDecodeError for bytes that are not text."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dt.timedelta):
        return duration_text(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):  # a map's (key, value) entry
        return tuple(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
