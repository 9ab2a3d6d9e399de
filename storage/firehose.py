"""The firehose consumer's state (``firehose_cursors``): its resume cursor, what it listens to,
its heartbeat, and the leader lock that lets one worker of the cluster run it.

A consumer's row says which collections and DIDs it follows (a backfill checks that it is
covered) and when it was last alive; its cursor only ever moves forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sluice.storage.db import advisory_key

LEADER_LOCK = advisory_key("firehose-leader")
"""Held by the worker that runs the firehose consumer, for as long as its connection lives."""


class PgCursorStore:
    """Cursors in ``sluice.firehose_cursors``; a save never moves a cursor backwards."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load(self, name: str) -> int | None:
        value = await self.pool.fetchval(
            "SELECT time_us FROM firehose_cursors WHERE name = $1", name
        )
        return None if value is None else int(value)

    async def save(self, name: str, time_us: int) -> None:
        await self.pool.execute(
            "INSERT INTO firehose_cursors (name, time_us) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET"
            " time_us = GREATEST(firehose_cursors.time_us, EXCLUDED.time_us),"
            " updated_at = now()",
            name,
            time_us,
        )


NEVER_HEARD = "to_timestamp(0)"
"""``firehose_cursors.updated_at`` of a consumer that never heard from its server."""


async def register_consumer(
    pool: asyncpg.Pool, name: str, collections: Sequence[str], dids: Sequence[str]
) -> None:
    """Record what the consumer listens to, so a backfill can check that it is covered. Its
    heartbeat (``updated_at``) is left alone: starting is not hearing from the server."""
    await pool.execute(
        "INSERT INTO firehose_cursors (name, collections, dids, updated_at)"
        f" VALUES ($1, $2, $3, {NEVER_HEARD})"
        " ON CONFLICT (name) DO UPDATE SET collections = $2, dids = $3",
        name,
        list(collections),
        list(dids),
    )


async def touch_consumer(pool: asyncpg.Pool, name: str) -> None:
    """Say the consumer heard from its server: a quiet stream saves no cursor to say it."""
    await pool.execute("UPDATE firehose_cursors SET updated_at = now() WHERE name = $1", name)


async def wait_for_leadership(conn: asyncpg.Connection) -> None:
    """Block until this connection holds the leader lock. Nothing here releases it: it lasts
    while the caller holds the connection (a release to the pool resets the session, a lost
    connection ends it), so a leader that dies hands over to a waiting worker."""
    await conn.execute(f"SELECT pg_advisory_lock({LEADER_LOCK})")
