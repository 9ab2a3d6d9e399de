"""Reading recreated topics from their start.

A topic the broker lost and that was created again starts at offset 0, but a consumer that
kept its partitions remembers its position in the old log: it waits for the new log to reach
that offset, and Faust drops every message below the last offset it read ("DROPPED MESSAGE
ROFF"), as if already processed. Every message produced after the loss would be lost to it
until the stall recovery sent the work again. A worker that learns of a loss (PostgreSQL
records each: ``sluice.topic_losses``) therefore rewinds its partitions of the lost topics to
the start of the new log; every stage skips what it did already (batch markers, run states),
so a message read twice costs work, never correctness. The start is committed too, so a
rebalance later does not seek back to the old log's offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

log = logging.getLogger(__name__)

# What Faust's consumer keeps per partition about the old log; it forgets the same on a
# revocation (faust.transport.consumer.Consumer.on_partitions_revoked).
_PER_PARTITION = ("_gap", "_acked", "_acked_index", "_read_offset", "_committed_offset")


async def rewind(consumer: Any, topics: Collection[str]) -> int:
    """Seek the Faust ``consumer``'s assigned partitions of ``topics`` to offset 0, forgetting
    what it read, acknowledged and committed of the old log. Returns how many it rewound."""
    partitions = [tp for tp in consumer.assignment() if tp.topic in topics]
    if not partitions:
        return 0
    for tp in partitions:
        for name in _PER_PARTITION:
            kept = getattr(consumer, name, None)
            if kept is not None:
                kept.pop(tp, None)
    start = dict.fromkeys(partitions, 0)
    # In the consumer's own thread, and until the new positions are known.
    await consumer.seek_wait(start)
    # The group's committed offsets may still be the old log's (committed to the restarted
    # broker before this worker knew): a later rebalance would seek back to them. Commit the
    # start, as Faust's consumer commits (its ``_commit`` is what ``commit`` calls).
    try:
        await consumer._commit(start)
    except Exception as exc:  # the rewind stands; Faust commits the new offsets as it goes
        log.warning("could not commit the start of the recreated topics: %s", exc)
    return len(partitions)
