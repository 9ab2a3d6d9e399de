"""Stalled runs: queued or running, with no change for a while although work is outstanding.

PostgreSQL holds what a run needs to go on (the stored file and the batch markers, the
discovery cursor and item states, the backfill cursors), so a stalled run is resumed by
publishing its request again: every stage skips what was already done. That covers a lost
message, a worker that died with a message it never committed, and a broker that lost its
topics. Each resumption waits twice as long as the one before; after ``max_recoveries`` the run
fails with the reason.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from sluice.schemas.runs import Run
from sluice.storage.db import advisory_key
from sluice.storage.runs import RUN_COLUMNS, emit_event, run_from_record, transition

RECOVERY_LOCK = advisory_key("recovery")
RESUMED = "run.resumed"


async def try_recovery_lock(conn: asyncpg.Connection) -> bool:
    """The recovery lock for this transaction if no other worker holds it: one worker at a time
    resumes stalled runs, the others skip the round."""
    return bool(await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({RECOVERY_LOCK})"))


async def wait_for_recovery_lock(conn: asyncpg.Connection) -> None:
    """The recovery lock for this transaction, waiting for the worker that holds it."""
    await conn.execute(f"SELECT pg_advisory_xact_lock({RECOVERY_LOCK})")


async def database_now(pool: asyncpg.Pool) -> datetime:
    """PostgreSQL's clock: times compared with the outbox's are read from the same clock."""
    now: datetime = await pool.fetchval("SELECT now()")
    return now


async def stalled_runs(
    conn: asyncpg.Connection, stall_timeout: float, limit: int = 50
) -> list[tuple[Run, int]]:
    """(run, recoveries so far) of runs with no change for ``stall_timeout`` seconds, doubled
    for every earlier recovery."""
    rows = await conn.fetch(
        f"SELECT {RUN_COLUMNS}, recoveries FROM runs"
        " WHERE status IN ('queued', 'running') AND activity_at < now()"
        " - $1 * power(2, least(recoveries, 6)) * interval '1 second'"
        " ORDER BY activity_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        stall_timeout,
        limit,
    )
    out = []
    for row in rows:
        fields = dict(row)
        recoveries = fields.pop("recoveries")
        out.append((run_from_record(fields), int(recoveries)))
    return out


async def in_flight_runs(conn: asyncpg.Connection) -> list[Run]:
    """Every queued or running run, oldest first, locked until the transaction ends. A run
    whose row a batch transaction holds is waited for, not skipped: the runs being written at
    this moment are exactly the ones a broker that lost its topics leaves without batches."""
    # A batch transaction holds the row only until it commits; never wait on it for long.
    await conn.execute("SET LOCAL lock_timeout = '30s'")
    rows = await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running')"
        " ORDER BY queued_at FOR UPDATE"
    )
    return [run_from_record(r) for r in rows]


async def relay_again_since(conn: asyncpg.Connection, since: datetime) -> int:
    """Have the outbox relay again the events it relayed since ``since`` (they went to topics
    the broker lost); consumers de-duplicate on event_id."""
    done = await conn.execute("UPDATE events SET relayed_at = NULL WHERE relayed_at >= $1", since)
    return int(done.split()[-1])


async def mark_resumed(conn: asyncpg.Connection, run: Run, how: str, *, count: bool = True) -> None:
    """Record a resumption (``run.resumed``); ``count``: it uses up one of the run's
    resumptions (not when the broker lost the run's messages: that is not the run's doing)."""
    record = await conn.fetchrow(
        f"UPDATE runs SET recoveries = recoveries + $2::int WHERE id = $1 RETURNING {RUN_COLUMNS}",
        run.id,
        1 if count else 0,
    )
    resumed = run_from_record(record).model_copy(update={"error": f"resumed: {how}"})
    await emit_event(conn, resumed, RESUMED)


async def fail_stalled(conn: asyncpg.Connection, run: Run, reason: str) -> Run | None:
    from sluice.schemas.events import LifecycleEventType

    return await transition(
        conn,
        LifecycleEventType.FAILED,
        "UPDATE runs SET status = 'failed', error = $2, completed_at = now()"
        " WHERE id = $1 AND status IN ('queued', 'running')",
        run.id,
        reason,
    )
