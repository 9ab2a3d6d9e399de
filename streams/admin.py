"""Topic creation. Tansu does not auto-create topics and real clusters often forbid it: Sluice
creates what it needs, idempotently, before producing."""

from __future__ import annotations

import logging

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from sluice.config import KafkaSettings
from sluice.streams import kafka as clients
from sluice.streams.topics import Topics

log = logging.getLogger(__name__)


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create this deployment's topics that are missing; returns their names."""
    admin = clients.admin(kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        specs = Topics.of(kafka).specs(kafka.partitions)
        missing = [t for t in specs if t.name not in existing]
        if not missing:
            return []
        try:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, kafka.replication) for t in missing]
            )
        except TopicAlreadyExistsError:
            return []  # another worker won the race (and does what follows a creation)
        log.info("created topics %s", ", ".join(t.name for t in missing))
        return [t.name for t in missing]
    finally:
        await admin.close()
