"""The importers' schedules (``Importer.schedule``, a cron expression)."""

from __future__ import annotations

from fastapi import APIRouter

from sluice.agents.schedule import ScheduleInfo, schedules
from sluice.api.auth import TOKEN_REQUIRED
from sluice.api.deps import ClientDep

router = APIRouter(dependencies=TOKEN_REQUIRED, tags=["importers"])


@router.get("/api/v1/schedules")
async def list_schedules(client: ClientDep) -> dict[str, list[ScheduleInfo]]:
    """The importers' schedules: cron, paused or not, next and last scheduled time."""
    return {"data": await schedules(await client.deps())}
