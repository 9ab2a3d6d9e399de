"""The API's request and response bodies (beside :class:`~sluice.schemas.runs.Run` and the
other schemas it answers with as they are), and their pagination."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from sluice.schemas.firehose import DID_PATTERN
from sluice.schemas.runs import ItemStatus, Run


class Pagination(BaseModel):
    page: int
    limit: int
    total: int
    totalPages: int

    @classmethod
    def of(cls, page: int, limit: int, total: int) -> Pagination:
        return cls(page=page, limit=limit, total=total, totalPages=math.ceil(total / limit))


class RunPage(BaseModel):
    data: list[Run]
    pagination: Pagination


class FailedRow(BaseModel):
    row_number: int
    sub: int
    raw: Any
    reason: str


class FailedRowPage(BaseModel):
    data: list[FailedRow]
    pagination: Pagination


class ItemState(BaseModel):
    external_id: str
    status: ItemStatus
    failure_count: int
    last_error: str | None
    last_failed_at: datetime | None
    completed_at: datetime | None
    metadata: dict[str, Any] = Field(description="the item as the list endpoint gave it")


class ItemPageResponse(BaseModel):
    data: list[ItemState]
    counts: dict[str, int]
    pagination: Pagination


class TriggerBody(BaseModel):
    """A trigger's parameters. Sources read the fields they know; others pass through."""

    model_config = ConfigDict(extra="allow")

    url: str | None = Field(default=None, description="URL sources: the file to fetch")
    file: str | None = Field(default=None, description="FTP/SFTP: a file name in the folder")
    pattern: str | None = Field(
        default=None, description="FTP/SFTP: a glob; the newest matching file is imported"
    )
    path: str | None = Field(default=None, description="filesystem: a path under the roots")
    dry_run: bool = False
    fresh: bool = Field(
        default=False,
        description="full refresh: once the run completed, delete the rows it did not contain",
    )
    full: bool = Field(
        default=False,
        description="an incremental API source: list everything, not only what changed since"
        " the last completed run",
    )


class BackfillBody(BaseModel):
    dids: list[Annotated[str, Field(pattern=DID_PATTERN)]] = Field(
        min_length=1, max_length=10_000, description="did:plc:... or did:web:..."
    )
    collections: list[str] = Field(default=[], description="NSIDs; empty: all the repo has")
    reset: bool = False
