"""Route: records to the partition of their key, cut into batch messages under the size limit.

All rows with the same key go to the same partition, in file order, so a later row for a key
wins over an earlier one however many workers apply the batches. A batch's identity (run id +
sequence) depends only on the file's rows: a split done again cuts the same batches.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from sluice.agents.split.lines import CopyLines, cut, lines_in, steps
from sluice.agents.split.repeats import RepeatCounter
from sluice.errors import FileFormatError
from sluice.schemas.events import encode_copy_batch, encode_copy_body
from sluice.storage.writer import ROW
from sluice.streams.topics import partition_for_key


def _json_default(value: Any) -> Any:
    return str(value)  # Decimal and anything else pydantic produced: its text form


class BatchRouter:
    """Buffers records per partition of their key and hands out full batches in file order.

    Records are dicts (sent as JSON), or, when ``text_columns`` is given, lists of text in that
    order (sent as COPY batches, see RowBatch), or with ``ranges`` too, rows already encoded as
    COPY lines and routed by the byte-range readers (see ``ranges``)."""

    def __init__(
        self,
        key: tuple[str, ...],
        partitions: int,
        batch_size: int,
        max_bytes: int,
        text_columns: tuple[str, ...] | None = None,
        *,
        ranges: int = 0,
    ):
        self.partitions = partitions
        self.max_bytes = max_bytes
        self.buffers: list[list[Any]] = [[] for _ in range(partitions)]
        self.held = [0] * partitions
        """per partition, the lines its buffer holds (read by byte ranges: in pieces)"""
        self.seq = 0
        # Rows per message: the batch size, lowered when rows turn out too wide for a message.
        # It depends only on the file's rows, so a re-split cuts the same batches.
        self.limit = batch_size
        self.text_columns = text_columns
        self.key = key
        self.ranges = ranges
        """the bytes per range when the file is read by byte ranges (see ``ranges``), else 0"""
        self.lines = ranges > 0
        self.repeats = RepeatCounter()
        """the keys seen more than once, reported in the provenance when the split ends"""
        self._key_of: Callable[[Any], str]
        if text_columns is None:
            self._key_of = lambda record: "\x1f".join(str(record[c]) for c in key)
        else:  # the same key text as the dict of the same row gives
            at = [text_columns.index(c) for c in key]
            if len(at) == 1:
                self._key_of = operator.itemgetter(at[0])
            else:
                self._key_of = lambda row: "\x1f".join(row[i] for i in at)

    def add(self, records: list[Any]) -> list[tuple[int, list[Any]]]:
        """Buffer ``records``; returns the batches they filled, with their partitions."""
        full = []
        buffers, partitions, limit = self.buffers, self.partitions, self.limit
        keys = list(map(self._key_of, records))
        self.repeats.add(keys)
        for record, key in zip(records, keys, strict=True):
            p = partition_for_key(key, partitions)
            buf = buffers[p]
            buf.append(record)
            if len(buf) >= limit:
                buffers[p] = []
                full.append((p, buf))
        return full

    def add_lines(self, partition: int, lines: CopyLines) -> list[list[CopyLines]]:
        """Buffer the COPY ``lines`` of ``partition``'s rows; returns the batches they filled,
        each as the pieces of the ranges' lines it spans."""
        buf = self.buffers[partition]
        if lines:
            buf.append(lines)
            self.held[partition] += len(lines)
        full = []
        while self.held[partition] >= self.limit:
            full.append(cut(buf, self.limit))
            self.held[partition] -= self.limit
        return full

    def encode(self, run_id: str, rows: list[Any]) -> Iterator[tuple[bytes, bytes]]:
        """One or more (key, value) messages for ``rows``, each under the size limit; rows are
        records, or lists of text, or (read by byte ranges) pieces of COPY lines."""
        if self.lines:
            yield from self._encode_lines(run_id, rows)
            return
        if self.text_columns is not None:
            value = encode_copy_batch(self.text_columns, rows)
        else:
            value = orjson.dumps(rows, default=_json_default)
        if len(value) > self.max_bytes and len(rows) > 1:
            fits = int(len(rows) * self.max_bytes * 0.8 / len(value))
            self.limit = max(1, min(self.limit, fits, len(rows) // 2))
            # The step is fixed here: a part still too big lowers self.limit again while the
            # loop runs, and a slice that re-read it would leave rows out.
            step = self.limit
            for start in range(0, len(rows), step):
                yield from self.encode(run_id, rows[start : start + step])
            return
        if len(value) > self.max_bytes:
            row = rows[0][0] if self.text_columns is not None else rows[0].get(ROW)
            raise self._too_large(row)
        yield self._key(run_id), value

    def _encode_lines(self, run_id: str, pieces: list[CopyLines]) -> Iterator[tuple[bytes, bytes]]:
        value = encode_copy_body(self.text_columns or (), [p.view() for p in pieces])
        rows = lines_in(pieces)
        if len(value) > self.max_bytes and rows > 1:
            fits = int(rows * self.max_bytes * 0.8 / len(value))
            self.limit = max(1, min(self.limit, fits, rows // 2))
            for part in steps(pieces, self.limit):  # the step is fixed here (see encode)
                yield from self._encode_lines(run_id, part)
            return
        if len(value) > self.max_bytes:
            raise self._too_large(pieces[0].first_field())
        yield self._key(run_id), value

    def _too_large(self, row: object) -> FileFormatError:
        return FileFormatError(
            f"row {row} is larger than the {self.max_bytes}-byte "
            "message limit; shorten it or raise SLUICE_KAFKA_MAX_MESSAGE_BYTES"
        )

    def _key(self, run_id: str) -> bytes:
        key = f"{run_id}:{self.seq}".encode()
        self.seq += 1
        return key
