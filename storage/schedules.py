"""Schedules: the times fired (``schedule_fires``) and the paused flags (``schedule_state``).

The primary key of ``schedule_fires`` (importer, scheduled time) is what lets exactly one of
many workers claim a time: the claim, the check for a scheduled run still going, the run it
starts and the record of what happened are written in the claiming worker's transaction, so a
time is never claimed without its outcome.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from sluice.schemas.runs import Run
from sluice.storage.runs import RUN_COLUMNS, run_from_record


@dataclass(frozen=True)
class Fire:
    """A time an importer's schedule was fired, and what came of it."""

    fire_time: datetime
    outcome: str


async def paused_flags(pool: asyncpg.Pool) -> dict[str, bool]:
    """The paused flag of every importer whose schedule was paused or resumed; an importer
    missing here has its schedule's default."""
    rows = await pool.fetch("SELECT importer, paused FROM schedule_state")
    return {r["importer"]: r["paused"] for r in rows}


async def save_paused(pool: asyncpg.Pool, importer: str, paused: bool) -> None:
    await pool.execute(
        "INSERT INTO schedule_state (importer, paused) VALUES ($1, $2)"
        " ON CONFLICT (importer) DO UPDATE SET paused = $2, updated_at = now()",
        importer,
        paused,
    )


async def last_fire(pool: asyncpg.Pool, importer: str) -> Fire | None:
    """The importer's latest fired time, None when it never fired."""
    record = await pool.fetchrow(
        "SELECT fire_time, outcome FROM schedule_fires WHERE importer = $1"
        " ORDER BY fire_time DESC LIMIT 1",
        importer,
    )
    return Fire(record["fire_time"], record["outcome"]) if record else None


async def claim_fire(conn: asyncpg.Connection, importer: str, fire_time: datetime) -> bool:
    """Claim ``fire_time`` of the importer's schedule as ``started``, in the caller's
    transaction; False when another worker claimed it first."""
    return bool(
        await conn.fetchval(
            "INSERT INTO schedule_fires (importer, fire_time, outcome)"
            " VALUES ($1, $2, 'started') ON CONFLICT DO NOTHING RETURNING true",
            importer,
            fire_time,
        )
    )


async def scheduled_run_in_flight(
    conn: asyncpg.Connection, importer: str, requested_by: str
) -> uuid.UUID | None:
    """A queued or running run of the importer that ``requested_by`` started, if any: a
    scheduled time does not start a second one."""
    found: uuid.UUID | None = await conn.fetchval(
        "SELECT id FROM runs WHERE importer = $1 AND requested_by = $2"
        " AND status IN ('queued', 'running') LIMIT 1",
        importer,
        requested_by,
    )
    return found


async def record_fire_outcome(
    conn: asyncpg.Connection, importer: str, fire_time: datetime, outcome: str
) -> None:
    """A claimed time did not start its run: say why instead of ``started``."""
    await conn.execute(
        "UPDATE schedule_fires SET outcome = $3 WHERE importer = $1 AND fire_time = $2",
        importer,
        fire_time,
        outcome,
    )


async def create_scheduled_run(
    conn: asyncpg.Connection,
    *,
    importer: str,
    source: str,
    options: dict[str, Any],
    requested_by: str,
) -> Run:
    """A queued run for a claimed time, in the claim's transaction."""
    record = await conn.fetchrow(
        "INSERT INTO runs (id, importer, source, options, requested_by)"
        f" VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING {RUN_COLUMNS}",
        uuid.uuid4(),
        importer,
        source,
        options,
        requested_by,
    )
    return run_from_record(record)


async def record_fire_run(
    conn: asyncpg.Connection, importer: str, fire_time: datetime, run_id: uuid.UUID
) -> None:
    """Note the run a claimed time started."""
    await conn.execute(
        "UPDATE schedule_fires SET run_id = $3 WHERE importer = $1 AND fire_time = $2",
        importer,
        fire_time,
        run_id,
    )
