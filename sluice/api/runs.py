"""Runs: list them, read one, cancel or retry it, its rejected rows and (paginated API runs)
its items. The run's lifecycle events are in :mod:`sluice.api.events`."""

from __future__ import annotations

import io
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError

from sluice.api.auth import TOKEN_REQUIRED, Caller
from sluice.api.deps import ClientDep
from sluice.api.models import (
    FailedRow,
    FailedRowPage,
    ItemPageResponse,
    ItemState,
    Pagination,
    RunPage,
)
from sluice.schemas.runs import ItemStatus, Run, RunStatus
from sluice.service import failed_rows_csv

router = APIRouter(dependencies=TOKEN_REQUIRED, tags=["runs"])

Page = Annotated[int, Query(ge=1, le=1_000_000)]
_STATUS = "|".join(s.value for s in RunStatus)
STATUSES = rf"^\s*({_STATUS})\s*(,\s*({_STATUS})\s*)*$"
"""A status filter: one or several run statuses, comma-separated."""


@router.get("/api/v1/runs")
async def list_runs(
    client: ClientDep,
    status: Annotated[
        str | None,
        Query(
            description="one status, or several separated by commas: failed,cancelled",
            examples=["failed,cancelled"],
            pattern=STATUSES,
        ),
    ] = None,
    importer: str | None = None,
    page: Page = 1,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RunPage:
    """Runs, newest first, with pagination; ``status=failed,cancelled`` filters by several
    statuses."""
    try:
        state = [s.value for s in RunStatus.parse_many(status)] if status else None
    except ValueError as exc:
        problem = {"loc": ("query", "status"), "msg": str(exc), "type": "value_error"}
        raise RequestValidationError([problem]) from None
    total = await client.count_runs(status=state, importer=importer)
    data = await client.list_runs(
        status=state, importer=importer, limit=limit, offset=(page - 1) * limit
    )
    return RunPage(data=data, pagination=Pagination.of(page, limit, total))


@router.get("/api/v1/runs/recent")
async def recent_runs(
    client: ClientDep, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> dict[str, list[Run]]:
    """The latest runs."""
    return {"data": await client.list_runs(limit=limit)}


@router.get("/api/v1/runs/{run_id}")
async def get_run(run_id: uuid.UUID, client: ClientDep) -> Run:
    """One run: status, counters, times."""
    return await client.get_run(run_id)


@router.post("/api/v1/runs/{run_id}/cancel")
async def cancel_run(run_id: uuid.UUID, client: ClientDep) -> Run:
    """Stop a queued or running run (409 otherwise). Rows already applied stay."""
    return await client.cancel(run_id)


@router.post("/api/v1/runs/{run_id}/retry", status_code=202)
async def retry_run(
    run_id: uuid.UUID, client: ClientDep, caller: Caller, dry_run: bool = False
) -> Run:
    """A child run with the rows this run rejected (409 when it rejected none)."""
    return await client.retry(run_id, dry_run=dry_run, requested_by=caller)


@router.get(
    "/api/v1/runs/{run_id}/failed-rows",
    responses={200: {"content": {"text/csv": {}}, "model": FailedRowPage}},
)
async def failed_rows(
    run_id: uuid.UUID,
    client: ClientDep,
    page: Page = 1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> Response:
    """The rejected rows with their reasons: paginated JSON, or all of them as CSV."""
    if format == "csv":
        out = io.StringIO()
        failed_rows_csv(await client.failed_rows(run_id), out)
        return Response(
            out.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="failed-{run_id}.csv"'},
        )
    rows = await client.failed_rows(run_id, limit=limit, offset=(page - 1) * limit)
    total = await client.count_failed_rows(run_id)
    body = FailedRowPage(
        data=[
            FailedRow(row_number=f.row_number, sub=f.sub, raw=f.raw, reason=f.reason) for f in rows
        ],
        pagination=Pagination.of(page, limit, total),
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/api/v1/runs/{run_id}/items")
async def run_items(
    run_id: uuid.UUID,
    client: ClientDep,
    status: ItemStatus | None = None,
    page: Page = 1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemPageResponse:
    """The items of a paginated API run with their states, failures and last errors."""
    counts, found = await client.items(
        run_id, status=status, limit=limit, offset=(page - 1) * limit
    )
    total = counts[status.value] if status else sum(counts.values())
    return ItemPageResponse(
        data=[ItemState.model_validate(i) for i in found],
        counts=counts,
        pagination=Pagination.of(page, limit, total),
    )
