"""Parquet files, read into the same rows as delimited text.

A Parquet file is binary and read from its end (the footer), so it needs a seekable file:
``parse_file`` tells it by its first bytes and hands it over here. Values keep their type (str,
int, float, Decimal, bool, date, datetime, time, None, and lists or dicts for nested columns):
the mapper fits them to the fields. pyarrow comes with the optional extra ``parquet``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from types import ModuleType
from typing import Any, BinaryIO

from sluice.agents.split.parse.parsed import (
    ParsedFile,
    duration_text,
    file_size,
    refuse_duplicate_names,
)
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem, Sniffed

PARQUET_EXTRA = "reading Parquet needs the optional extra: pip install 'sluice[parquet]'"
# Rows per Parquet batch: the most rows the reader holds decoded at once.
PARQUET_BATCH_ROWS = 4096
# Without a read buffer pyarrow reads each column chunk of a row group whole, and a row group
# can be hundreds of megabytes; with one it reads a page at a time.
_PARQUET_BUFFER_BYTES = 1 << 20


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
    size = file_size(raw)
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
