"""Dead-letter replays: each dead letter is sent back to its topic at most once."""

from __future__ import annotations

import asyncpg


async def record_replay(
    conn: asyncpg.Connection, topic: str, payload_sha256: str, partition: int, offset: int
) -> bool:
    """Record that the letter at ``partition``/``offset`` of the dead-letter topic is being
    replayed; False when it was replayed before. Called in the transaction that sends it, so a
    failed send leaves the letter to replay again."""
    fresh = await conn.fetchval(
        "INSERT INTO dlq_replays (topic, payload_sha256, dlq_partition,"
        " dlq_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
        topic,
        payload_sha256,
        partition,
        offset,
    )
    return bool(fresh)
