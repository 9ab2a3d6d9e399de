"""The run repository: runs, their counters, rejected rows and the lifecycle outbox.

Every state change of a run writes its lifecycle event to ``sluice.events`` in the same
transaction, so the runs table and the event stream never disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from sluice.schemas.events import FileRef, LifecycleEvent, LifecycleEventType
from sluice.schemas.runs import SOURCE_COLUMNS, RowFailure, Run, RunStatus
from sluice.streams.topics import Topic

RUN_COLUMNS = (
    "id, importer, source, status, dry_run, total_rows, processed_rows, created_rows, updated_rows,"
    " unchanged_rows, skipped_rows, failed_rows, progress_percent::float8 AS progress_percent,"
    " queued_at, started_at, completed_at, error, parent_run_id, requested_by, file_id, file_name,"
    " total_batches, applied_batches, options, items_discovered, items_completed, items_failed,"
    " source_location, rate_limit_hits, rate_limit_sleeps, total_sleep_seconds, deleted_rows,"
    " provenance, gaps, cursor_from, cursor_reached"
)


def run_from_record(record: asyncpg.Record) -> Run:
    return Run.model_validate(dict(record))


async def emit_event(
    conn: asyncpg.Connection, run: Run, event_type: LifecycleEventType | str
) -> LifecycleEvent:
    """Write a lifecycle event for ``run`` (as it is now) to the outbox, in the caller's
    transaction."""
    event = LifecycleEvent(
        event_id=uuid.uuid4(),
        type=str(event_type),
        run_id=run.id,
        importer=run.importer,
        status=run.status,
        time=datetime.now(UTC),
        counters=run.counters(),
        error=run.error,
    )
    await conn.execute(
        "INSERT INTO events (event_id, run_id, type, topic, key, payload)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        event.event_id,
        run.id,
        event.type,
        Topic.LIFECYCLE.value,
        str(run.id),
        orjson.loads(event.model_dump_json()),
    )
    return event


class RunRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self,
        *,
        importer: str,
        source: str,
        dry_run: bool = False,
        file_id: uuid.UUID | None = None,
        file_name: str | None = None,
        options: dict[str, Any] | None = None,
        parent_run_id: uuid.UUID | None = None,
        requested_by: str | None = None,
        run_id: uuid.UUID | None = None,
    ) -> Run:
        """A queued run. With ``run_id`` of a run that exists already, that run as it is (a
        request produced twice starts one run)."""
        record = await self.pool.fetchrow(
            "WITH ins AS (INSERT INTO runs (id, importer, source, dry_run, file_id,"
            " file_name, options, parent_run_id, requested_by)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9) ON CONFLICT (id) DO NOTHING"
            f" RETURNING {RUN_COLUMNS})"
            f" SELECT * FROM ins UNION ALL SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
            " AND NOT EXISTS (SELECT 1 FROM ins)",
            run_id or uuid.uuid4(),
            importer,
            source,
            dry_run,
            file_id,
            file_name,
            options or {},
            parent_run_id,
            requested_by,
        )
        return run_from_record(record)

    async def get(self, run_id: uuid.UUID, conn: asyncpg.Connection | None = None) -> Run | None:
        record = await (conn or self.pool).fetchrow(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1", run_id
        )
        return run_from_record(record) if record else None

    async def children(self, run_id: uuid.UUID) -> list[Run]:
        """The runs retried from this one (its rejected rows, or the whole file), oldest first."""
        records = await self.pool.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE parent_run_id = $1 ORDER BY queued_at", run_id
        )
        return [run_from_record(r) for r in records]

    async def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        importer: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        records = await self.pool.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs"
            " WHERE ($1::text[] IS NULL OR status = ANY($1::text[]))"
            " AND ($2::text IS NULL OR importer = $2)"
            " ORDER BY queued_at DESC, id LIMIT $3 OFFSET $4",
            _statuses(status),
            importer,
            limit,
            offset,
        )
        return [run_from_record(r) for r in records]

    async def count(
        self, *, status: str | Sequence[str] | None = None, importer: str | None = None
    ) -> int:
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM runs"
                " WHERE ($1::text[] IS NULL OR status = ANY($1::text[]))"
                " AND ($2::text IS NULL OR importer = $2)",
                _statuses(status),
                importer,
            )
        )

    async def count_active(self) -> dict[RunStatus, int]:
        """Runs queued and running, by status: a scan of the partial index runs_active_idx
        (0.04 ms among 200,000 finished runs), cheap enough for every metrics scrape."""
        records = await self.pool.fetch(
            "SELECT status, count(*) AS n FROM runs"
            " WHERE status IN ('queued', 'running') GROUP BY status"
        )
        found = {RunStatus(r["status"]): int(r["n"]) for r in records}
        return {s: found.get(s, 0) for s in (RunStatus.QUEUED, RunStatus.RUNNING)}

    async def count_unrelayed_events(self) -> int:
        """Lifecycle events in the outbox not yet on the topic (a partial index holds them)."""
        return int(await self.pool.fetchval("SELECT count(*) FROM events WHERE relayed_at IS NULL"))

    async def count_failed_rows(self, run_id: uuid.UUID) -> int:
        return int(
            await self.pool.fetchval("SELECT count(*) FROM row_log WHERE run_id = $1", run_id)
        )

    async def events(
        self, run_id: uuid.UUID, *, after: int = 0, limit: int = 500
    ) -> Sequence[tuple[int, dict[str, Any]]]:
        """The run's lifecycle events from the outbox (which keeps them), after event ``after``."""
        records = await self.pool.fetch(
            "SELECT id, payload FROM events WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            run_id,
            after,
            limit,
        )
        return [(r["id"], r["payload"]) for r in records]

    async def prune(self, older_than_days: float) -> tuple[int, int]:
        """Delete finished runs completed more than ``older_than_days`` ago, with their row
        logs, batch markers and events. Returns (runs, rejected rows) deleted."""
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM runs WHERE status NOT IN ('queued', 'running')"
                    " AND completed_at < now() - $1 * interval '1 day'",
                    older_than_days,
                )
            ]
            if not ids:
                return 0, 0
            rows = await conn.fetchval(
                "WITH d AS (DELETE FROM row_log WHERE run_id = ANY($1::uuid[])"
                " RETURNING 1) SELECT count(*) FROM d",
                ids,
            )
            await conn.execute("DELETE FROM events WHERE run_id = ANY($1::uuid[])", ids)
            await conn.execute("DELETE FROM runs WHERE id = ANY($1::uuid[])", ids)
            return len(ids), int(rows)

    async def failed_rows(
        self, run_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> Sequence[RowFailure]:
        """The run's rejected rows in file order."""
        records = await self.pool.fetch(
            "SELECT row_number, sub, raw, reason FROM row_log WHERE run_id = $1"
            " ORDER BY row_number, sub LIMIT $2 OFFSET $3",
            run_id,
            limit,
            offset,
        )
        return [
            RowFailure(r["row_number"], r["sub"], in_file_order(r["raw"]), r["reason"])
            for r in records
        ]

    async def start(self, run_id: uuid.UUID) -> Run | None:
        """Queued -> running. Returns None when the run is finished or unknown (a redelivered
        request); a run that is already running is returned as it is, to be split again."""
        async with self.pool.acquire() as conn, conn.transaction():
            run = await transition(
                conn,
                LifecycleEventType.STARTED,
                "UPDATE runs SET status = 'running', started_at = now()"
                " WHERE id = $1 AND status = 'queued'",
                run_id,
            )
            if run is not None:
                return run
            current = await self.get(run_id, conn)
            if current is None or current.status is not RunStatus.RUNNING:
                return None
            return current

    async def touch(self, run_id: uuid.UUID) -> None:
        """Say the run is alive during a long step that changes nothing else (a download)."""
        await self.pool.execute("UPDATE runs SET activity_at = now() WHERE id = $1", run_id)

    async def attach_file(self, run_id: uuid.UUID, ref: FileRef, location: str | None) -> None:
        """A pulled file is stored: the run now reads it, like an upload."""
        await self.pool.execute(
            "UPDATE runs SET file_id = $2, file_name = $3, source_location = $4 WHERE id = $1",
            run_id,
            ref.id,
            ref.name,
            location,
        )

    async def save_provenance(self, run_id: uuid.UUID, provenance: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE runs SET provenance = $2::jsonb WHERE id = $1", run_id, provenance
        )

    async def schema_changes(self, run_id: uuid.UUID) -> Sequence[dict[str, Any]]:
        """The schema changes recorded in the run's provenance (by an earlier split)."""
        found = await self.pool.fetchval(
            "SELECT provenance->'schema_changes' FROM runs WHERE id = $1", run_id
        )
        return list(found or [])

    async def same_file_run(
        self, importer: str, sha256: str, run_id: uuid.UUID
    ) -> uuid.UUID | None:
        """The last completed run of ``importer`` that read a file with this sha256, when it is
        the importer's last completed run."""
        found: uuid.UUID | None = await self.pool.fetchval(
            "SELECT id FROM (SELECT id, provenance->>'sha256' AS sha FROM runs"
            " WHERE importer = $1 AND id <> $3 AND NOT dry_run"
            " AND status IN ('completed', 'completed_with_errors')"
            " ORDER BY completed_at DESC LIMIT 1) last WHERE sha = $2",
            importer,
            sha256,
            run_id,
        )
        return found

    async def save_plan(
        self, run_id: uuid.UUID, plan: dict[str, Any], mapping: dict[str, str]
    ) -> None:
        """Fix what the batches are applied to, and how the file's columns were mapped."""
        await self.pool.execute(
            "UPDATE runs SET plan = $2::jsonb WHERE id = $1",
            run_id,
            {**plan, "mapping": mapping},
        )

    async def plan(self, run_id: uuid.UUID) -> tuple[RunStatus, bool, dict[str, Any] | None]:
        record = await self.pool.fetchrow(
            "SELECT status, dry_run, plan FROM runs WHERE id = $1", run_id
        )
        if record is None:
            return RunStatus.FAILED, False, None
        return RunStatus(record["status"]), record["dry_run"], record["plan"]

    async def fail(self, run_id: uuid.UUID, error: str) -> Run | None:
        async with self.pool.acquire() as conn, conn.transaction():
            return await transition(
                conn,
                LifecycleEventType.FAILED,
                "UPDATE runs SET status = 'failed', error = $2, completed_at = now()"
                " WHERE id = $1 AND status IN ('queued', 'running')",
                run_id,
                error,
            )

    async def record_split_progress(
        self, run_id: uuid.UUID, rows_read: int, read_fraction: float, gaps: int = 0
    ) -> RunStatus | None:
        """Note how far the split has read (and the gaps it counted so far); returns the run's
        status, so a split can stop when the run was cancelled or failed meanwhile."""
        status = await self.pool.fetchval(
            "WITH progress AS (UPDATE runs SET rows_read = greatest(rows_read, $2),"
            " read_fraction = greatest(read_fraction, $3), gaps = greatest(gaps, $4)"
            " WHERE id = $1 AND status = 'running')"
            " SELECT status FROM runs WHERE id = $1",
            run_id,
            rows_read,
            read_fraction,
            gaps,
        )
        return RunStatus(status) if status is not None else None

    async def cancel(self, run_id: uuid.UUID) -> Run | None:
        """Queued or running -> cancelled. No batch is applied after this commits: a batch's
        transaction adds to the counters only while the run is running, else it rolls back.
        Returns None when the run is not queued or running."""
        async with self.pool.acquire() as conn, conn.transaction():
            return await transition(
                conn,
                LifecycleEventType.CANCELLED,
                "UPDATE runs SET status = 'cancelled', completed_at = now(),"
                " error = 'cancelled on request; the rows applied before stay'"
                " WHERE id = $1 AND status IN ('queued', 'running')",
                run_id,
            )

    async def record_rejections(self, run_id: uuid.UUID, failures: Sequence[RowFailure]) -> int:
        """Store rows rejected before any batch (parse and validation errors). Idempotent: a row
        already logged (a re-split after a crash) is neither stored nor counted again. Only
        while the run is running: the row lock orders this after a cancel (or a failure), whose
        terminal event carries the final counters, so nothing changes them afterwards."""
        if not failures:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            running = await conn.fetchval(
                "SELECT true FROM runs WHERE id = $1 AND status = 'running' FOR UPDATE", run_id
            )
            if not running:
                return 0
            return await insert_row_failures(conn, run_id, failures, count_processed=True)

    async def last_cursor(self, importer: str) -> tuple[bool, Any]:
        """(True, the cursor reached) of the importer's last completed, not dry, run that
        recorded one; (False, None) when there is none."""
        record = await self.pool.fetchrow(
            "SELECT cursor_reached FROM runs WHERE importer = $1 AND NOT dry_run"
            " AND status IN ('completed', 'completed_with_errors')"
            " AND cursor_reached IS NOT NULL ORDER BY completed_at DESC LIMIT 1",
            importer,
        )
        if record is None:
            return False, None
        return True, record["cursor_reached"]

    async def record_cursor(self, run_id: uuid.UUID, start: Any, reached: Any = None) -> None:
        """The cursor an incremental run lists from (None: from the beginning) and, once its
        listing is done, the highest it listed (None leaves what was recorded)."""
        await self.pool.execute(
            "UPDATE runs SET cursor_from = $2::jsonb,"
            " cursor_reached = coalesce($3::jsonb, cursor_reached) WHERE id = $1",
            run_id,
            start,
            reached,
        )

    async def finish_split(
        self,
        run_id: uuid.UUID,
        total_rows: int,
        total_batches: int,
        gaps: int = 0,
        repeated: dict[str, Any] | None = None,
    ) -> Run | None:
        """The split is done: its totals (a re-split after a crash sets the same again), and
        the keys the file repeats, in the provenance as ``repeated_keys``."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE runs SET split_done = true, total_rows = $2,"
                # An API run's retry batches, made while the listing went on, count too.
                " total_batches = $3 + retry_batches,"
                " rows_read = $2, read_fraction = 1, gaps = $4,"
                " provenance = CASE WHEN $5::jsonb IS NULL THEN provenance"
                " ELSE coalesce(provenance, '{}') || jsonb_build_object('repeated_keys', $5::jsonb)"
                " END"
                " WHERE id = $1 AND status = 'running'",
                run_id,
                total_rows,
                total_batches,
                gaps,
                repeated,
            )
            return await finalize_if_done(conn, run_id)


def in_file_order(raw: Any) -> Any:
    """A rejected row kept as the file had it, with its keys in the file's order again (jsonb
    sorts them); the order note itself is dropped."""
    if not isinstance(raw, dict) or not isinstance(raw.get(SOURCE_COLUMNS), list):
        return raw
    order = [c for c in raw[SOURCE_COLUMNS] if isinstance(c, str) and c in raw]
    rest = [c for c in raw if c not in order and c != SOURCE_COLUMNS]
    return {c: raw[c] for c in (*order, *rest)}


def _statuses(status: str | Sequence[str] | None) -> list[str] | None:
    """A status filter as the array the queries take (None: any status)."""
    if status is None:
        return None
    return [status] if isinstance(status, str) else [str(s) for s in status]


async def insert_row_failures(
    conn: asyncpg.Connection,
    run_id: uuid.UUID,
    failures: Sequence[RowFailure],
    *,
    count_processed: bool,
) -> int:
    records = [
        (run_id, f.row_number, f.sub, orjson.dumps(f.raw, default=str).decode(), f.reason[:2000])
        for f in failures
    ]
    inserted = await conn.fetchval(
        "WITH ins AS (INSERT INTO row_log (run_id, row_number, sub, raw, reason)"
        " SELECT r.run_id, r.row_number, r.sub, r.raw::jsonb, r.reason"
        " FROM unnest($1::uuid[], $2::bigint[], $3::int[], $4::text[], $5::text[])"
        "   AS r(run_id, row_number, sub, raw, reason)"
        " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM ins",
        [r[0] for r in records],
        [r[1] for r in records],
        [r[2] for r in records],
        [r[3] for r in records],
        [r[4] for r in records],
    )
    if inserted and count_processed:
        await conn.execute(
            "UPDATE runs SET failed_rows = failed_rows + $2,"
            " processed_rows = processed_rows + $2"
            " WHERE id = $1",
            run_id,
            inserted,
        )
    return int(inserted)


async def finalize_if_done(conn: asyncpg.Connection, run_id: uuid.UUID) -> Run | None:
    """Complete the run when the split is done and every batch is applied. Safe to call from the
    split and from every batch: the row lock makes exactly one caller see the transition. A
    fresh run first deletes what it did not contain, in the same transaction."""
    done = await conn.fetchrow(
        "SELECT plan, dry_run, failed_rows FROM runs WHERE id = $1 AND status = 'running'"
        " AND split_done AND applied_batches >= total_batches FOR UPDATE",
        run_id,
    )
    if done is None:
        return None
    plan = done["plan"] or {}
    refresh = plan.get("refresh")
    if refresh and not done["dry_run"]:
        if done["failed_rows"] <= refresh["max_failed"]:
            from sluice.storage.refresh import delete_absent

            deleted = await delete_absent(conn, run_id, plan)
            await conn.execute("UPDATE runs SET deleted_rows = $2 WHERE id = $1", run_id, deleted)
        await conn.execute("DELETE FROM run_keys WHERE run_id = $1", run_id)
    return await transition(
        conn,
        LifecycleEventType.COMPLETED,
        "UPDATE runs SET completed_at = now(), status = CASE WHEN failed_rows > 0"
        " THEN 'completed_with_errors' ELSE 'completed' END"
        " WHERE id = $1 AND status = 'running' AND split_done"
        " AND applied_batches >= total_batches",
        run_id,
    )


async def transition(
    conn: asyncpg.Connection, event: LifecycleEventType, update: str, *args: Any
) -> Run | None:
    """Run ``update`` (an UPDATE of one run, guarded by its current status) and, when it
    changed the run, write ``event`` to the outbox in the same transaction. None when the
    guard did not match (another caller made the transition first, or the run is finished)."""
    record = await conn.fetchrow(f"{update} RETURNING {RUN_COLUMNS}", *args)
    if record is None:
        return None
    run = run_from_record(record)
    await emit_event(conn, run, event)
    return run
