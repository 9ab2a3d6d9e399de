"""Consumer lag per partition, from what a consumer knows already: the end offset its last
fetch saw (the broker sends a partition's highwater with every fetch response) and the offset it
committed. No request to the broker, so it can be measured as often as wanted.

The end is the larger of that highwater and the consumer's own position (the next offset it
will fetch): on Apache Kafka the highwater is never below the position, so the lag is exact
(as of the last fetch); on the embedded broker (Tansu 0.6) the highwater is the start of the
partition's last record batch plus one, which can be far below what the consumer already
fetched, and the position keeps the figure from going to zero or below while fetched messages
are not yet done. There it is a lower bound: it can miss at most the rest of the last batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

LAG_WAIT = 1.0
"""Seconds a lag measurement waits for a consumer's position."""


async def faust_lag(consumer: Any) -> dict[tuple[str, int], int]:
    """Lag per partition assigned to a Faust consumer: the end (see the module's note) minus the
    offset it committed (or, when it has committed nothing, its position)."""
    # Faust keeps the committed offsets of its assigned partitions here: set from the group's
    # offsets on assignment, moved on every commit, dropped on revocation (faust-streaming 0.15).
    committed: Any = getattr(consumer, "_committed_offset", {})
    lags: dict[tuple[str, int], int] = {}
    for tp in consumer.assignment():
        try:
            end = consumer.highwater(tp)
            position = await asyncio.wait_for(consumer.position(tp), LAG_WAIT)
        except Exception:  # revoked meanwhile, or no position yet: next time
            continue
        done = committed.get(tp, position)
        if end is not None and done is not None and position is not None:
            lags[(tp.topic, tp.partition)] = max(end, position) - done
    return lags


async def aiokafka_lag(consumer: Any) -> dict[tuple[str, int], int]:
    """Lag per partition assigned to an aiokafka consumer that commits what it polled once it
    applied it (the firehose applier): the end offset its last fetch saw minus its position."""
    lags: dict[tuple[str, int], int] = {}
    for tp in consumer.assignment():
        try:
            end = consumer.highwater(tp)
            done = await asyncio.wait_for(consumer.position(tp), LAG_WAIT)
        except Exception:
            continue
        if end is not None:
            lags[(tp.topic, tp.partition)] = max(end, done) - done
    return lags
