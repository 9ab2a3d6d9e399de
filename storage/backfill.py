"""The backfill repository: the ``backfill`` table (one row per DID and collection: status,
cursor, rev, counts), the runs of backfills with their lifecycle events, the firehose
consumers' saved cursors a backfill checks first, and the advisory locks that keep one
backfill per repository and a few per PDS.

A page's cursor and counts are written in the transaction that writes its records
(``record_page`` takes that connection), so an interrupted backfill resumes at the first page
it had not stored. Every change of a run writes its lifecycle event in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypeAlias

import asyncpg

from sluice.schemas.firehose import BACKFILL_IMPORTER, BackfillRequested, BackfillState
from sluice.schemas.runs import Run
from sluice.storage.atproto import ApplyCounts
from sluice.storage.db import advisory_key
from sluice.storage.firehose import NEVER_HEARD
from sluice.storage.ratelimit import RateStats
from sluice.storage.runs import RUN_COLUMNS, emit_event, run_from_record

Db: TypeAlias = asyncpg.Pool | asyncpg.Connection
"""What a single statement runs on: the pool, or a connection the caller holds."""

ALL_COLLECTIONS = "*"
"""The collection of a queued backfill that names none: every collection of the repository,
listed (describeRepo) when a worker starts it."""

REPO_LOCK = advisory_key("backfill", "$1")
"""One backfill per repository at a time (the DID is $1)."""
# At most per_pds repositories of one PDS at a time: (PDS key, slot) locks; int4 pairs.
PDS_SLOT_LOCK = "hashtext(current_schema() || ':pds:' || $1)"


@dataclass(frozen=True)
class ConsumerCursor:
    """A firehose consumer's saved cursor: which DIDs and collections it lets through (empty:
    all), its cursor (None before its first save) and when it last heard from its server."""

    name: str
    collections: list[str]
    dids: list[str]
    age: Decimal
    """seconds since the consumer last heard from its server (``extract`` gives numeric)"""
    time_us: int | None = None
    heard_at: datetime | None = None
    """None when it never did"""


async def consumer_cursors(db: Db) -> list[ConsumerCursor]:
    """Every firehose consumer's cursor, the most recently heard first: a backfill starts
    only when one is live and covers the repository, so whatever changes during it arrives
    live."""
    rows = await db.fetch(
        "SELECT name, collections, dids, time_us, extract(epoch FROM now() - updated_at) AS age,"
        f" nullif(updated_at, {NEVER_HEARD}) AS heard_at FROM firehose_cursors"
        " ORDER BY updated_at DESC, name"
    )
    return [
        ConsumerCursor(
            r["name"], r["collections"], r["dids"], r["age"], r["time_us"], r["heard_at"]
        )
        for r in rows
    ]


async def record_queued(db: Db, did: str, collections: Sequence[str]) -> None:
    """``pending`` for each of ``collections`` (or ``*`` when empty), so ``backfill-status``
    shows a backfill handed to the workers at once. A collection already backfilled stays
    ``completed``; a failed one is pending again."""
    await db.execute(
        "INSERT INTO backfill (did, collection, status)"
        " SELECT $1, c, 'pending' FROM unnest($2::text[]) AS c"
        " ON CONFLICT (did, collection) DO UPDATE SET status = 'pending', error = NULL,"
        " updated_at = now() WHERE backfill.status = 'failed'",
        did,
        # Each once (one INSERT cannot update a row twice); PostgreSQL text holds no NUL.
        [c for c in dict.fromkeys(collections) if "\x00" not in c] or [ALL_COLLECTIONS],
    )


async def states(db: Db, did: str | None = None, status: str | None = None) -> list[BackfillState]:
    """The backfill rows of ``did`` and ``status`` (None: any), by DID and collection."""
    rows = await db.fetch(
        "SELECT did, collection, status, cursor, rev, pds, records_synced, records_skipped,"
        " records_failed, pages, run_id, started_at, completed_at, error FROM backfill"
        " WHERE ($1::text IS NULL OR did = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY did, collection",
        did,
        status,
    )
    return [BackfillState.model_validate(dict(r)) for r in rows]


async def unfinished_dids(db: Db) -> list[str]:
    """The DIDs with a collection not completed: what ``backfill --resume`` goes on with."""
    rows = await db.fetch(
        "SELECT DISTINCT did FROM backfill WHERE status <> 'completed' ORDER BY did"
    )
    return [r["did"] for r in rows]


async def reset_states(db: Db, did: str, collections: Sequence[str]) -> None:
    """Forget the cursors and counts of ``collections`` of ``did`` (empty: all of them), so
    the next backfill starts over."""
    await db.execute(
        "DELETE FROM backfill WHERE did = $1"
        " AND (cardinality($2::text[]) = 0 OR collection = ANY($2::text[]))",
        did,
        list(collections),
    )


async def mark_in_progress(
    db: Db, did: str, collection: str, rev: str | None, pds: str, run_id: uuid.UUID
) -> None:
    """``collection`` of ``did`` is being read by ``run_id`` from ``pds``. A resumed
    collection keeps its rev (its records are tagged with it) and its first start time."""
    await db.execute(
        "INSERT INTO backfill (did, collection, status, rev, pds, run_id,"
        " started_at) VALUES ($1, $2, 'in_progress', $3, $4, $5, now())"
        " ON CONFLICT (did, collection) DO UPDATE SET status = 'in_progress',"
        " rev = coalesce(backfill.rev, EXCLUDED.rev), pds = EXCLUDED.pds,"
        " run_id = EXCLUDED.run_id, error = NULL, updated_at = now(),"
        " started_at = coalesce(backfill.started_at, now())",
        did,
        collection,
        rev,
        pds,
        run_id,
    )


async def delete_queued_placeholder(db: Db, did: str) -> None:
    """Remove the ``*`` row of ``did`` (see ``record_queued``): its collections are known."""
    await db.execute(
        "DELETE FROM backfill WHERE did = $1 AND collection = $2", did, ALL_COLLECTIONS
    )


async def mark_completed(db: Db, did: str, collection: str) -> None:
    """Every page of ``collection`` of ``did`` was read."""
    await db.execute(
        "UPDATE backfill SET status = 'completed', completed_at = now(),"
        " updated_at = now() WHERE did = $1 AND collection = $2",
        did,
        collection,
    )


async def record_page(
    conn: asyncpg.Connection,
    run_id: uuid.UUID,
    did: str,
    collection: str,
    next_cursor: str | None,
    counts: ApplyCounts,
    failed: int,
    listed: int,
) -> Run:
    """Store the cursor after a page and add its counts to the collection's row and to the
    run, with a ``backfill.progress`` event, in the caller's transaction (the one that wrote
    the page's records), so the cursor never runs ahead of what was written."""
    await conn.execute(
        "UPDATE backfill SET cursor = $3, pages = pages + 1,"
        " records_synced = records_synced + $4, records_skipped = records_skipped + $5,"
        " records_failed = records_failed + $6, updated_at = now()"
        " WHERE did = $1 AND collection = $2",
        did,
        collection,
        next_cursor,
        counts.applied,
        counts.skipped,
        failed,
    )
    record = await conn.fetchrow(
        "UPDATE runs SET processed_rows = processed_rows + $2,"
        " created_rows = created_rows + $3, skipped_rows = skipped_rows + $4,"
        " failed_rows = failed_rows + $5, rows_read = rows_read + $2"
        f" WHERE id = $1 RETURNING {RUN_COLUMNS}",
        run_id,
        listed,
        counts.applied,
        counts.skipped,
        failed,
    )
    run = run_from_record(record)
    await emit_event(conn, run, "backfill.progress")
    return run


