"""Two deployments on one broker and one PostgreSQL: different topic prefixes, consumer groups
and schemas. They import at the same time; each ends exact and never sees the other's runs,
batches or events (nor does the test stack's own deployment)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from sluice.config import DatabaseSettings, KafkaSettings, Settings
from sluice.importers.registry import build_registry
from sluice.schemas.importers import ADHOC
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.streams.topics import Topic, Topics
from sluice.worker import prepare
from tests.conftest import PARTITIONS, Stack, Worker

pytestmark = pytest.mark.stack

ROWS = 6000


@dataclass
class Deployment:
    name: str
    settings: Settings
    worker: Worker

    @property
    def topics(self) -> Topics:
        return Topics.of(self.settings.kafka)


def deployment_env(name: str) -> dict[str, str]:
    return {
        "SLUICE_TOPIC_PREFIX": f"{name}.sluice",
        "SLUICE_GROUP_ID": f"{name}-workers",
        "SLUICE_DATABASE_SCHEMA": f"{name}_sluice",
        "SLUICE_DATABASE_ATPROTO_SCHEMA": f"{name}_atproto",
    }


@pytest.fixture(scope="module")
def deployments(stack: Stack) -> Iterator[list[Deployment]]:
    made = []
    try:
        for name in ("alpha", "beta"):
            env = deployment_env(name)
            base = stack.settings()
            settings = Settings(
                kafka=KafkaSettings(
                    bootstrap=stack.broker.bootstrap,
                    partitions=PARTITIONS,
                    session_timeout=6,
                    topic_prefix=env["SLUICE_TOPIC_PREFIX"],
                    group_id=env["SLUICE_GROUP_ID"],
                ),
                database=DatabaseSettings(
                    url=stack.postgres.url,
                    core_schema=env["SLUICE_DATABASE_SCHEMA"],
                    atproto_schema=env["SLUICE_DATABASE_ATPROTO_SCHEMA"],
                ),
                pipeline=base.pipeline,
                url=base.url,
            )
            asyncio.run(prepare(settings, build_registry(settings.pipeline.importers)))
            worker = Worker(f"worker-{name}", {**stack.env, **env}, stack.root)
            worker.start()
            made.append(Deployment(name, settings, worker))
        yield made
    finally:
        for d in made:
            d.worker.stop()


@pytest.fixture
async def clients(deployments: list[Deployment]) -> AsyncIterator[list[Client]]:
    made = [Client(d.settings) for d in deployments]
    yield made
    for c in made:
        await c.close()


def write_file(path: Path, tag: str) -> Path:
    lines = ["id,name,price"] + [f"{i},{tag}-{i},{i % 97}.5" for i in range(1, ROWS + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def messages(kafka: KafkaSettings, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every message on ``topic`` now (an assigned consumer, no group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: list[tuple[bytes | None, bytes]] = []
        while True:
            batch = await consumer.getmany(timeout_ms=1500)
            if not batch:
                return found
            found.extend((r.key, r.value or b"") for rs in batch.values() for r in rs)
    finally:
        await consumer.stop()


async def test_two_deployments_on_one_broker_and_database_stay_apart(
    stack: Stack,
    deployments: list[Deployment],
    clients: list[Client],
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    tables = {d.name: f"dep_{d.name}_{uuid.uuid4().hex[:6]}" for d in deployments}
    submitted = await asyncio.gather(
        *(
            client.submit_file(
                ADHOC,
                write_file(tmp_path / f"{d.name}.csv", d.name),
                options={"table": tables[d.name], "key": ["id"], "schema": "public"},
            )
            for d, client in zip(deployments, clients, strict=True)
        )
    )
    done = await asyncio.gather(
        *(c.wait(r.id, timeout=240) for c, r in zip(clients, submitted, strict=True))
    )
    for d, run in zip(deployments, done, strict=True):
        assert run.status is RunStatus.COMPLETED, f"{d.name}: {run.error}\n{d.worker.tail()}"
        assert (run.created_rows, run.processed_rows, run.failed_rows) == (ROWS, ROWS, 0)
        rows = await db.fetch(f'SELECT id, name FROM public."{tables[d.name]}" ORDER BY id')
        assert [(r["id"], r["name"]) for r in rows] == [
            (i, f"{d.name}-{i}") for i in range(1, ROWS + 1)
        ]

    alpha, beta = deployments
    for mine, run, theirs in ((alpha, done[0], done[1]), (beta, done[1], done[0])):
        schema = mine.settings.database.core_schema
        runs = await db.fetch(f'SELECT id FROM "{schema}".runs')
        assert {r["id"] for r in runs} == {run.id}, f"{mine.name} sees runs not its own"
        events = await db.fetch(f'SELECT DISTINCT run_id FROM "{schema}".events')
        assert {r["run_id"] for r in events} == {run.id}
        batches = await db.fetchval(
            f'SELECT count(*) FROM "{schema}".batches WHERE run_id = $1', theirs.id
        )
        assert batches == 0
        kafka = mine.settings.kafka
        requests = await messages(kafka, mine.topics.name(Topic.REQUESTS))
        assert {k for k, _ in requests} == {str(run.id).encode()}
        keys = {k for k, _ in await messages(kafka, mine.topics.name(Topic.BATCHES))}
        assert keys and all(k is not None and k.startswith(str(run.id).encode()) for k in keys)
        lifecycle = await messages(kafka, mine.topics.name(Topic.LIFECYCLE))
        assert lifecycle and all(str(theirs.id).encode() not in v for _, v in lifecycle)
        assert b'"run.completed"' in b"".join(v for _, v in lifecycle)

    # The test stack's own deployment (prefix sluice, schema sluice) saw neither run.
    shared = await db.fetchval(
        "SELECT count(*) FROM sluice.runs WHERE id = ANY($1::uuid[])", [r.id for r in done]
    )
    assert shared == 0
    default_requests = await messages(stack.settings().kafka, Topics().requests)
    assert not [k for k, _ in default_requests if k in {str(r.id).encode() for r in done}]
