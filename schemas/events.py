"""Events on Sluice's topics. Each is JSON; the JSON Schema files beside this module are generated
from these models for consumers written in other languages."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4, uuid5

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sluice.errors import PoisonBatch as PoisonBatch  # its home; imported from here too
from sluice.schemas.runs import Run, RunCounters, RunStatus

REQUEST_NAMESPACE = UUID("6f1c2b9e-3c1e-4d5a-9a43-5b1d8e2f7a10")
"""Run ids of run-less trigger requests are uuid5(REQUEST_NAMESPACE, importer + request_id)."""


class FileRef(BaseModel):
    """Claim check: where the file is stored and what it is. The bytes never go through Kafka."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    name: str
    size: int
    sha256: str
    compression: str
    encoding: str | None = Field(
        default=None, description="detected text encoding; None when the bytes are not text"
    )
    encoding_error: str | None = None


class ImportRequested(BaseModel):
    """On the requests topic, keyed by run id: a queued run whose file is stored."""

    run_id: UUID
    importer: str
    file: FileRef
    dry_run: bool = False
    options: dict[str, Any] = {}
    requested_at: datetime

    @classmethod
    def for_run(cls, run: Run, file: FileRef) -> ImportRequested:
        return cls(
            run_id=run.id,
            importer=run.importer,
            file=file,
            dry_run=run.dry_run,
            options=run.options,
            requested_at=datetime.now(UTC),
        )


class TriggerRequested(BaseModel):
    """On the triggers topic: a run that pulls from a source.

    Sluice's own clients create the run first and name it (``run_id``). Any other producer, in
    any language, may leave ``run_id`` out: the worker creates the run, with an id derived from
    ``request_id`` when one is given, so producing the same request twice starts one run."""

    run_id: UUID | None = Field(
        default=None, description="the queued run; omit it and the worker creates the run"
    )
    request_id: str | None = Field(
        default=None,
        max_length=200,
        description="makes a run-less request idempotent: the same id starts one run",
    )
    importer: str = Field(description="slug of a registered importer")
    source: str | None = Field(
        default=None, description="url, ftp, sftp, filesystem or api; default: the importer's"
    )
    params: dict[str, Any] = Field(
        default={}, description="the trigger's parameters (url, file, pattern, path, ...)"
    )
    dry_run: bool = False
    fresh: bool = Field(
        default=False,
        description="full refresh: once the run completed, delete the rows it did not contain"
        " (read when the worker creates the run)",
    )
    full: bool = Field(
        default=False,
        description="an incremental API source: list everything, not only what changed since"
        " the last completed run (read when the worker creates the run)",
    )
    requested_by: str | None = None
    requested_at: datetime | None = None

    def run_id_for_request(self) -> UUID:
        """The id of the run a run-less request creates."""
        if self.request_id is None:
            return uuid4()
        return uuid5(REQUEST_NAMESPACE, f"{self.importer}\x1f{self.request_id}")

    @classmethod
    def for_run(cls, run: Run, source: str, params: dict[str, Any]) -> TriggerRequested:
        return cls(
            run_id=run.id,
            importer=run.importer,
            source=source,
            params=params,
            dry_run=run.dry_run,
            requested_at=datetime.now(UTC),
        )


class ItemPage(BaseModel):
    """On the items topic, keyed by ``<run_id>:<seq>``: a page of discovered items whose
    details are to be fetched. The items are in the ``sluice.items`` table."""

    run_id: UUID
    seq: int


class BatchOutcome(StrEnum):
    """What became of one row batch (a message of the batches topic, or a page of API items)."""

    APPLIED = "applied"
    """Its rows were written and counted, in one transaction with its marker."""
    DUPLICATE = "duplicate"
    """Delivered again: its marker was there already, so nothing was written or counted."""
    INACTIVE = "inactive"
    """Its run was cancelled or had finished: nothing was written."""
    DEAD = "dead"
    """Sent to the dead-letter topic (not a batch, or still failing after its tries)."""


COPY_BATCH = b"sluice-copy "
"""Start of a batch in PostgreSQL's COPY text format (see RowBatch)."""

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_COPY_UNESCAPED = {"t": "\t", "n": "\n", "r": "\r"}


