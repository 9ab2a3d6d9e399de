"""A token bucket per source, kept in PostgreSQL so that every worker of the cluster shares it.

``sluice.take_token`` (migration 0003) takes a token under a row lock and says how long to wait
when there is none; a 429 from the source blocks the bucket for everyone until its reset time.
Inside one process a lock per source lets one coroutine at a time ask, so waiting coroutines do
not poll the database in a herd.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)


@dataclass
class RateStats:
    """What a run spent on the rate limit: 429 answers, waits, seconds waited."""

    hits: int = 0
    sleeps: int = 0
    slept: float = 0.0

    def add(self, other: RateStats) -> None:
        self.hits += other.hits
        self.sleeps += other.sleeps
        self.slept += other.slept

    def take(self) -> RateStats:
        """The stats so far, and start again from zero (to record them exactly once)."""
        out = RateStats(self.hits, self.sleeps, self.slept)
        self.hits, self.sleeps, self.slept = 0, 0, 0.0
        return out


class RateLimiter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, key: str, per_second: float, burst: int, stats: RateStats) -> None:
        """Return once a request to ``key`` may be sent."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            while True:
                wait = await self.pool.fetchval(
                    "SELECT take_token($1, $2, $3)", key, float(per_second), float(burst)
                )
                if wait <= 0:
                    return
                stats.sleeps += 1
                stats.slept += wait
                await asyncio.sleep(wait)

    async def block(self, key: str, seconds: float) -> None:
        """The source said 429: nobody in the cluster sends to it for ``seconds``, and the
        bucket restarts empty so the requests after the pause come at the configured rate."""
        await self.pool.execute(
            "INSERT INTO rate_limits (source, tokens, updated_at, blocked_until)"
            " VALUES ($1, 0, clock_timestamp(), clock_timestamp() + $2 * interval '1 second')"
            " ON CONFLICT (source) DO UPDATE SET tokens = 0,"
            " updated_at = greatest(rate_limits.updated_at, EXCLUDED.blocked_until),"
            " blocked_until = greatest(rate_limits.blocked_until, EXCLUDED.blocked_until)",
            key,
            float(seconds),
        )
        log.info("source %s answered 429: backing off %.2fs for the whole cluster", key, seconds)
