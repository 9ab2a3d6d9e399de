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
            value = encode_copy_body(self.text_columns or (), [p.view() for p in rows])
            count = lines_in(rows)
        else:
            if self.text_columns is not None:
                value = encode_copy_batch(self.text_columns, rows)
            else:
                value = orjson.dumps(rows, default=_json_default)
            count = len(rows)
        if len(value) > self.max_bytes and count > 1:
            fits = int(count * self.max_bytes * 0.8 / len(value))
            self.limit = max(1, min(self.limit, fits, count // 2))
            # The step is fixed here: a part still too big lowers self.limit again while the
            # loop runs, and a slice that re-read it would leave rows out.
            step = self.limit
            parts = (
                steps(rows, step)
                if self.lines
                else (rows[start : start + step] for start in range(0, count, step))
            )
            for part in parts:
                yield from self.encode(run_id, part)
            return
        if len(value) > self.max_bytes:
            if self.lines:
                row = rows[0].first_field()
            else:
                row = rows[0][0] if self.text_columns is not None else rows[0].get(ROW)
            raise FileFormatError(
                f"row {row} is larger than the {self.max_bytes}-byte "
                "message limit; shorten it or raise SLUICE_KAFKA_MAX_MESSAGE_BYTES"
            )
        key = f"{run_id}:{self.seq}".encode()
        self.seq += 1
        yield key, value
