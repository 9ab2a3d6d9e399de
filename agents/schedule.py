"""Schedules: start a pull source's run at the times of its importer's cron expression.

Every worker ticks; the primary key of ``sluice.schedule_fires`` (importer, scheduled time)
lets exactly one of them start the run of a time. A time whose previous scheduled run is still
queued or running is recorded as skipped instead of starting a second run. Only the latest due
time is fired, within a grace period: a cluster that was down does not replay every missed time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict

from sluice.agents.deps import Deps
from sluice.agents.wiring import Wiring
from sluice.schemas.importers import Importer, pull_kind
from sluice.schemas.runs import Run
from sluice.storage.runs import RUN_COLUMNS, run_from_record

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
    rows = await deps.pool.fetch("SELECT importer, paused FROM schedule_state")
    return {r["importer"]: r["paused"] for r in rows}


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
            claimed = await conn.fetchval(
                "INSERT INTO schedule_fires (importer, fire_time, outcome)"
                " VALUES ($1, $2, 'started') ON CONFLICT DO NOTHING RETURNING true",
                importer.slug,
                when,
            )
            if not claimed:
                continue
            busy = await conn.fetchval(
                "SELECT id FROM runs WHERE importer = $1 AND requested_by = $2"
                " AND status IN ('queued', 'running') LIMIT 1",
                importer.slug,
                SCHEDULED_BY,
            )
            if busy is not None:
                outcome = f"skipped: run {busy} is still going"
                await conn.execute(
                    "UPDATE schedule_fires SET outcome = $3 WHERE importer = $1 AND fire_time = $2",
                    importer.slug,
                    when,
                    outcome,
                )
                fired.append((importer.slug, when, outcome))
                log.info("schedule of %s at %s: %s", importer.slug, when, outcome)
                continue
            record = await conn.fetchrow(
                "INSERT INTO runs (id, importer, source, options, requested_by)"
                f" VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING {RUN_COLUMNS}",
                uuid.uuid4(),
                importer.slug,
                kind,
                {"params": params, "scheduled_for": when.isoformat()},
                SCHEDULED_BY,
            )
            run = run_from_record(record)
            await conn.execute(
                "UPDATE schedule_fires SET run_id = $3 WHERE importer = $1 AND fire_time = $2",
                importer.slug,
                when,
                run.id,
            )
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
        last = await pool.fetchrow(
            "SELECT fire_time, outcome FROM schedule_fires WHERE importer = $1"
            " ORDER BY fire_time DESC LIMIT 1",
            importer.slug,
        )
        paused = is_paused(importer, states)
        out.append(
            ScheduleInfo(
                importer=importer.slug,
                cron=importer.schedule.cron,
                paused=paused,
                next_fire=None if paused else next_time(importer.schedule.cron, now),
                last_fire=last["fire_time"] if last else None,
                last_outcome=last["outcome"] if last else None,
            )
        )
    return out


async def set_paused(deps: Deps, slug: str, paused: bool) -> None:
    importer = deps.registry.get(slug)
    if importer.schedule is None:
        from sluice.errors import InvalidRequest

        raise InvalidRequest(f"importer {slug!r} has no schedule")
    await deps.pool.execute(
        "INSERT INTO schedule_state (importer, paused) VALUES ($1, $2)"
        " ON CONFLICT (importer) DO UPDATE SET paused = $2, updated_at = now()",
        slug,
        paused,
    )