async def start_run(pool: asyncpg.Pool, request: BackfillRequested) -> Run:
    """A running run for the backfill of ``request``, with its ``backfill.started`` event."""
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(
            "INSERT INTO runs (id, importer, source, status, started_at, options,"
            " requested_by) VALUES ($1, $2, 'backfill', 'running', now(), $3::jsonb, $4)"
            f" RETURNING {RUN_COLUMNS}",
            uuid.uuid4(),
            BACKFILL_IMPORTER,
            {"did": request.did, "collections": request.collections},
            request.requested_by,
        )
        run = run_from_record(record)
        await emit_event(conn, run, "backfill.started")
    return run


async def complete_run(pool: asyncpg.Pool, run_id: uuid.UUID) -> Run | None:
    """Running -> completed (with errors when a record failed), with ``backfill.completed``;
    None when the run is not running any more."""
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(
            "UPDATE runs SET status = CASE WHEN failed_rows > 0"
            " THEN 'completed_with_errors' ELSE 'completed' END, completed_at = now(),"
            " split_done = true, total_rows = processed_rows"
            f" WHERE id = $1 AND status = 'running' RETURNING {RUN_COLUMNS}",
            run_id,
        )
        if record is None:
            return None
        run = run_from_record(record)
        await emit_event(conn, run, "backfill.completed")
    return run