@dataclass(frozen=True, slots=True)
class RowBatch:
    """On the batches topic: mapped, validated rows of one run, routed by record key.

    The message key is ``"<run_id>:<seq>"``: ``seq`` is the batch's identity within the run, and
    applying (run_id, seq) twice changes nothing. The value is one of two encodings:

    - JSON: an array of row objects keyed by target column, plus ``_sluice_row`` (row number
      in the source) and ``_sluice_sub`` (index of the record made from that row, for unpivoted
      rows). Any value types.
    - COPY, when every value is text (a delimited file mapped without Python validation):
      ``sluice-copy `` and a JSON array of the column names (``_sluice_row``, ``_sluice_sub``
      first) on the first line, then one line per row in PostgreSQL's COPY text format (tab
      between fields; backslash, tab, newline and carriage return escaped with a backslash),
      where an empty field is null: a blank cell is null, so an empty string never occurs.

    The worker hands the value to PostgreSQL as it arrived (``json_to_recordset``, or ``COPY``
    into a temporary table) and decodes it in Python only when a row must be isolated: the rows
    are parsed once, by the database.
    """

    run_id: UUID
    seq: int
    rows_json: str = ""
    rows_copy: bytes | None = None
    """A COPY batch after ``sluice-copy ``: the column names line, then the rows."""

    def key(self) -> bytes:
        return f"{self.run_id}:{self.seq}".encode()

    @classmethod
    def parse(cls, key: bytes | None, value: bytes | None) -> RowBatch:
        try:
            run_id, seq = (key or b"").decode().split(":")
            if value is not None and value.startswith(COPY_BATCH):
                return cls(UUID(run_id), int(seq), rows_copy=value[len(COPY_BATCH) :])
            return cls(UUID(run_id), int(seq), (value or b"").decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise PoisonBatch(f"not a row batch (key {key!r}): {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """The rows as Python objects; PoisonBatch when the value is not an array of objects."""
        if self.rows_copy is not None:
            return decode_copy_rows(self.rows_copy)
        return decode_rows(self.rows_json)

    def json_text(self) -> str:
        """The rows as a JSON array, whatever the encoding."""
        if self.rows_copy is None:
            return self.rows_json
        return orjson.dumps(self.rows()).decode()

    def copy_columns(self) -> tuple[list[str], memoryview]:
        """A COPY batch's column names and its rows (COPY text); PoisonBatch if malformed."""
        assert self.rows_copy is not None
        return _copy_parts(self.rows_copy)


def _copy_parts(data: bytes) -> tuple[list[str], memoryview]:
    """The column names line of a COPY batch (after its prefix), and the rows after it."""
    line, found, _ = data.partition(b"\n")
    try:
        columns = orjson.loads(line) if found else None
    except orjson.JSONDecodeError:
        columns = None
    if not isinstance(columns, list) or len(columns) < 2:
        raise PoisonBatch("COPY row batch without its line of column names")
    if not all(isinstance(c, str) for c in columns):
        raise PoisonBatch("COPY row batch whose column names are not all strings")
    return columns, memoryview(data)[len(line) + 1 :]


def encode_copy_batch(columns: Sequence[str], rows: list[list[str]]) -> bytes:
    """A COPY batch (see RowBatch) of ``rows``: lists of text, "" for null, in ``columns``
    order."""
    return encode_copy_lines(columns, copy_lines(rows))


def copy_lines(rows: list[list[str]]) -> list[str]:
    """The rows of a COPY batch (``encode_copy_lines``) one line each, escaped where a value
    needs it (usually none does, which four scans of all the rows prove)."""
    lines = list(map("\t".join, rows))
    body = "\n".join(lines)
    tabs = sum(map(len, rows)) - len(rows)
    if (
        "\\" in body
        or "\r" in body
        or body.count("\t") != tabs
        or body.count("\n") != len(rows) - 1
    ):
        lines = ["\t".join(c.translate(_COPY_ESCAPES) for c in r) for r in rows]
    return [line + "\n" for line in lines]


def encode_copy_lines(columns: Sequence[str], lines: list[str]) -> bytes:
    """A COPY batch of rows made by ``copy_lines``: the bytes ``encode_copy_batch`` gives."""
    return COPY_BATCH + orjson.dumps(list(columns)) + b"\n" + "".join(lines).encode()


def encode_copy_body(columns: Sequence[str], parts: Iterable[bytes | memoryview]) -> bytes:
    """A COPY batch whose lines (as ``copy_lines`` makes them, encoded) are ``parts`` joined:
    the bytes ``encode_copy_lines`` gives, in one copy."""
    return b"".join((COPY_BATCH, orjson.dumps(list(columns)), b"\n", *parts))


def decode_copy_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of a COPY batch as the JSON encoding would give them: empty fields are null,
    the first two columns (row number and sub-row) integers."""
    columns, body = _copy_parts(data)
    try:
        return [decode_copy_line(columns, line) for line in bytes(body).decode().split("\n")[:-1]]
    except (ValueError, UnicodeDecodeError) as exc:
        raise PoisonBatch(f"COPY row batch is not valid: {exc}") from None


def decode_copy_line(columns: Sequence[str], line: str) -> dict[str, Any]:
    """One row of a COPY batch (see decode_copy_rows); ValueError when it is not one."""
    fields = line.split("\t")
    row: dict[str, Any] = {
        c: (_unescape(f) if f else None) for c, f in zip(columns, fields, strict=True)
    }
    row[columns[0]] = int(fields[0])
    row[columns[1]] = int(fields[1])
    return row


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return _COPY_UNESCAPE.sub(lambda m: _COPY_UNESCAPED.get(m.group(1), m.group(1)), field)


def decode_rows(text: str) -> list[dict[str, Any]]:
    try:
        rows = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PoisonBatch(f"row batch is not JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PoisonBatch("row batch is not a JSON array of objects")
    return rows


class LifecycleEventType(StrEnum):
    """The types Sluice emits for every run. Sources may add their own (``<source>.<what>``):
    consumers ignore types they do not know."""

    STARTED = "run.started"
    """A worker picked the run up; counters are zero."""
    PROGRESS = "run.progress"
    """Batches were applied; at most one per run every ``SLUICE_PROGRESS_INTERVAL`` seconds."""
    COMPLETED = "run.completed"
    """Every row was applied or rejected: ``status`` is completed or completed_with_errors."""
    FAILED = "run.failed"
    """The source as a whole could not be imported; ``error`` says why."""
    CANCELLED = "run.cancelled"
    """Stopped on request; batches applied before stay."""


class LifecycleEvent(BaseModel):
    """On the lifecycle topic, keyed by run id. Delivered at least once: key on ``event_id``."""

    event_id: UUID = Field(description="unique per event; the same id means the same event")
    type: str = Field(
        description="run.started, run.progress, run.completed, run.failed, run.cancelled, or a "
        "source-specific type; ignore types you do not know"
    )
    run_id: UUID
    importer: str = Field(description="slug of the importer the run uses")
    status: RunStatus = Field(description="the run's status when the event was written")
    time: datetime = Field(description="when the event was written (UTC)")
    counters: RunCounters = Field(description="the run's counters when the event was written")
    error: str | None = Field(
        default=None, description="why the run failed or was cancelled; null otherwise"
    )


class DeadLetter(BaseModel):
    """On the dead-letter topic: a message that could not be processed, and why."""

    topic: str = Field(description="where the message was read (or 'jetstream': the socket)")
    partition: int = Field(description="-1 when it never was on a topic")
    offset: int = Field(description="-1 when it never was on a topic")
    reason: str
    payload: str = Field(description="the original value, as text when it decodes, else base64")
    payload_encoding: str = Field(default="text", description="text or base64")
    time: datetime

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, reason: str, value: bytes) -> DeadLetter:
        try:
            payload, encoding = value.decode(), "text"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(value).decode(), "base64"
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
            payload=payload,
            payload_encoding=encoding,
            time=datetime.now(UTC),
        )

    def value(self) -> bytes:
        """The original message value."""
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode()
