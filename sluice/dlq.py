"""The dead-letter topic: read what is on it, and replay letters to the topics they came from
once their cause is fixed. A message is replayed once (``sluice.dlq_replays``, by topic and
content): one that fails again comes back as a new letter, which is not replayed in a loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import asyncpg
from aiokafka import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from sluice.config import KafkaSettings
from sluice.schemas.events import DeadLetter
from sluice.storage.dlq import record_replay
from sluice.streams import kafka as clients
from sluice.streams.topics import Topic, Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    key: bytes | None
    letter: DeadLetter


IDLE_MS = 1000
"""A poll of the dead-letter topic that returns nothing for this long ends the reading."""

READ_TIMEOUT = 60.0
"""Seconds ``read_letters`` reads at most, however much is still coming."""


async def read_letters(
    kafka: KafkaSettings,
    *,
    topic: str | None = None,
    limit: int | None = None,
    within: float = READ_TIMEOUT,
) -> list[Letter]:
    """The letters on the dead-letter topic now, oldest first per partition.

    Read from the beginning until a poll returns nothing and every partition is at least at
    the end offset the broker reports, bounded by ``within`` seconds: the end offset is only a lower
    bound (the embedded broker reports the start of a partition's last record batch plus one,
    so 600 letters produced in one burst can show as 2), never where the reading stops."""
    deadletter = Topics.of(kafka).deadletter
    consumer = clients.consumer(kafka)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(deadletter) or set()
        if not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(deadletter) or set()
        tps = [TopicPartition(deadletter, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: list[Letter] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=IDLE_MS, max_records=5000)
            for records in batch.values():
                found.extend(_letters(records, topic))
            if not batch and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
        else:
            log.warning(
                "the dead-letter topic %s was still being read after %.0fs; listing what was"
                " read so far",
                deadletter,
                within,
            )
        found.sort(key=lambda x: x.letter.time)
        return found[-limit:] if limit else found
    finally:
        await consumer.stop()


def _letters(records: list[ConsumerRecord[bytes, bytes]], topic: str | None) -> list[Letter]:
    """The dead letters among ``records`` (from ``topic`` when given; others are skipped)."""
    letters = []
    for r in records:
        try:
            letter = DeadLetter.model_validate_json(r.value or b"")
        except ValidationError:
            continue
        if topic is None or letter.topic == topic:
            letters.append(Letter(r.partition, r.offset, r.key, letter))
    return letters


async def replay(
    kafka: KafkaSettings, pool: asyncpg.Pool, letters: list[Letter]
) -> tuple[list[Letter], list[tuple[Letter, str]]]:
    """Send each letter's message back to its topic, at most once per letter. Returns the
    letters replayed and (letter, why not) for the others."""
    names = Topics.of(kafka)
    ours = {names.name(t) for t in Topic} - {names.deadletter}
    replayed: list[Letter] = []
    skipped: list[tuple[Letter, str]] = []
    producer = clients.producer(kafka)
    await producer.start()
    try:
        for item in letters:
            if item.letter.topic not in ours:
                skipped.append((item, f"{item.letter.topic} is not a Sluice topic"))
                continue
            async with pool.acquire() as conn, conn.transaction():
                fresh = await record_replay(
                    conn,
                    item.letter.topic,
                    hashlib.sha256(item.letter.value()).hexdigest(),
                    item.partition,
                    item.offset,
                )
                if not fresh:
                    skipped.append((item, "this message was replayed before"))
                    continue
                # Sent inside the transaction: a failed send leaves the letter to replay again.
                await producer.send_and_wait(item.letter.topic, item.letter.value(), key=item.key)
            replayed.append(item)
    finally:
        await producer.stop()
    return replayed, skipped
