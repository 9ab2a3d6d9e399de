"""Events on Sluice's topics. Each is JSON; the JSON Schema files beside this module are generated
from these models for consumers written in other languages."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from schemas.runs import RunCounters, RunStatus


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


class RowBatch(BaseModel):
    """On the batches topic: mapped, validated rows of one run, routed by record key.

    ``seq`` is the batch's identity within the run; applying (run_id, seq) twice changes nothing.
    Each row is an object keyed by target column, plus ``_sluice_row`` (row number in the source)
    and ``_sluice_sub`` (index of the record made from that row, for unpivoted rows).
    """

    run_id: UUID
    seq: int
    rows: list[dict[str, Any]]


class LifecycleEventType(StrEnum):
    STARTED = "run.started"
    PROGRESS = "run.progress"
    COMPLETED = "run.completed"
    FAILED = "run.failed"
    CANCELLED = "run.cancelled"


class LifecycleEvent(BaseModel):
    """On the lifecycle topic, keyed by run id. Delivered at least once: key on ``event_id``."""

    event_id: UUID
    type: str
    run_id: UUID
    importer: str
    status: RunStatus
    time: datetime
    counters: RunCounters
    error: str | None = None


class DeadLetter(BaseModel):
    """On the dead-letter topic: a message that could not be processed, and why."""

    topic: str
    partition: int
    offset: int
    reason: str
    payload: str = Field(description="the original value, as text when it decodes, else base64")
    time: datetime
