"""The outbox (``events``): what the relay sends on and marks relayed, what a lifecycle
subscriber may have missed when the broker lost its topics, and the record of those losses."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from sluice.storage.db import advisory_key

RELAY_LOCK = advisory_key("relay")
"""One relay at a time across the cluster, so events leave in the order they were written."""


@dataclass(frozen=True)
class PendingEvent:
    """An outbox row not yet relayed: where it goes (``topic`` names an outbox topic), its
    key and its payload."""

    id: int
    topic: str
    key: str | None
    payload: dict[str, Any]


async def take_relay_lock(conn: asyncpg.Connection) -> bool:
    """The relay's lock until the caller's transaction ends; False (at once) when another
    worker's relay holds it."""
    return bool(await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({RELAY_LOCK})"))


async def pending_events(conn: asyncpg.Connection, limit: int) -> list[PendingEvent]:
    """The oldest ``limit`` events not yet relayed, in the order they were written."""
    rows = await conn.fetch(
        "SELECT id, topic, key, payload FROM events WHERE relayed_at IS NULL ORDER BY id LIMIT $1",
        limit,
    )
    return [PendingEvent(r["id"], r["topic"], r["key"], r["payload"]) for r in rows]


async def mark_relayed(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    """The events ``ids`` are on their topics (their deliveries were confirmed)."""
    await conn.execute(
        "UPDATE events SET relayed_at = now() WHERE id = ANY($1::bigint[])",
        list(ids),
    )


async def record_topic_loss(
    conn: asyncpg.Connection, topics: list[str], seen_whole: datetime | None
) -> None:
    await conn.execute(
        "INSERT INTO topic_losses (topics, seen_whole) VALUES ($1, $2)", topics, seen_whole
    )


async def last_topic_loss(conn: asyncpg.Connection) -> int:
    """The id of the latest loss, 0 when there was none."""
    return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM topic_losses"))


async def loss_recorded_since(conn: asyncpg.Connection, since: datetime) -> bool:
    """Whether a worker recorded a loss after ``since``."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM topic_losses WHERE detected_at > $1)", since
        )
    )


async def topic_losses_after(conn: asyncpg.Connection, after: int) -> list[tuple[int, list[str]]]:
    """The losses recorded after the one with id ``after``: (id, topics), oldest first."""
    rows = await conn.fetch("SELECT id, topics FROM topic_losses WHERE id > $1 ORDER BY id", after)
    return [(int(r["id"]), list(r["topics"])) for r in rows]


async def events_since(
    conn: asyncpg.Connection,
    *,
    created: datetime,
    relayed: datetime,
    run_id: uuid.UUID | None = None,
    importers: Collection[str] | None = None,
    types: Collection[str] | None = None,
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """Lifecycle events written since ``created`` and relayed since ``relayed`` (or not yet),
    oldest first, filtered as a subscriber is."""
    rows = await conn.fetch(
        "SELECT payload FROM events WHERE created_at >= $1"
        " AND (relayed_at IS NULL OR relayed_at >= $2)"
        " AND ($3::uuid IS NULL OR run_id = $3)"
        " AND ($4::text[] IS NULL OR payload->>'importer' = ANY($4))"
        " AND ($5::text[] IS NULL OR type = ANY($5))"
        " ORDER BY id LIMIT $6",
        created,
        relayed,
        run_id,
        sorted(importers) if importers is not None else None,
        sorted(types) if types is not None else None,
        limit,
    )
    return [dict(r["payload"]) for r in rows]
