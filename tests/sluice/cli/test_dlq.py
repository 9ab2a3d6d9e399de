"""``sluice dlq`` lists every letter on the dead-letter topic however the producer batched
them: it reads until a poll returns nothing, not up to the end offset the broker reports (the
embedded broker reports the start of the last record batch plus one)."""

from __future__ import annotations

import uuid

import orjson
from aiokafka import AIOKafkaProducer

from sluice.schemas.events import DeadLetter
from tests.conftest import TOPICS, Stack
from tests.support.cli import sluice

BURST = 600


async def test_letters_produced_in_one_burst_are_all_listed(stack: Stack) -> None:
    where = f"burst-{uuid.uuid4().hex[:8]}"  # a topic name no other test dead-letters from
    # One partition and big batches: the burst goes out in a few record batches.
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.broker.bootstrap, linger_ms=200, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        sent = [
            await producer.send(
                TOPICS.deadletter,
                DeadLetter.of(where, 0, n, f"burst letter {n}", b"{}").model_dump_json().encode(),
                key=where.encode(),
                partition=0,
            )
            for n in range(BURST)
        ]
        await producer.flush()
        offsets = [(await future).offset for future in sent]
    finally:
        await producer.stop()
    assert offsets == list(range(offsets[0], offsets[0] + BURST))

    listed = sluice("dlq", "--topic", where, "--json", env=stack.env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [x["offset"] for x in letters] == list(range(BURST))  # the letters' own offsets
    assert [x["dlq_offset"] for x in letters] == offsets
    assert {x["topic"] for x in letters} == {where}
