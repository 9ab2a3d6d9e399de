"""Items of paginated API runs and the discovery cursor, in PostgreSQL (the source of truth).

Discovery records a page's items and the cursor after it in one transaction, so a discovery
that stops resumes at the first page it had not recorded. An item's status moves
``pending -> processing -> completed | failed`` and is written in the transaction that applies
its detail batch, so a completed item is never fetched again. An item that failed in a way that
may pass goes back to ``pending`` in a retry batch of its own (a negative ``seq``) with the time
it is due again (``retry_at``) and its failures so far, in that same transaction: it is neither
lost nor fetched more often than it failed, whatever crashes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from sluice.schemas.runs import ItemStatus
from sluice.storage.db import advisory_key

DISCOVERY_LOCK = advisory_key("discovery", "$1")
"""One discovery per run at a time (the run id is $1)."""


@dataclass(frozen=True)
class Discovery:
    state: dict[str, Any]
    pages: int
    batches: int
    listed: int
    items: int
    done: bool


@dataclass(frozen=True)
class Item:
    external_id: str
    ordinal: int
    status: ItemStatus
    failure_count: int
    data: dict[str, Any]
    retry_at: datetime | None = None
    """When an item in a retry batch is due again."""


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one item in a detail batch."""

    external_id: str
    completed: bool
    failures: int
    error: str | None
    retry_in: float | None = None
    """Seconds until the item is tried again (it failed in a way that may pass, with attempts
    left); None: it is done, ``completed`` or failed for good."""


@dataclass(frozen=True)
class Retry:
    """A retry batch made by a detail batch: its number and the seconds until it is due."""

    seq: int
    due_in: float


class ItemRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def discovery_lock(self, run_id: uuid.UUID) -> AsyncIterator[None]:
        """Hold the run's discovery lock, across the cluster, for the ``async with`` block
        (waiting for it first). It is held on a connection of its own: a worker that dies
        releases it with its connection."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"SELECT pg_advisory_lock({DISCOVERY_LOCK})",
                str(run_id),
            )
            try:
                yield
            finally:
                await conn.execute(
                    f"SELECT pg_advisory_unlock({DISCOVERY_LOCK})",
                    str(run_id),
                )

    async def discovery(self, run_id: uuid.UUID, first_state: dict[str, Any]) -> Discovery:
        """The run's discovery, created at ``first_state`` the first time."""
        await self.pool.execute(
            "INSERT INTO discovery (run_id, state) VALUES ($1, $2::jsonb) ON CONFLICT DO NOTHING",
            run_id,
            {"next": first_state, "batches": 0, "listed": 0},
        )
        record = await self.pool.fetchrow(
            "SELECT state, pages, items, done FROM discovery WHERE run_id = $1", run_id
        )
        state = record["state"]
        return Discovery(
            state=state["next"],
            pages=record["pages"],
            batches=state["batches"],
            listed=state["listed"],
            items=record["items"],
            done=record["done"],
        )

    async def record_page(
        self,
        run_id: uuid.UUID,
        current: Discovery,
        ids: Sequence[str],
        items: Sequence[dict[str, Any]],
        next_state: dict[str, Any],
        done: bool,
        stats: tuple[int, int, float],
        batch_size: int,
    ) -> tuple[Discovery, list[int]]:
        """Record one listed page and where the listing goes on. The page's new items (an id
        listed before, on this page or another, is not new) are cut into detail batches of
        ``batch_size``. Returns the discovery after it and the numbers of the new batches.
        ``stats`` are the rate-limit figures spent on this page."""
        async with self.pool.acquire() as conn, conn.transaction():
            known = set(
                await conn.fetchval(
                    "SELECT coalesce(array_agg(external_id), '{}') FROM items"
                    " WHERE run_id = $1 AND external_id = ANY($2::text[])",
                    run_id,
                    list(ids),
                )
            )
            fresh: dict[str, tuple[int, dict[str, Any]]] = {}
            for n, (external_id, item) in enumerate(zip(ids, items, strict=True), 1):
                if external_id not in known and external_id not in fresh:
                    fresh[external_id] = (current.listed + n, item)
            seqs = [current.batches + k // batch_size for k in range(len(fresh))]
            await conn.execute(
                "INSERT INTO items (run_id, external_id, seq, ordinal, metadata)"
                " SELECT $1, x.id, x.seq, x.ordinal, x.item::jsonb"
                " FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[])"
                "   AS x(id, seq, ordinal, item)",
                run_id,
                list(fresh),
                seqs,
                [ordinal for ordinal, _ in fresh.values()],
                [orjson.dumps(item).decode() for _, item in fresh.values()],
            )
            batches = current.batches + -(-len(fresh) // batch_size)
            listed = current.listed + len(ids)
            after = Discovery(
                state=next_state,
                pages=current.pages + 1,
                batches=batches,
                listed=listed,
                items=current.items + len(fresh),
                done=done,
            )
            await conn.execute(
                "UPDATE discovery SET state = $2::jsonb, pages = $3, items = $4, done = $5,"
                " updated_at = now() WHERE run_id = $1",
                run_id,
                {"next": next_state, "batches": batches, "listed": listed},
                after.pages,
                after.items,
                done,
            )
            await conn.execute(
                "UPDATE runs SET items_discovered = $2, rows_read = $2,"
                " rate_limit_hits = rate_limit_hits + $3, rate_limit_sleeps = rate_limit_sleeps"
                " + $4, total_sleep_seconds = total_sleep_seconds + $5 WHERE id = $1",
                run_id,
                after.items,
                *stats,
            )
        return after, list(range(current.batches, batches))

    async def copy_failed(self, run_id: uuid.UUID, parent_id: uuid.UUID, page_size: int) -> int:
        """A retry run's items: the parent's failed items, in pages of ``page_size``. Returns
        how many batches they make. Idempotent."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO items (run_id, external_id, seq, ordinal, metadata)"
                " SELECT $1, external_id, ((row_number() OVER (ORDER BY ordinal)) - 1) / $3,"
                " ordinal, metadata FROM items WHERE run_id = $2 AND status = 'failed'"
                " ON CONFLICT DO NOTHING",
                run_id,
                parent_id,
                page_size,
            )
            n = int(await conn.fetchval("SELECT count(*) FROM items WHERE run_id = $1", run_id))
            batches = -(-n // page_size)
            await conn.execute(
                "INSERT INTO discovery (run_id, state, pages, items, done)"
                " VALUES ($1, $2::jsonb, $3, $4, true) ON CONFLICT DO NOTHING",
                run_id,
                {"next": {}, "batches": batches, "listed": n, "retry_of": str(parent_id)},
                batches,
                n,
            )
            await conn.execute("UPDATE runs SET items_discovered = $2 WHERE id = $1", run_id, n)
            return batches

    async def unfinished_pages(self, run_id: uuid.UUID) -> list[int]:
        """Batches with items still pending or processing: sent again when discovery resumes
        (a worker may have died before sending them, or before applying them)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT seq FROM items WHERE run_id = $1"
            " AND status IN ('pending', 'processing') ORDER BY seq",
            run_id,
        )
        return [r["seq"] for r in rows]

    async def page(self, run_id: uuid.UUID, seq: int) -> list[Item]:
        rows = await self.pool.fetch(
            "SELECT external_id, ordinal, status, failure_count, metadata, retry_at FROM items"
            " WHERE run_id = $1 AND seq = $2 ORDER BY ordinal",
            run_id,
            seq,
        )
        return [
            Item(
                r["external_id"],
                r["ordinal"],
                ItemStatus(r["status"]),
                r["failure_count"],
                r["metadata"],
                r["retry_at"],
            )
            for r in rows
        ]

    async def mark_processing(self, run_id: uuid.UUID, ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE items SET status = 'processing' WHERE run_id = $1"
            " AND external_id = ANY($2::text[]) AND status = 'pending'",
            run_id,
            list(ids),
        )

    async def counts(self, run_id: uuid.UUID) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT status, count(*) AS n FROM items WHERE run_id = $1 GROUP BY status",
            run_id,
        )
        found = {r["status"]: int(r["n"]) for r in rows}
        return {s: found.get(s, 0) for s in ("pending", "processing", "completed", "failed")}

    async def list(
        self, run_id: uuid.UUID, *, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT external_id, status, failure_count, last_error, last_failed_at, completed_at,"
            " metadata FROM items WHERE run_id = $1 AND ($2::text IS NULL OR status = $2)"
            " ORDER BY ordinal LIMIT $3 OFFSET $4",
            run_id,
            status,
            limit,
            offset,
        )
        return [dict(r) for r in rows]


