"""Schedules: start a pull source's run at the times of its importer's cron expression.

Every worker ticks; the primary key of ``sluice.schedule_fires`` (importer, scheduled time)
lets exactly one of them start the run of a time. A time whose previous scheduled run is still
queued or running is recorded as skipped instead of starting a second run. Only the latest due
time is fired, within a grace period: a cluster that was down does not replay every missed time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict

from sluice.agents.deps import Deps
from sluice.agents.wiring import Wiring
from sluice.schemas.importers import Importer, pull_kind
from sluice.schemas.runs import Run
from sluice.storage.schedules import (
    claim_fire,
    create_scheduled_run,
    last_fire,
    paused_flags,
    record_fire_outcome,
    record_fire_run,
    save_paused,
    scheduled_run_in_flight,
)

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

SCHEDULED_BY = "schedule"
Publish = Callable[[Run, str, dict[str, Any]], Awaitable[None]]


class ScheduleInfo(BaseModel):
    """An importer's schedule as it stands."""

    model_config = ConfigDict(frozen=True)

    importer: str
    cron: str
    paused: bool
    next_fire: datetime | None
    last_fire: datetime | None
    last_outcome: str | None


def previous_time(cron: str, now: datetime) -> datetime:
    prev: datetime = croniter(cron, now).get_prev(datetime)
    return prev


def next_time(cron: str, now: datetime) -> datetime:
    nxt: datetime = croniter(cron, now).get_next(datetime)
    return nxt


async def paused_importers(deps: Deps) -> dict[str, bool]:
    return await paused_flags(deps.pool)


def is_paused(importer: Importer, states: dict[str, bool]) -> bool:
    assert importer.schedule is not None
    return states.get(importer.slug, not importer.schedule.enabled)


async def fire_due(
    deps: Deps, publish: Publish, *, now: datetime | None = None, grace: float = 60.0
) -> list[tuple[str, datetime, str]]:
    """Start the runs that are due. Returns (importer, time, outcome) for each time this
    worker claimed."""
    now = now or datetime.now(UTC)
    scheduled = [i for i in deps.registry.all() if i.schedule is not None]
    if not scheduled:
        return []
    states = await paused_importers(deps)
    pool = deps.pool
    fired = []
    for importer in scheduled:
        assert importer.schedule is not None
        if is_paused(importer, states):
            continue
        when = previous_time(importer.schedule.cron, now)
        if now - when > timedelta(seconds=grace):
            continue
        params = dict(importer.schedule.params)
        kind = pull_kind(importer, params)
        async with pool.acquire() as conn, conn.transaction():
            if not await claim_fire(conn, importer.slug, when):
                continue
            busy = await scheduled_run_in_flight(conn, importer.slug, SCHEDULED_BY)
            if busy is not None:
                outcome = f"skipped: run {busy} is still going"
                await record_fire_outcome(conn, importer.slug, when, outcome)
                fired.append((importer.slug, when, outcome))
                log.info("schedule of %s at %s: %s", importer.slug, when, outcome)
                continue
            run = await create_scheduled_run(
                conn,
                importer=importer.slug,
                source=kind,
                options={"params": params, "scheduled_for": when.isoformat()},
                requested_by=SCHEDULED_BY,
            )
            await record_fire_run(conn, importer.slug, when, run.id)
        # After the commit: a trigger must never name a run that does not exist.
        await publish(run, kind, params)
        fired.append((importer.slug, when, "started"))
        log.info("schedule of %s at %s: started run %s", importer.slug, when, run.id)
    return fired


def register(app: faust.App, wiring: Wiring) -> None:
    """The schedule's tick: every worker starts the runs that are due."""
    deps = wiring.deps

    @app.timer(deps.settings.pipeline.schedule_interval)  # type: ignore[untyped-decorator]
    async def schedule_tick() -> None:
        try:
            await fire_due(
                deps, wiring.publish_trigger, grace=deps.settings.pipeline.schedule_grace
            )
        except Exception:
            log.exception("schedule tick failed; will try again")


async def schedules(deps: Deps, *, now: datetime | None = None) -> list[ScheduleInfo]:
    now = now or datetime.now(UTC)
    states = await paused_importers(deps)
    pool = deps.pool
    out = []
    for importer in deps.registry.all():
        if importer.schedule is None:
            continue
        last = await last_fire(pool, importer.slug)
        paused = is_paused(importer, states)
        out.append(
            ScheduleInfo(
                importer=importer.slug,
                cron=importer.schedule.cron,
                paused=paused,
                next_fire=None if paused else next_time(importer.schedule.cron, now),
                last_fire=last.fire_time if last else None,
                last_outcome=last.outcome if last else None,
            )
        )
    return out


async def set_paused(deps: Deps, slug: str, paused: bool) -> None:
    importer = deps.registry.get(slug)
    if importer.schedule is None:
        from sluice.errors import InvalidRequest

        raise InvalidRequest(f"importer {slug!r} has no schedule")
    await save_paused(deps.pool, slug, paused)