async def fail_run(pool: asyncpg.Pool, run_id: uuid.UUID, did: str, error: str) -> Run | None:
    """The unfinished collections of ``did`` and the running run fail with ``error``, with
    ``backfill.failed``, in one transaction; their cursors stay, so the backfill can be
    resumed. None when the run is not running any more."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE backfill SET status = 'failed', error = $2, updated_at = now()"
            " WHERE did = $1 AND status <> 'completed'",
            did,
            error,
        )
        record = await conn.fetchrow(
            "UPDATE runs SET status = 'failed', error = $2, completed_at = now()"
            f" WHERE id = $1 AND status = 'running' RETURNING {RUN_COLUMNS}",
            run_id,
            error,
        )
        if record is None:
            return None
        run = run_from_record(record)
        await emit_event(conn, run, "backfill.failed")
    return run


async def add_rate_stats(db: Db, run_id: uuid.UUID, stats: RateStats) -> None:
    """Add what the run spent on the PDS's and the directory's rate limits to its counters."""
    await db.execute(
        "UPDATE runs SET rate_limit_hits = rate_limit_hits + $2,"
        " rate_limit_sleeps = rate_limit_sleeps + $3,"
        " total_sleep_seconds = total_sleep_seconds + $4 WHERE id = $1",
        run_id,
        stats.hits,
        stats.sleeps,
        stats.slept,
    )


async def read_run(db: Db, run_id: uuid.UUID) -> Run:
    """The backfill's run as it is now (it exists: ``start_run`` made it)."""
    record = await db.fetchrow(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1", run_id)
    return run_from_record(record)


async def fail_interrupted_runs(conn: asyncpg.Connection, did: str, run_id: uuid.UUID) -> None:
    """Fail the other running backfills of ``did``: called under the repository's lock, so
    they died with their process; their error names the run that resumes them."""
    await conn.execute(
        "UPDATE runs SET status = 'failed', completed_at = now(),"
        " error = 'interrupted; resumed by run ' || $3"
        " WHERE importer = $1 AND options->>'did' = $2 AND status = 'running'"
        " AND id <> $4",
        BACKFILL_IMPORTER,
        did,
        str(run_id),
        run_id,
    )


async def lock_repo(conn: asyncpg.Connection, did: str) -> None:
    """Wait for the repository's advisory lock (session level: it goes with a dead process's
    connection)."""
    await conn.execute(f"SELECT pg_advisory_lock({REPO_LOCK})", did)


async def unlock_repo(conn: asyncpg.Connection, did: str) -> None:
    await conn.execute(f"SELECT pg_advisory_unlock({REPO_LOCK})", did)


async def try_lock_pds_slot(conn: asyncpg.Connection, pds: str, slot: int) -> bool:
    """Take slot ``slot`` of ``pds`` if it is free; whether it was."""
    return bool(await conn.fetchval(f"SELECT pg_try_advisory_lock({PDS_SLOT_LOCK}, $2)", pds, slot))


async def unlock_pds_slot(conn: asyncpg.Connection, pds: str, slot: int) -> None:
    await conn.execute(f"SELECT pg_advisory_unlock({PDS_SLOT_LOCK}, $2)", pds, slot)
