"""Running the Jetstream consumer: inside a worker (one leader across the cluster, chosen by an
advisory lock held on its connection) or alone (``sluice firehose``). Either way events go to
the firehose topic keyed by DID, and the cursor is kept in PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from sluice.agents.deps import Deps
from sluice.agents.firehose.consume import ConsumerStats, JetstreamConsumer, PgCursorStore
from sluice.config import FirehoseSettings
from sluice.schemas.firehose import JetstreamEvent
from sluice.storage.db import advisory_key

log = logging.getLogger(__name__)

LEADER_LOCK = advisory_key("firehose-leader")
PublishRaw = Callable[[str, bytes], Awaitable[None]]
Flush = Callable[[], Awaitable[None]]
DeadLetter = Callable[[bytes, str], Awaitable[None]]


async def register(
    pool: asyncpg.Pool, name: str, collections: Sequence[str], dids: Sequence[str]
) -> None:
    """Record what the consumer listens to, so a backfill can check that it is covered."""
    await pool.execute(
        "INSERT INTO firehose_cursors (name, collections, dids)"
        " VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET collections = $2, dids = $3,"
        " updated_at = now()",
        name,
        list(collections),
        list(dids),
    )


def build_consumer(
    pool: asyncpg.Pool,
    settings: FirehoseSettings,
    publish: PublishRaw,
    flush: Flush,
    dead_letter: DeadLetter,
    *,
    url: str | None = None,
    collections: Sequence[str] | None = None,
    dids: Sequence[str] | None = None,
) -> JetstreamConsumer:
    async def send(event: JetstreamEvent, raw: bytes) -> None:
        await publish(event.did, raw)

    return JetstreamConsumer(
        url or settings.url,
        name=settings.name,
        collections=settings.split(settings.collections) if collections is None else collections,
        dids=settings.split(settings.dids) if dids is None else dids,
        cursor_store=PgCursorStore(pool),
        publish=send,
        flush=flush,
        dead_letter=dead_letter,
        rewind=settings.rewind,
        cursor_interval=settings.cursor_interval,
    )


async def run_consumer(
    pool: asyncpg.Pool, consumer: JetstreamConsumer, stop: asyncio.Event | None = None
) -> ConsumerStats:
    await register(pool, consumer.name, consumer.collections, consumer.dids)

    async def heartbeat() -> None:
        # Quiet streams save no cursor: the heartbeat says the consumer is alive all the same.
        while True:
            await asyncio.sleep(1.0)
            await pool.execute(
                "UPDATE firehose_cursors SET updated_at = now() WHERE name = $1",
                consumer.name,
            )

    beat = asyncio.create_task(heartbeat())
    try:
        await consumer.run(stop)
    finally:
        beat.cancel()
        await asyncio.wait((beat,))
    return consumer.stats


async def run_leader_consumer(
    deps: Deps, publish: PublishRaw, flush: Flush, dead_letter: DeadLetter
) -> None:
    """Inside a worker: the worker holding the leader lock runs the consumer; the others wait
    and take over when the leader's connection (and so its lock) goes away."""
    pool = deps.pool
    async with pool.acquire() as conn:
        # Blocks until the leader's session ends; the lock goes with its connection.
        await conn.execute(f"SELECT pg_advisory_lock({LEADER_LOCK})")
        log.info("this worker runs the firehose consumer (%s)", deps.settings.firehose.url)
        consumer = build_consumer(pool, deps.settings.firehose, publish, flush, dead_letter)
        deps.metrics.watch_cursor(consumer.name, consumer.saved_cursor)
        await run_consumer(pool, consumer)
