"""Lifecycle: relay the outbox (``sluice.events``) to the lifecycle topic (and to the dead-letter
topic, for the rows that name it), every ``SLUICE_RELAY_INTERVAL`` seconds.

One relay at a time across the cluster (a PostgreSQL lock held for the relay's transaction), so
events leave in the order they were written. A crash between sending and marking sends an event
twice: consumers key on ``event_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from sluice.agents.deps import Deps
from sluice.agents.wiring import Wiring
from sluice.storage.outbox import mark_relayed, pending_events, take_relay_lock
from sluice.streams.admin import ensure_topics
from sluice.streams.topics import Topic, outbox_topic

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

Send = Callable[[str, str | None, bytes], Awaitable[Awaitable[Any] | None]]
"""Sends one event; may return the delivery's future, awaited before the event is marked."""
Flush = Callable[[], Awaitable[None]]


async def relay_outbox(deps: Deps, send: Send, flush: Flush, limit: int = 500) -> int:
    """Send pending events; returns how many were relayed (0 when another worker holds the lock)."""
    pool = deps.pool
    async with pool.acquire() as conn, conn.transaction():
        if not await take_relay_lock(conn):
            return 0
        events = await pending_events(conn, limit)
        if not events:
            return 0
        deliveries = [await send(e.topic, e.key, orjson.dumps(e.payload)) for e in events]
        await flush()
        # A flush does not raise for a message the broker refused: its future does. Marking
        # only what was delivered keeps the rest for the next relay.
        for delivery in deliveries:
            if delivery is not None:
                await delivery
        await mark_relayed(conn, [e.id for e in events])
    return len(events)


def register(app: faust.App, wiring: Wiring) -> None:
    """The outbox relay's timer."""
    deps = wiring.deps
    out_topics = {
        Topic.LIFECYCLE: wiring.topics.lifecycle,
        Topic.DEADLETTER: wiring.topics.deadletter,
    }

    @app.timer(deps.settings.pipeline.relay_interval)  # type: ignore[untyped-decorator]
    async def relay() -> None:
        async def send(topic_name: str, key: str | None, value: bytes) -> Any:
            out = out_topics[outbox_topic(topic_name)]
            return await out.send(key=key.encode() if key else None, value=value)

        try:
            await relay_outbox(deps, send, wiring.flush)
        except Exception:
            log.exception("outbox relay failed; will retry")
            # A broker that restarted lost its topics: the next relay needs them back.
            try:
                await ensure_topics(deps.settings.kafka)
            except Exception:
                log.warning("could not check the topics; will retry")
