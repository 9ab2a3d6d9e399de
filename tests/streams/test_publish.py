"""KeyedBatches (streams/publish.py) on the real broker: each message on the partition the
producer's own ``send`` gives its key, in order, whether its batch was sent full, flushed, or
once it lingered long enough without either."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from sluice.config import KafkaSettings
from sluice.streams import kafka as clients
from sluice.streams.publish import KeyedBatches
from tests.conftest import Stack

pytestmark = pytest.mark.stack

PARTITIONS = 4


async def _topics(kafka: KafkaSettings, *names: str) -> None:
    admin = clients.admin(kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    finally:
        await admin.close()


async def _read(
    kafka: KafkaSettings, topic: str, count: int
) -> dict[int, list[tuple[bytes, bytes]]]:
    """The first ``count`` messages of ``topic``: per partition, (key, value) in order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        deadline = time.monotonic() + 30
        while sum(map(len, got.values())) < count and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                got[tp.partition] += [(r.key, r.value) for r in records]
    finally:
        await consumer.stop()
    return got


async def test_messages_go_where_the_producers_send_puts_their_keys_in_order(stack: Stack) -> None:
    kafka = KafkaSettings(bootstrap=stack.broker.bootstrap)
    batched, plain = f"kb-{uuid.uuid4().hex[:8]}", f"kp-{uuid.uuid4().hex[:8]}"
    await _topics(kafka, batched, plain)
    producer = clients.event_producer(kafka)
    await producer.start()
    # 4,000 messages of ~300 bytes over 300 keys: more than one 256 KiB batch per partition.
    messages = [(f"did:plc:{i % 300:05d}".encode(), f"{i:06d}".encode() * 50) for i in range(4000)]
    try:
        events = KeyedBatches(producer, batched, linger=0.05)
        await events.start()
        for key, value in messages:
            await events.send(key, value)
            await producer.send(plain, value, key=key)
        await events.flush()
        await producer.flush()
        await events.stop()
    finally:
        await producer.stop()
    by_batches, by_send = await _read(kafka, batched, 4000), await _read(kafka, plain, 4000)
    assert sum(map(len, by_batches.values())) == 4000
    assert by_batches == by_send  # the same partition for each key, the same order in each
    assert len(by_batches) == PARTITIONS


async def test_a_batch_neither_full_nor_flushed_is_sent_once_it_lingered(stack: Stack) -> None:
    kafka = KafkaSettings(bootstrap=stack.broker.bootstrap)
    topic = f"kl-{uuid.uuid4().hex[:8]}"
    await _topics(kafka, topic)
    producer = clients.event_producer(kafka)
    await producer.start()
    try:
        events = KeyedBatches(producer, topic, linger=0.2)
        await events.start()
        await events.send(b"did:plc:one", b"alone")
        got = await _read(kafka, topic, 1)  # no flush: only the timer sends it
        assert [m for ms in got.values() for m in ms] == [(b"did:plc:one", b"alone")]
        await events.stop()
    finally:
        await producer.stop()
