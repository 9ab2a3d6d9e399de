"""Recovery from what PostgreSQL holds, and the dead-letter topic, on the real stack."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from sluice.schemas.events import DeadLetter, ImportRequested
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.filestore import iter_bytes
from tests.conftest import ROOT, TOPICS, Stack, finish

pytestmark = pytest.mark.stack

CSV = b"id,name,price\n1,one,1.00\n2,two,2.00\n3,three,3.00\n"


async def stored_run(client: Client, importer: str = "t_exact") -> tuple[object, object]:
    """A queued run with its file stored whose request never reached the broker: a lost
    message."""
    files = (await client.deps()).files
    ref = await files.put(iter_bytes([CSV]), name="lost.csv")
    run = await (await client.deps()).runs.create(
        importer=importer, source="file", file_id=ref.id, file_name="lost.csv"
    )
    return run, ref


def sluice(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


async def test_a_run_whose_request_was_lost_is_resumed(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    await db.execute("TRUNCATE t_exact")
    run, _ = await stored_run(client)
    done = await finish(client, run, stack, timeout=90)
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.total_rows, done.created_rows) == (3, 3)
    types = [
        r["type"]
        for r in await db.fetch(
            "SELECT type FROM sluice.events WHERE run_id = $1 ORDER BY id", run.id
        )
    ]
    assert types[0] == "run.resumed" and types[-1] == "run.completed", types
    assert await db.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id) == 1


async def test_a_lost_trigger_is_resumed(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    (stack.files / "lost-trigger.csv").write_bytes(CSV)
    run = await (await client.deps()).runs.create(
        importer="t_fs", source="filesystem", options={"params": {"path": "lost-trigger.csv"}}
    )
    done = await finish(client, run, stack, timeout=90)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.created_rows + done.updated_rows + done.unchanged_rows == 3


async def test_a_run_that_cannot_be_resumed_fails_with_the_reason(
    client: Client, stack: Stack
) -> None:
    run, ref = await stored_run(client)
    await (await client.deps()).files.delete(ref.id)  # pruned while the message was lost
    done = await finish(client, run, stack, timeout=90)
    assert done.status is RunStatus.FAILED
    assert "stored file is gone" in (done.error or "")


async def test_dead_letters_are_listed_and_replayed_once(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
    await producer.start()
    try:
        garbage = b"\xff\xfe not a request " + uuid.uuid4().hex.encode()
        await producer.send_and_wait(TOPICS.requests, garbage, key=b"x")
        # A request that failed for a cause since fixed, as the split agent dead-letters it.
        run, ref = await stored_run(client)
        request = ImportRequested(
            run_id=run.id,  # type: ignore[attr-defined]
            importer="t_exact",
            file=ref,  # type: ignore[arg-type]
            requested_at=datetime.now(UTC),
        )
        letter = DeadLetter.of(
            TOPICS.requests,
            0,
            12345,
            "split failed: the database was down",
            request.model_dump_json().encode(),
        )
        await producer.send_and_wait(
            TOPICS.deadletter,
            letter.model_dump_json().encode(),
            key=str(run.id).encode(),  # type: ignore[attr-defined]
        )
    finally:
        await producer.stop()
    import asyncio

    deadline = asyncio.get_running_loop().time() + 30
    while True:
        listed = sluice("dlq", "--topic", TOPICS.requests, "--json", env=stack.env)
        assert listed.returncode == 0, listed.stderr
        letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
        mine = [x for x in letters if x["payload_encoding"] == "base64"]
        if mine:
            break
        assert asyncio.get_running_loop().time() < deadline, letters
        await asyncio.sleep(0.5)
    assert all(x["topic"] == TOPICS.requests for x in letters)
    assert "not a valid import request" in mine[-1]["reason"] and mine[-1]["offset"] >= 0

    replayed = sluice("dlq", "--topic", TOPICS.requests, "--replay", env=stack.env)
    assert replayed.returncode == 0, replayed.stderr
    done = await finish(client, run, stack, timeout=60)  # type: ignore[arg-type]
    assert done.status is RunStatus.COMPLETED, done.error
    assert await db.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id) == 0  # type: ignore[attr-defined]
    # The garbage came back as a new letter; neither it nor the request is sent again.
    await asyncio.sleep(2)
    again = sluice("dlq", "--topic", TOPICS.requests, "--replay", env=stack.env)
    assert "replayed 0 letters" in again.stderr, again.stderr
    assert "replayed before" in again.stderr


async def test_poison_on_every_topic_is_dead_lettered_and_the_agents_go_on(
    client: Client, stack: Stack, tmp_path
) -> None:
    import asyncio

    from aiokafka import AIOKafkaConsumer

    from tests.conftest import TOPICS

    topics = [
        TOPICS.requests,
        TOPICS.batches,
        TOPICS.triggers,
        TOPICS.items,
        TOPICS.firehose,
        TOPICS.backfill,
        TOPICS.lifecycle,
    ]
    marker = uuid.uuid4().hex
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
    await producer.start()
    try:
        for topic in topics:
            await producer.send_and_wait(topic, f"poison {marker}".encode(), key=b"k:1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        TOPICS.deadletter, bootstrap_servers=stack.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        seen: dict[str, str] = {}
        deadline = asyncio.get_running_loop().time() + 60
        while set(seen) != set(topics):
            assert asyncio.get_running_loop().time() < deadline, f"dead-lettered: {seen}"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    letter = orjson.loads(r.value)
                    if marker in letter["payload"]:
                        seen[letter["topic"]] = letter["reason"]
    finally:
        await consumer.stop()
    assert all(reason for reason in seen.values())
    path = tmp_path / "after.csv"
    path.write_bytes(CSV)
    done = await finish(client, await client.submit_file("t_exact", path, dry_run=True), stack)
    assert done.status is RunStatus.COMPLETED  # every agent still works


async def test_a_split_done_again_cuts_the_batches_as_the_first_one_did(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    """The batching of a run's first split is kept with its plan; a later split of the same run
    (here: resumed by recovery) uses it, whatever this worker's settings say."""
    table = f"recut_{uuid.uuid4().hex[:8]}"
    files = (await client.deps()).files
    body = b"id,name\n" + b"".join(f"{i},n{i}\n".encode() for i in range(1, 21))
    ref = await files.put(iter_bytes([body]), name="recut.csv")
    runs = (await client.deps()).runs
    run = await runs.create(
        importer="adhoc",
        source="file",
        file_id=ref.id,
        file_name="recut.csv",
        options={"table": table, "key": ["id"]},
    )
    first = {"size": 7, "partitions": 1, "max_bytes": 900_000, "copy": True}
    await runs.save_plan(run.id, {"batching": first}, {})
    done = await finish(client, run, stack, timeout=90)
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.created_rows, done.total_batches) == (20, 3)  # 7 + 7 + 6 on one partition
    plan = await db.fetchval("SELECT plan::text FROM sluice.runs WHERE id = $1", run.id)
    assert orjson.loads(plan)["batching"] == first
