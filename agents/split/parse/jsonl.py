"""JSON Lines: one JSON object per line; a line that is not one is a record problem, and the file
goes on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import orjson

from sluice.agents.split.parse.decompress import READ_BYTES, UploadSource
from sluice.agents.split.parse.encoding import decode_error
from sluice.schemas.formats import ParsedRow, RowProblem

_RAW_TEXT_CHARS = 1000


def json_kind(value: Any) -> str:
    """What a JSON value is, as messages say it: "an object", "a string", ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _line_text(line: bytes, encoding: str) -> str:
    return line.decode(encoding, errors="replace").rstrip("\r\n")[:_RAW_TEXT_CHARS]


def jsonl_rows(source: UploadSource, encoding: str) -> Iterator[ParsedRow | RowProblem]:
    """The records of the JSON Lines in `source`, one per line that is not blank."""
    lines = io.BufferedReader(source, READ_BYTES)
    offset = source.position
    number = 0
    utf8 = encoding == "utf-8"
    loads = orjson.loads
    for line in lines:
        start = offset
        offset += len(line)
        try:
            # orjson reads UTF-8 bytes directly and checks them; other encodings go through str.
            value = loads(line if utf8 else line.decode(encoding))
        except UnicodeDecodeError as exc:
            raise decode_error(exc, start + len(line), encoding) from exc
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                continue
            if utf8:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as decode_exc:
                    raise decode_error(decode_exc, start + len(line), encoding) from decode_exc
            number += 1
            yield RowProblem(number, _line_text(line, encoding), f"not valid JSON: {exc}")
            continue
        number += 1
        if isinstance(value, dict):
            yield ParsedRow(number, value)
        else:
            yield RowProblem(
                number,
                _line_text(line, encoding),
                f"expected a JSON object ({{...}}) on each line, found {json_kind(value)}",
            )
