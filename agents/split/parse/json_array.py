"""A JSON array of objects (a ``.json`` upload), its elements streamed through a bounded buffer."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from typing import Any

import orjson

from sluice.agents.split.parse.decompress import UploadSource
from sluice.agents.split.parse.encoding import decode_error
from sluice.agents.split.parse.jsonl import json_kind
from sluice.agents.split.parse.parsed import human_size
from sluice.errors import FileFormatError
from sluice.schemas.formats import ParsedRow, RowProblem

_JSON_CHUNK_BYTES = 256 * 1024
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_JSON_SEPARATOR = re.compile(r"[ \t\r\n]*([,\]])")


class JsonArrayReader:
    """Streams the elements of a top-level JSON array through a bounded text buffer.

    Parsing is orjson's: elements are cut out in batches at a '}' followed by ',' or ']', and
    ``[`` + batch + ``]`` is parsed as one array. That parse succeeds only if the cut falls
    between two top-level elements (a cut inside a string or a nested value leaves it
    unbalanced), so a failed batch simply falls back to one element at a time, which also finds
    the exact place of a syntax error.
    """

    def __init__(self, source: UploadSource, encoding: str, max_record_bytes: int) -> None:
        self._source = source
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)("strict")
        self._max_record = max_record_bytes
        self._buf = ""
        self._pos = 0
        self._base = source.position  # byte offset of _buf[0] in the file
        self._eof = False
        self._number = 0
        # Elements before this index of _buf are read one by one, after a batch failed there.
        self._batch_from = 0

    def _fill(self) -> None:
        data = self._source.read(_JSON_CHUNK_BYTES)
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise decode_error(exc, self._source.position, self._encoding) from exc
        self._eof = not data
        self._base += self._byte_length(self._buf[: self._pos])
        self._buf = self._buf[self._pos :] + text
        self._batch_from -= self._pos
        self._pos = 0

    def _byte_length(self, text: str) -> int:
        if self._encoding == "utf-8":
            # isascii() is O(1) on str: the common case costs nothing.
            return len(text) if text.isascii() else len(text.encode("utf-8"))
        return len(text.encode(self._encoding, errors="replace"))

    def _error(self, what: str, index: int) -> FileFormatError:
        offset = self._base + self._byte_length(self._buf[:index])
        return FileFormatError(
            f"the JSON file is invalid at byte offset {offset}: {what}. A .json upload must be "
            f"one array of objects ([{{...}}, {{...}}]); fix the file there and upload it again"
        )

    def _skip_space(self) -> bool:
        """Move to the next non-space character; False at the end of the file."""
        while True:
            match = _JSON_SPACE.match(self._buf, self._pos)
            self._pos = match.end() if match else self._pos
            if self._pos < len(self._buf):
                return True
            if self._eof:
                return False
            self._fill()

    def _emit(self, value: Any) -> ParsedRow | RowProblem:
        self._number += 1
        if isinstance(value, dict):
            return ParsedRow(self._number, value)
        return RowProblem(
            self._number,
            value,
            f"expected each element of the array to be an object, found {json_kind(value)}",
        )

    def rows(self) -> Iterator[ParsedRow | RowProblem]:
        if not self._skip_space():
            raise self._error("the file has no content", self._pos)
        if self._buf[self._pos] != "[":
            hint = (
                " (for one object per line, use the JSON Lines format)"
                if self._buf[self._pos] == "{"
                else ""
            )
            raise self._error(
                f"expected '[' to open the array, found {self._buf[self._pos]!r}{hint}", self._pos
            )
        self._pos += 1
        if not self._skip_space():
            raise self._error("the file ends before the array is closed with ']'", self._pos)
        closed = self._buf[self._pos] == "]"
        if closed:
            self._pos += 1
        while not closed:
            if not self._eof and len(self._buf) - self._pos < _JSON_CHUNK_BYTES:
                self._fill()
            if not self._skip_space():
                raise self._error("the file ends before the array is closed with ']'", self._pos)
            if self._pos >= self._batch_from:
                batch = self._batch()
                if batch is not None:
                    values, closed = batch
                    for value in values:
                        yield self._emit(value)
                    continue
            value, closed = self._one()
            yield self._emit(value)
        if self._skip_space():
            raise self._error(
                f"unexpected {self._buf[self._pos]!r} after the closing ']' of the array",
                self._pos,
            )

    def _batch(self) -> tuple[list[Any], bool] | None:
        """Parse the buffered elements from _pos in one go; None if no cut point works."""
        buf, start = self._buf, self._pos
        # Within max_record_bytes of the start, every element of a batch is small enough.
        end = min(len(buf), start + self._max_record)
        first_failure = -1
        for _ in range(8):
            cut = buf.rfind("}", start, end)
            if cut >= 0:
                separator = _JSON_SEPARATOR.match(buf, cut + 1)
                if separator is None:  # the end of a nested object
                    end = cut
                    continue
                stop, resume, closed = cut + 1, separator.end(), separator.group(1) == "]"
                end = cut
            else:
                # No object ahead (the array holds scalars or arrays): cut at a comma.
                comma = buf.rfind(",", start, end)
                if comma < 0:
                    self._batch_from = max(end, start + 1)
                    return None
                stop, resume, closed = comma, comma + 1, False
                end = comma
            try:
                values = orjson.loads("[" + buf[start:stop] + "]")
            except orjson.JSONDecodeError:
                # The cut fell inside a string or a nested value (or the data is invalid): try
                # one cut further back, then go element by element up to the first failure.
                if first_failure >= 0:
                    self._batch_from = first_failure
                    return None
                first_failure = stop
                continue
            self._pos = resume
            return values, closed
        self._batch_from = first_failure if first_failure >= 0 else start + 1
        return None

    def _one(self) -> tuple[Any, bool]:
        """Read one element at _pos, and the ',' or ']' after it."""
        window = 1024
        while True:
            available = len(self._buf) - self._pos
            text = self._buf[self._pos : self._pos + min(window, available)]
            more_in_buffer = window < available
            try:
                orjson.loads(text)
                # A whole value with nothing after it: the separator is further on.
                stop = len(text)
            except orjson.JSONDecodeError as exc:
                stop = exc.pos
                if stop < len(text):
                    try:
                        value = orjson.loads(text[:stop])
                    except orjson.JSONDecodeError:
                        raise self._error(exc.msg, self._pos + stop) from None
                    separator = text[stop]
                    if separator not in ",]":
                        raise self._error(
                            f"expected ',' or ']' after an element, found {separator!r}",
                            self._pos + stop,
                        ) from None
                    self._pos += stop + 1
                    return value, separator == "]"
            # The element goes on past what was parsed.
            if len(text) > self._max_record:
                raise self._error(
                    f"one element of the array is larger than the {human_size(self._max_record)} "
                    f"allowed for a record; split it, or raise max_record_bytes",
                    self._pos,
                )
            if more_in_buffer:
                window *= 2
            elif not self._eof:
                self._fill()
                window = max(window, 2 * len(text))
            else:
                raise self._error(
                    "the file ends before the array is closed with ']'", self._pos + stop
                )
