"""Topic creation. Tansu does not auto-create topics and real clusters often forbid it: Sluice
creates what it needs, idempotently, before producing."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from sluice.streams.topics import all_topics

log = logging.getLogger(__name__)


async def ensure_topics(bootstrap: str, partitions: int, replication: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in all_topics(partitions) if t.name not in existing]
        if not missing:
            return
        try:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, replication) for t in missing]
            )
        except TopicAlreadyExistsError:
            pass  # another worker won the race
        log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()
