"""What a file is, told from its first bytes: a binary format by its signature (XLSX, Parquet,
the refused old Office format), and the delimiter of delimited text by counting candidates
line by line."""

from __future__ import annotations

import io
import re
from typing import BinaryIO, Literal

# Binary formats are told by their first bytes, as stored (never compressed).
_ZIP_MAGIC = b"PK\x03\x04"
_PARQUET_MAGIC = b"PAR1"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
MAGIC_BYTES = len(_OLE_MAGIC)
XLS_REFUSED = (
    "the file is in Microsoft's old binary Office format: an Excel 97-2003 workbook (.xls), a "
    "password-protected workbook, or another Office document. Sluice cannot read it: open it "
    "in Excel and save it as .xlsx or CSV (without a password), then upload that"
)
_DELIMITERS = (",", "\t", ";", "|")
DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
# Enough for format and delimiter detection; small next to any sane max_record_bytes.
HEAD_BYTES = 64 * 1024
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# Tokens for delimiter detection: a quoted field is skipped whole (a doubled quote inside it
# reads as two adjacent quoted runs, which counts the same), a line break ends a record.
_SNIFF_TOKEN = re.compile(r'"[^"]*"|[,\t;|]|\r\n|\r|\n')


def binary_format(magic: bytes) -> Literal["xlsx", "parquet", "xls"] | None:
    """The binary format a file's first bytes (as stored) announce, None for anything else.

    ``"xls"`` is Microsoft's old binary Office format (OLE), which Sluice refuses.
    """
    if magic.startswith(_ZIP_MAGIC):
        return "xlsx"
    if magic.startswith(_PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(_OLE_MAGIC):
        return "xls"
    return None


def text_starting_with_par1(raw: BinaryIO) -> bool:
    """True for text that starts with PAR1: a Parquet file also ends with PAR1, and its first
    page header holds control bytes. A damaged Parquet file (cut short) is still Parquet, to be
    refused as such. `raw` is left where it was."""
    start = raw.tell()
    try:
        head = raw.read(HEAD_BYTES)
        raw.seek(-min(len(_PARQUET_MAGIC), len(head)), io.SEEK_END)
        ends_as_parquet = raw.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
        return not ends_as_parquet and _CONTROL_BYTE.search(head) is None
    finally:
        raw.seek(start)


def take_magic(raw: BinaryIO) -> tuple[bytes, bytes]:
    """The first bytes of `raw`, and those of them that must be read again: none if `raw` can
    seek (it is rewound), all of them if it cannot."""
    if raw.seekable():
        start = raw.tell()
        magic = raw.read(MAGIC_BYTES)
        raw.seek(start)
        return magic, b""
    magic = b""
    while len(magic) < MAGIC_BYTES:
        data = raw.read(MAGIC_BYTES - len(magic))
        if not data:
            break
        magic += data
    return magic, magic


def detect_delimiter(sample: str, *, complete: bool) -> str:
    """The likeliest delimiter: the one found the same non-zero number of times on every line."""
    records: list[dict[str, int]] = []
    current: dict[str, int] = {}
    line_start = 0
    for match in _SNIFF_TOKEN.finditer(sample):
        token = match.group()
        if token in DELIMITER_NAMES:
            current[token] = current.get(token, 0) + 1
        elif token[0] in "\r\n":
            if match.start() > line_start:  # blank lines say nothing
                records.append(current)
            current = {}
            line_start = match.end()
            if len(records) >= 100:
                break
    else:
        # The last line counts only if the sample is the whole file: otherwise it is cut short.
        if (complete or not records) and sample[line_start:].strip():
            records.append(current)
    if not records:
        return ","
    best, best_score = ",", (0, 0.0, 0, 0)
    for order, delimiter in enumerate(reversed(_DELIMITERS)):
        per_line = [record.get(delimiter, 0) for record in records]
        in_header = per_line[0]
        if in_header == 0:
            continue
        agreeing = sum(1 for count in per_line if count == in_header) / len(per_line)
        score = (int(agreeing == 1.0), agreeing, in_header, order)
        if score > best_score:
            best, best_score = delimiter, score
    return best
