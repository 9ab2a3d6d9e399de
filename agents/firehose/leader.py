"""Running the Jetstream consumer: inside a worker (one leader across the cluster, chosen by a
PostgreSQL lock held on its connection) or alone (``sluice firehose``). Either way events go to
the firehose topic keyed by DID, and the cursor is kept in PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from sluice.agents.deps import Deps
from sluice.agents.firehose.consume import ConsumerStats, JetstreamConsumer
from sluice.config import FirehoseSettings
from sluice.schemas.firehose import JetstreamEvent
from sluice.storage.firehose import (
    PgCursorStore,
    register_consumer,
    touch_consumer,
    wait_for_leadership,
)
from sluice.streams.kafka import event_limit

log = logging.getLogger(__name__)

HEARTBEAT = 1.0
"""Seconds between heartbeats (``sluice.firehose_cursors.updated_at``)."""
HEARD_WITHIN = 2.0
"""A heartbeat is written when the server sent a frame, or answered a ping, this recently."""

PublishRaw = Callable[[str, bytes], Awaitable[None]]
Flush = Callable[[], Awaitable[None]]
DeadLetter = Callable[[bytes, str], Awaitable[None]]


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
    max_event_bytes: int = 0,
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
        max_event_bytes=max_event_bytes,
    )


async def run_consumer(
    pool: asyncpg.Pool, consumer: JetstreamConsumer, stop: asyncio.Event | None = None
) -> ConsumerStats:
    await register_consumer(pool, consumer.name, consumer.collections, consumer.dids)

    async def heartbeat() -> None:
        # Quiet streams save no cursor: the heartbeat says the consumer hears its server all
        # the same. Only then: a consumer reconnecting to a dead URL is not live.
        while True:
            await asyncio.sleep(HEARTBEAT)
            if await consumer.heard_from_server(HEARD_WITHIN):
                await touch_consumer(pool, consumer.name)

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
        await wait_for_leadership(conn)
        log.info("this worker runs the firehose consumer (%s)", deps.settings.firehose.url)
        consumer = build_consumer(
            pool,
            deps.settings.firehose,
            publish,
            flush,
            dead_letter,
            max_event_bytes=event_limit(deps.settings.kafka),
        )
        deps.metrics.watch_cursor(consumer.name, consumer.saved_cursor)
        await run_consumer(pool, consumer)
