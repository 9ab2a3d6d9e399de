"""Streaming parsers for uploaded files: delimited text, JSON Lines and JSON arrays, plain or
gzip, XLSX workbooks and Parquet files; one module per format, and what they share.

Memory stays flat whatever the size of the file: the file is read in chunks, and one record
(a line, a CSV record, a JSON array element) may not exceed ``FormatOptions.max_record_bytes``.
Compressed files are held to ``max_decompressed_bytes`` and ``max_compression_ratio`` (bombs).
A problem with one record is reported as a :class:`RowProblem` and the file goes on; a problem
with the file as a whole raises :class:`FileFormatError`.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import BinaryIO, Literal, NoReturn

from sluice.agents.split.parse.archives import zip_archive_refusal
from sluice.agents.split.parse.decompress import READ_BYTES
from sluice.agents.split.parse.parquet import read_parquet
from sluice.agents.split.parse.parsed import ParsedFile
from sluice.agents.split.parse.sniff import (
    XLS_REFUSED,
    binary_format,
    take_magic,
    text_starting_with_par1,
)
from sluice.agents.split.parse.text import read_text
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions

__all__ = ["ParsedFile", "parse_file"]

_NOT_BINARY = {
    "xlsx": (
        "format is set to 'xlsx' but the file is not an XLSX workbook: it does not start with "
        "the ZIP signature (50 4B 03 04). Upload the .xlsx file as Excel saved it (not "
        "compressed again), or set format to 'auto'"
    ),
    "parquet": (
        "format is set to 'parquet' but the file is not a Parquet file: it does not start with "
        "'PAR1'. Upload the .parquet file as it was written (not compressed again), or set "
        "format to 'auto'"
    ),
}


def parse_file(
    raw: BinaryIO,
    options: FormatOptions = FormatOptions(),
    *,
    encoding: str | None = None,
) -> ParsedFile:
    """Start reading an uploaded file from its current position.

    XLSX workbooks and Parquet files are told by their first bytes, before anything else, and
    read by their own modules. For text, `encoding` (else ``options.encoding``) is the encoding
    found when the file was stored. If neither is given, a seekable `raw` is read once
    through :class:`EncodingSniffer` and rewound; a stream that cannot seek is judged on its
    first 64 KiB. The header is read here, so header problems and an empty file raise at once;
    record problems come out of the iteration as :class:`RowProblem`.
    """
    magic, taken = take_magic(raw)
    kind = binary_format(magic)
    if kind == "parquet" and raw.seekable() and text_starting_with_par1(raw):
        kind = None  # a header "PAR1_ID,...", say
    if kind == "xls":
        raise FileFormatError(XLS_REFUSED)
    if options.format in ("xlsx", "parquet") or (kind is not None and options.format == "auto"):
        return _read_binary(raw, options, kind, taken)
    if kind is not None:
        _refuse_binary(raw, options, kind)
    return read_text(raw, options, encoding, taken)


def _read_binary(
    raw: BinaryIO, options: FormatOptions, kind: Literal["xlsx", "parquet"] | None, taken: bytes
) -> ParsedFile:
    wanted = kind if options.format == "auto" else options.format
    if kind != wanted:
        raise FileFormatError(_NOT_BINARY[options.format])
    seekable = raw if raw.seekable() else _spooled(raw, taken)
    if wanted == "xlsx":
        # Loaded here: openpyxl stays out of the processes that never read a workbook.
        from sluice.agents.split.parse.xlsx import read_xlsx

        return read_xlsx(seekable, options)
    return read_parquet(seekable, options)


def _refuse_binary(
    raw: BinaryIO, options: FormatOptions, kind: Literal["xlsx", "parquet"]
) -> NoReturn:
    """A workbook or a Parquet file, when the import reads a text format."""
    if kind == "xlsx" and raw.seekable():
        refusal = zip_archive_refusal(raw)
        if refusal is not None:
            raise FileFormatError(refusal)
    what = "an XLSX workbook" if kind == "xlsx" else "a Parquet file"
    raise FileFormatError(
        f"the file is {what}, but this import reads {options.format} (format is set to "
        f"{options.format!r}): set format to 'auto' or {kind!r} to read it, or upload the "
        f"data as {options.format}"
    )


def _spooled(raw: BinaryIO, taken: bytes) -> BinaryIO:
    """A seekable copy of a stream that cannot seek: XLSX and Parquet are read from their end
    (the ZIP directory, the Parquet footer). The copy is deleted once it is closed."""
    spool = tempfile.TemporaryFile()
    spool.write(taken)
    shutil.copyfileobj(raw, spool, READ_BYTES)
    spool.seek(0)
    return spool
