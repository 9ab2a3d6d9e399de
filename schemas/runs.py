"""Runs: one import of one source by one importer, and the counters it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

PULL_KINDS = ("url", "ftp", "sftp", "filesystem", "api")
"""The sources a run pulls its data from (``Run.source``); other runs were given a file."""


class RunStatus(StrEnum):
    QUEUED = "queued"
    """Requested; no worker has picked it up yet."""
    RUNNING = "running"
    """A worker is splitting the file or batches are being applied."""
    COMPLETED = "completed"
    """Every row was applied."""
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    """Finished; some rows were rejected and are in the row log."""
    FAILED = "failed"
    """The source as a whole could not be imported; ``error`` says why."""
    CANCELLED = "cancelled"
    """Stopped on request; batches applied before the cancel stay."""

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)

    @classmethod
    def parse_many(cls, text: str) -> tuple[RunStatus, ...]:
        """Statuses written as a filter: one, or several separated by commas
        (``failed,cancelled``). ValueError names what is not a status and what is."""
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in cls._value2member_map_]
        if unknown or not names:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(
                f"unknown run status {', '.join(map(repr, unknown)) or repr(text)}: use one of"
                f" {valid}, or several separated by commas (failed,cancelled)"
            )
        return tuple(dict.fromkeys(cls(n) for n in names))


class ItemStatus(StrEnum):
    PENDING = "pending"
    """Listed by a paginated API run; its detail not fetched yet."""
    PROCESSING = "processing"
    """Its detail is being fetched and applied."""
    COMPLETED = "completed"
    """Fetched and applied."""
    FAILED = "failed"
    """Failed for good; ``sluice retry`` fetches it again in a child run."""


class DuplicatePolicy(StrEnum):
    UPSERT = "upsert"
    """Insert new keys, overwrite existing ones (default)."""
    SKIP = "skip"
    """Insert new keys, keep existing rows as they are."""
    UPDATE_IF_NEWER = "update_if_newer"
    """Overwrite an existing row only when the incoming version column is greater."""
    FAIL = "fail"
    """Reject a row whose key already exists (in the table or earlier in the file)."""


class RunCounters(BaseModel):
    model_config = ConfigDict(frozen=True)

    total_rows: int | None = None
    processed_rows: int = 0
    created_rows: int = 0
    updated_rows: int = 0
    unchanged_rows: int = 0
    skipped_rows: int = 0
    failed_rows: int = 0
    progress_percent: float = 0.0
    deleted_rows: int = Field(
        default=0, description="full refresh: rows of the target the import did not contain"
    )
    gaps: int = Field(
        default=0,
        description="unpivot: empty period cells that made no record (Unpivot empty='gap')",
    )
    items_discovered: int = Field(default=0, description="API sources: items listed so far")
    items_completed: int = Field(default=0, description="API sources: items fetched and applied")
    items_failed: int = Field(default=0, description="API sources: items that failed for good")


class Run(RunCounters):
    id: UUID
    importer: str
    source: str
    status: RunStatus
    dry_run: bool = False
    queued_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    parent_run_id: UUID | None = None
    requested_by: str | None = None
    file_id: UUID | None = None
    file_name: str | None = None
    total_batches: int | None = None
    applied_batches: int = 0
    options: dict[str, Any] = {}
    source_location: str | None = Field(
        default=None, description="where a pulled file came from: the final URL, remote path"
    )
    provenance: dict[str, Any] | None = Field(
        default=None,
        description="what the run read: file (name, size, sha256, content type), format,"
        " delimiter, encoding, header, columns (header -> field), aliases (field -> the header"
        " that matched it), ignored columns, duplicate_of (a run that read the same file)",
    )
    cursor_from: Any = Field(
        default=None,
        description="an incremental API run: the cursor it listed from (None: from the start)",
    )
    cursor_reached: Any = Field(
        default=None,
        description="an incremental API run: the highest cursor it listed, where the next run"
        " starts once this one completed",
    )
    rate_limit_hits: int = Field(default=0, description="HTTP 429 answers from the source")
    rate_limit_sleeps: int = Field(default=0, description="waits for the source's rate limit")
    total_sleep_seconds: float = Field(default=0.0, description="time spent in those waits")

    def counters(self) -> RunCounters:
        return RunCounters.model_validate(self.model_dump(include=set(RunCounters.model_fields)))

    @property
    def label(self) -> str:
        """The importer, or for an import without one its target table (``adhoc:shop``, with
        the schema when it is not ``public``)."""
        table = self.options.get("table")
        if self.importer != "adhoc" or not table:
            return self.importer
        schema = self.options.get("schema") or "public"
        return f"adhoc:{table}" if schema == "public" else f"adhoc:{schema}.{table}"


SOURCE_COLUMNS = "_sluice_columns"
"""In a rejected row kept as the file had it (an unpivoted source row), its column names in the
file's order: the row log is jsonb, which keeps an object's keys in an order of its own."""


class RowFailure:
    """A rejected record: where it came from, what it held and why it was refused."""

    __slots__ = ("raw", "reason", "row_number", "sub")

    def __init__(self, row_number: int, sub: int, raw: Any, reason: str) -> None:
        self.row_number = row_number
        self.sub = sub
        self.raw = raw
        self.reason = reason


@dataclass(frozen=True)
class SchemaChange:
    """One change a file asked of its table; ``applied`` is false in a dry run or when the
    import turned evolution off."""

    column: str
    change: Literal["added", "widened"]
    type: str
    previous: str | None = None
    applied: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "change": self.change,
            "type": self.type,
            "previous": self.previous,
            "applied": self.applied,
        }

    def describe(self) -> str:
        verb = "" if self.applied else " (not applied)"
        if self.change == "added":
            return f"added {self.column} {self.type}{verb}"
        return f"widened {self.column} {self.previous} -> {self.type}{verb}"