async def finish_items(
    conn: asyncpg.Connection,
    run_id: uuid.UUID,
    outcomes: Sequence[ItemOutcome],
    stats: tuple[int, int, float],
) -> Retry | None:
    """Mark a detail batch's items completed or failed, in the batch's transaction, and add
    the item counts and rate-limit figures to the run. The items to try again move to a new
    retry batch, which the run's total counts from now on (returned: it is for the caller to
    send once the transaction is committed)."""
    final = [o for o in outcomes if o.retry_in is None]
    again = [o for o in outcomes if o.retry_in is not None]
    await conn.execute(
        "UPDATE items i SET status = CASE WHEN o.completed THEN 'completed'"
        " ELSE 'failed' END, failure_count = i.failure_count + o.failures,"
        " last_error = coalesce(o.error, i.last_error),"
        " last_failed_at = CASE WHEN o.failures > 0 THEN now() ELSE i.last_failed_at END,"
        " completed_at = CASE WHEN o.completed THEN now() END, retry_at = NULL"
        " FROM unnest($2::text[], $3::bool[], $4::int[], $5::text[])"
        "   AS o(external_id, completed, failures, error)"
        " WHERE i.run_id = $1 AND i.external_id = o.external_id",
        run_id,
        [o.external_id for o in final],
        [o.completed for o in final],
        [o.failures for o in final],
        [o.error for o in final],
    )
    done = sum(1 for o in final if o.completed)
    await conn.execute(
        "UPDATE runs SET items_completed = items_completed + $2,"
        " items_failed = items_failed + $3, rate_limit_hits = rate_limit_hits + $4,"
        " rate_limit_sleeps = rate_limit_sleeps + $5,"
        " total_sleep_seconds = total_sleep_seconds + $6 WHERE id = $1",
        run_id,
        done,
        len(final) - done,
        *stats,
    )
    if not again:
        return None
    # total_batches is NULL until the listing is done; finish_split then adds retry_batches.
    n = await conn.fetchval(
        "UPDATE runs SET retry_batches = retry_batches + 1, total_batches = total_batches + 1"
        " WHERE id = $1 RETURNING retry_batches",
        run_id,
    )
    await conn.execute(
        "UPDATE items i SET status = 'pending', seq = $2, failure_count = i.failure_count"
        " + o.failures, last_error = o.error, last_failed_at = now(),"
        " retry_at = now() + o.due_in * interval '1 second'"
        " FROM unnest($3::text[], $4::int[], $5::text[], $6::float8[])"
        "   AS o(external_id, failures, error, due_in)"
        " WHERE i.run_id = $1 AND i.external_id = o.external_id",
        run_id,
        -n,
        [o.external_id for o in again],
        [o.failures for o in again],
        [o.error for o in again],
        [o.retry_in for o in again],
    )
    return Retry(-n, max(o.retry_in or 0.0 for o in again))


async def overdue_retries(conn: asyncpg.Connection, grace: float) -> list[tuple[uuid.UUID, int]]:
    """(run, seq) of the retry batches of running runs due more than ``grace`` seconds ago and
    not applied: their message was lost (the worker that was to send it when due died first).
    Each is made due now, so it is found overdue again only after another ``grace``."""
    rows = await conn.fetch(
        "WITH due AS (SELECT DISTINCT i.run_id, i.seq FROM items i JOIN runs r ON r.id = i.run_id"
        " WHERE i.status = 'pending' AND i.seq < 0"
        " AND i.retry_at < now() - $1 * interval '1 second' AND r.status = 'running'"
        " LIMIT 100),"
        " moved AS (UPDATE items i SET retry_at = now() FROM due"
        " WHERE i.run_id = due.run_id AND i.seq = due.seq AND i.status = 'pending')"
        " SELECT run_id, seq FROM due ORDER BY run_id, seq DESC",
        grace,
    )
    return [(r["run_id"], r["seq"]) for r in rows]
