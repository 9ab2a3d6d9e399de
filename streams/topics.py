"""Every topic Sluice uses. Keys and partitioning rules live here, next to the names.

Topics have a logical name (:class:`Topic`) and a physical one: the deployment's prefix
(``SLUICE_TOPIC_PREFIX``, default ``sluice``), a dot and the logical name, so two deployments
can share one cluster. Code and the outbox speak of logical names; :class:`Topics` turns them
into the names on the broker.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import StrEnum

from sluice.config import DEFAULT_TOPIC_PREFIX, KafkaSettings


class Topic(StrEnum):
    """The logical topics, in the order they are created."""

    REQUESTS = "requests"
    """Import requests (claim checks), keyed by run id."""
    BATCHES = "batches"
    """Row batches, explicitly partitioned by record key so a key's rows stay in order."""
    LIFECYCLE = "lifecycle"
    """Run lifecycle events relayed from the outbox, keyed by run id."""
    TRIGGERS = "triggers"
    """Requests to pull from a source (URL, FTP/SFTP, filesystem, paginated API), keyed by run
    id."""
    ITEMS = "items"
    """Pages of discovered API items to fetch in detail, keyed by ``<run_id>:<seq>``; the items
    themselves are in the ``items`` table."""
    FIREHOSE = "firehose"
    """AT Protocol firehose events (Jetstream JSON), keyed by DID so a repository's events stay
    in order."""
    BACKFILL = "backfill"
    """Requests to backfill a repository (``BackfillRequested``), keyed by DID."""
    DEADLETTER = "deadletter"
    """Messages that could not be processed, with topic, partition, offset and reason."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


@dataclass(frozen=True)
class Topics:
    """The physical topic names of one deployment (the prefix is checked by the settings)."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    @classmethod
    def of(cls, kafka: KafkaSettings) -> Topics:
        return cls(kafka.topic_prefix)

    def name(self, topic: Topic) -> str:
        return f"{self.prefix}.{topic.value}"

    def logical(self, name: str) -> Topic | None:
        """The logical topic of a physical ``name`` of this deployment, or None."""
        base, dot, rest = name.rpartition(".")
        if dot and base == self.prefix:
            try:
                return Topic(rest)
            except ValueError:
                return None
        return None

    @property
    def requests(self) -> str:
        return self.name(Topic.REQUESTS)

    @property
    def batches(self) -> str:
        return self.name(Topic.BATCHES)

    @property
    def lifecycle(self) -> str:
        return self.name(Topic.LIFECYCLE)

    @property
    def triggers(self) -> str:
        return self.name(Topic.TRIGGERS)

    @property
    def items(self) -> str:
        return self.name(Topic.ITEMS)

    @property
    def firehose(self) -> str:
        return self.name(Topic.FIREHOSE)

    @property
    def backfill(self) -> str:
        return self.name(Topic.BACKFILL)

    @property
    def deadletter(self) -> str:
        return self.name(Topic.DEADLETTER)

    def specs(self, partitions: int) -> list[TopicSpec]:
        """Every topic with its partitions (the dead-letter topic has one: it is read in
        order)."""
        return [TopicSpec(self.name(t), 1 if t is Topic.DEADLETTER else partitions) for t in Topic]


def outbox_topic(stored: str) -> Topic:
    """The logical topic of an outbox row: rows written before prefixes store the physical
    default name (``sluice.lifecycle``)."""
    try:
        return Topic(stored)
    except ValueError:
        found = Topics().logical(stored)
        if found is None:
            raise ValueError(f"the outbox names an unknown topic {stored!r}") from None
        return found


def partition_for_key(key: str, partitions: int) -> int:
    """Stable across processes and machines (Python's ``hash`` is salted per process)."""
    return zlib.crc32(key.encode()) % partitions


def firehose_group(group: str) -> str:
    """The consumer group that applies the firehose topic: the workers' ``group``'s own, apart
    from Faust's (agents/firehose/agent.py)."""
    return f"{group}-firehose"
