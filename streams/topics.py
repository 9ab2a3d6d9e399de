"""Every topic Sluice uses. Keys and partitioning rules live here, next to the names."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

REQUESTS = "sluice.requests"
"""Import requests (claim checks), keyed by run id."""
BATCHES = "sluice.batches"
"""Row batches, explicitly partitioned by record key so a key's rows stay in order."""
LIFECYCLE = "sluice.lifecycle"
"""Run lifecycle events relayed from the outbox, keyed by run id."""
TRIGGERS = "sluice.triggers"
"""Requests to pull from a source (URL, FTP/SFTP, filesystem, paginated API), keyed by run id."""
ITEMS = "sluice.items"
"""Pages of discovered API items to fetch in detail, keyed by ``<run_id>:<seq>``; the items
themselves are in ``sluice.items`` (the table)."""
FIREHOSE = "sluice.firehose"
"""AT Protocol firehose events (Jetstream JSON), keyed by DID so a repository's events stay in
order."""
BACKFILL = "sluice.backfill"
"""Requests to backfill a repository (``BackfillRequested``), keyed by DID."""
DEADLETTER = "sluice.deadletter"
"""Messages that could not be processed, with topic, partition, offset and reason."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def all_topics(partitions: int) -> list[TopicSpec]:
    return [
        TopicSpec(REQUESTS, partitions),
        TopicSpec(BATCHES, partitions),
        TopicSpec(LIFECYCLE, partitions),
        TopicSpec(TRIGGERS, partitions),
        TopicSpec(ITEMS, partitions),
        TopicSpec(FIREHOSE, partitions),
        TopicSpec(BACKFILL, partitions),
        TopicSpec(DEADLETTER, 1),
    ]


def partition_for_key(key: str, partitions: int) -> int:
    """Stable across processes and machines (Python's ``hash`` is salted per process)."""
    return zlib.crc32(key.encode()) % partitions
