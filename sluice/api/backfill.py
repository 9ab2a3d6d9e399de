"""The backfill of AT Protocol repositories: queue it for the workers, read its state."""

from __future__ import annotations

from fastapi import APIRouter

from sluice.api.auth import TOKEN_REQUIRED, Caller
from sluice.api.deps import ClientDep
from sluice.api.models import BackfillBody
from sluice.schemas.firehose import BackfillState, BackfillStatus

router = APIRouter(dependencies=TOKEN_REQUIRED, tags=["firehose"])


@router.post("/api/v1/backfill", status_code=202)
async def queue_backfill(
    body: BackfillBody, client: ClientDep, caller: Caller
) -> dict[str, list[str]]:
    """Queue the backfill of AT Protocol repositories for the workers. A backfill continues
    from its stored cursors; ``reset`` starts over."""
    dids = await client.backfill(
        body.dids, collections=body.collections, reset=body.reset, requested_by=caller
    )
    return {"queued": dids}


@router.get("/api/v1/backfill")
async def backfill_status(
    client: ClientDep, did: str | None = None, status: BackfillStatus | None = None
) -> dict[str, list[BackfillState]]:
    """Backfill state per repository and collection."""
    return {"data": await client.backfill_states(did, status.value if status else None)}
