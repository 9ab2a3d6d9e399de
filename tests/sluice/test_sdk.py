"""The Python API (``sluice.start``, ``sluice.subscribe``, ...), ``sluice.sync`` and
``sluice tail`` against the real stack."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import sluice
import sluice.sync
from sluice import sdk
from sluice.errors import InvalidRequest, RunNotCancellable, StackNotFound, StackUnreachable
from sluice.schemas.events import LifecycleEvent, LifecycleEventType
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.filestore import iter_bytes
from sluice.subscription import Subscription
from tests.conftest import ROOT, Stack, finish, unique
from tests.support.ports import free_port
from tests.support.rows import make_rows, write_csv

pytestmark = pytest.mark.stack

TERMINAL = {"run.completed", "run.failed", "run.cancelled"}
SMALL = b"id,name,price\n1,apple,1.20\n2,pear,0.80\n"


async def collect(
    events: AsyncIterator[LifecycleEvent], *run_ids: uuid.UUID
) -> list[LifecycleEvent]:
    """Events until each of ``run_ids`` has had its last one; other runs' events included.

    Starting "at the newest event" can include a few older events on the embedded broker (Tansu
    reports the end of a partition as the first offset of its last record batch): tests that
    start at the newest event look at their own runs' events only.
    """
    seen: list[LifecycleEvent] = []
    open_runs = set(run_ids)
    async with asyncio.timeout(120):
        async for event in events:
            seen.append(event)
            if event.type in TERMINAL:
                open_runs.discard(event.run_id)
                if not open_runs:
                    return seen
    raise AssertionError(f"the subscription ended before runs {open_runs} finished: {seen}")


def of_run(events: list[LifecycleEvent], run_id: uuid.UUID) -> list[LifecycleEvent]:
    return [e for e in events if e.run_id == run_id]


@pytest.fixture
def big_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "big.csv", make_rows(30_000, seed=7))


async def test_subscribe_sees_a_run_started_after_it_in_order(
    stack: Stack, client: Client, big_csv: Path
) -> None:
    settings = stack.settings()
    async with sluice.subscribe(importers="t_sdk", settings=settings) as events:
        # A run of another importer at the same time: the importer filter keeps it out.
        other = await sluice.start("t_exact", SMALL, name="other.csv", settings=settings)
        run = await sluice.start("t_sdk", str(big_csv), user="sdk-test", settings=settings)
        everything = await collect(events, run.id)
    await finish(client, other, stack)
    assert {e.importer for e in everything} == {"t_sdk"}
    seen = of_run(everything, run.id)

    types = [e.type for e in seen]
    assert types[0] == LifecycleEventType.STARTED
    assert types[-1] == LifecycleEventType.COMPLETED
    assert LifecycleEventType.PROGRESS in types, types
    assert set(types[1:-1]) == {LifecycleEventType.PROGRESS}, types
    assert [e.time for e in seen] == sorted(e.time for e in seen)
    processed = [e.counters.processed_rows for e in seen]
    assert processed == sorted(processed) and processed[-1] == 30_000
    assert seen[-1].status is RunStatus.COMPLETED and seen[-1].error is None
    assert len({e.event_id for e in seen}) == len(seen)

    done = await sluice.get_run(run.id, settings=settings)
    assert done.file_name == "big.csv" and done.requested_by == "sdk-test"
    assert done.processed_rows == 30_000

    # The same events again, from the beginning of the topic, for this run only.
    async with sluice.subscribe(run_id=run.id, from_beginning=True, settings=settings) as again:
        replay = await collect(again, run.id)
    assert {e.run_id for e in replay} == {run.id}
    assert [e.event_id for e in replay] == [e.event_id for e in seen]
    async with sluice.subscribe(
        run_id=str(run.id), types=["run.completed"], from_beginning=True, settings=settings
    ) as only_done:
        async with asyncio.timeout(60):
            last = await anext(only_done)
    assert last.event_id == seen[-1].event_id


async def test_a_subscriber_with_a_group_id_resumes_where_it_stopped(
    stack: Stack, client: Client
) -> None:
    settings = stack.settings()
    group = unique("sdk-group")
    async with sluice.subscribe(group_id=group, importers=["t_sdk"], settings=settings) as events:
        first = await sluice.start("t_sdk", SMALL, name="first.csv", settings=settings)
        before = of_run(await collect(events, first.id), first.id)
    assert before[0].type == "run.started" and before[-1].type == "run.completed"

    # Published while nobody of the group listens, on partitions the first run did not use too
    # (one run lands on one of 4 partitions): wait until all of it is on the topic.
    missed = [
        await sluice.start("t_sdk", SMALL, name=f"second{i}.csv", settings=settings)
        for i in range(4)
    ]
    ids = [r.id for r in missed]
    async with sluice.subscribe(from_beginning=True, importers="t_sdk", settings=settings) as tap:
        published = [e for e in await collect(tap, *ids) if e.run_id in ids]

    async with sluice.subscribe(group_id=group, importers=["t_sdk"], settings=settings) as events:
        after = await collect(events, *ids)
    assert not of_run(after, first.id), "the restarted subscriber read old events again"
    resumed = [e for e in after if e.run_id in ids]
    assert sorted(e.event_id for e in resumed) == sorted(e.event_id for e in published)
    for run_id in ids:
        assert of_run(resumed, run_id) == of_run(published, run_id)  # each run in order


async def test_start_with_bytes_chunks_and_paths(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    settings = stack.settings()
    path = tmp_path / "fruit.csv"
    path.write_bytes(SMALL)

    async def chunks() -> AsyncIterator[bytes]:
        yield SMALL[:10]
        yield SMALL[10:]

    started = [
        await sluice.start("t_sdk", SMALL, name="bytes.csv", settings=settings),
        await sluice.start("t_sdk", path, settings=settings),
        await sluice.start("t_sdk", str(path), dry_run=True, settings=settings),
        await sluice.start("t_sdk", [SMALL[:7], SMALL[7:]], settings=settings),
        await sluice.start("t_sdk", chunks(), name="async.csv", settings=settings),
    ]
    for run in started:
        done = await sluice.wait(run.id, timeout=120, settings=settings)
        assert done.status is RunStatus.COMPLETED, done
        assert done.processed_rows == 2
    names = [(await sluice.get_run(r.id, settings=settings)).file_name for r in started]
    assert names == ["bytes.csv", "fruit.csv", "fruit.csv", "upload", "async.csv"]
    assert started[2].dry_run

    listed = await sluice.list_runs(importer="t_sdk", limit=500, settings=settings)
    assert {r.id for r in started} <= {r.id for r in listed}
    assert all(r.status is RunStatus.COMPLETED for r in listed if r.id in {s.id for s in started})

    with pytest.raises(InvalidRequest, match="is not a file"):
        await sluice.start("t_sdk", tmp_path / "missing.csv", settings=settings)
    with pytest.raises(InvalidRequest, match="as bytes"):
        await sluice.start("t_sdk", SMALL.decode(), settings=settings)
    with pytest.raises(InvalidRequest, match="not a run id"):
        await sluice.get_run("nope", settings=settings)
    with pytest.raises(RunNotCancellable):
        await sluice.cancel(started[0].id, settings=settings)


async def test_retry_through_the_api(stack: Stack, client: Client) -> None:
    settings = stack.settings()
    run = await sluice.start("t_sdk", b"id,name,price\n1,a,1\n2,b,oops\n", settings=settings)
    assert (await sluice.wait(run.id, 120, settings=settings)).failed_rows == 1
    child = await sluice.retry(run.id, dry_run=True, settings=settings)
    assert child.parent_run_id == run.id and child.dry_run
    done = await sluice.wait(child.id, 120, settings=settings)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS and done.failed_rows == 1


async def test_settings_come_from_the_environment(
    stack: Stack, client: Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = await sluice.start("t_sdk", SMALL, settings=stack.settings())
    for name in ("SLUICE_KAFKA_BOOTSTRAP", "SLUICE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path / "no-stack"))
    with pytest.raises(StackNotFound, match="sluice up"):
        await sluice.get_run(run.id)
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP", stack.broker.bootstrap)
    monkeypatch.setenv("SLUICE_DATABASE_URL", stack.postgres.url)
    assert (await sluice.get_run(run.id)).id == run.id
    # A database that refuses connections: the SDK's own error, with what to try.
    closed = free_port()
    monkeypatch.setenv("SLUICE_DATABASE_URL", f"postgresql://sluice:secret@127.0.0.1:{closed}/x")
    with pytest.raises(StackUnreachable, match=f"127.0.0.1:{closed}") as refused:
        await sluice.get_run(run.id)
    assert "sluice env" in str(refused.value) and "secret" not in str(refused.value)


async def test_the_sync_wrapper_runs_in_a_thread(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    settings = stack.settings()
    path = tmp_path / "fruit.csv"
    path.write_bytes(SMALL)
    run = await asyncio.to_thread(sluice.sync.start, "t_sdk", path, settings=settings)
    done = await asyncio.to_thread(sluice.sync.wait, run.id, 120, settings=settings)
    assert done.status is RunStatus.COMPLETED
    assert (await asyncio.to_thread(sluice.sync.get_run, run.id, settings=settings)).id == run.id
    listed = await asyncio.to_thread(
        sluice.sync.list_runs, "completed", "t_sdk", 500, settings=settings
    )
    assert run.id in {r.id for r in listed}
    with pytest.raises(RuntimeError, match=r"await sluice\.get_run"):
        sluice.sync.get_run(run.id, settings=settings)  # this thread runs a loop


@pytest.fixture
async def scratch_topic(stack: Stack) -> AsyncIterator[str]:
    name = unique("sdk-test")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        yield name
    finally:
        await admin.close()


async def test_produce_publishes_json(stack: Stack, scratch_topic: str) -> None:
    settings = stack.settings()
    rid = uuid.uuid4()
    await sluice.produce(scratch_topic, {"id": 1, "at": rid}, key="k1", settings=settings)
    await sluice.produce(scratch_topic, b'{"raw": true}', settings=settings)
    async with sdk.Publisher(settings) as publisher:
        await publisher.send(scratch_topic, sample_event(rid), key=rid)
    await asyncio.to_thread(sluice.sync.produce, scratch_topic, [1, 2], settings=settings)

    consumer = AIOKafkaConsumer(bootstrap_servers=stack.broker.bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(scratch_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(30):
            records = [await consumer.getone() for _ in range(4)]
    finally:
        await consumer.stop()
    assert [r.key for r in records] == [b"k1", None, str(rid).encode(), None]
    assert orjson.loads(records[0].value) == {"id": 1, "at": str(rid)}
    assert orjson.loads(records[1].value) == {"raw": True}
    assert LifecycleEvent.model_validate_json(records[2].value) == sample_event(rid)
    assert orjson.loads(records[3].value) == [1, 2]


def sample_event(run_id: uuid.UUID) -> LifecycleEvent:
    return LifecycleEvent.model_validate(
        {
            "event_id": uuid.UUID(int=1),
            "type": "run.started",
            "run_id": run_id,
            "importer": "t_sdk",
            "status": "running",
            "time": "2026-01-01T00:00:00Z",
            "counters": {},
        }
    )


async def test_a_subscription_skips_what_is_not_an_event(
    stack: Stack, scratch_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = stack.settings()
    rid = uuid.uuid4()
    async with Subscription(settings, topic=scratch_topic, group_id=unique("g")) as events:
        await sluice.produce(scratch_topic, b"{not json", settings=settings)
        await sluice.produce(scratch_topic, {"type": "run.started"}, settings=settings)
        await sluice.produce(scratch_topic, sample_event(rid), settings=settings)
        with caplog.at_level(logging.WARNING, logger="sluice.subscription"):
            async with asyncio.timeout(30):
                event = await anext(events)
    assert event == sample_event(rid)
    skipped = [r for r in caplog.records if "not a lifecycle event" in r.getMessage()]
    assert len(skipped) == 2
    assert "offset 0" in skipped[0].getMessage() and "offset 1" in skipped[1].getMessage()


async def tail(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    """`sluice tail ARGS`, returned once it says it is following."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice",
        "tail",
        *args,
        cwd=ROOT,
        env=stack.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        ready = await proc.stderr.readline()
    assert b"following lifecycle events" in ready, ready + await proc.stderr.read()
    return proc


async def test_sluice_tail_prints_a_runs_events(stack: Stack, client: Client) -> None:
    # The run exists (queued) before tail starts; its request is published after.
    files = (await client.deps()).files
    ref = await files.put(iter_bytes([SMALL]), name="tail.csv")
    run = await (await client.deps()).runs.create(importer="t_sdk", source="upload", file_id=ref.id)
    noise = await sluice.start("t_sdk", SMALL, settings=stack.settings())
    json_tail = await tail(stack, "--run", str(run.id), "--json")
    text_tail = await tail(stack, "--run", str(run.id))
    try:
        await client.publish_request(run, ref)
        lines: list[dict[str, object]] = []
        assert json_tail.stdout is not None and text_tail.stdout is not None
        async with asyncio.timeout(120):
            while not lines or lines[-1]["type"] not in TERMINAL:
                line = await json_tail.stdout.readline()
                assert line, "tail stopped"
                lines.append(orjson.loads(line))
            text = [(await text_tail.stdout.readline()).decode() for _ in lines]
        text_tail.send_signal(signal.SIGINT)  # Ctrl-C: a quiet exit
        async with asyncio.timeout(30):
            assert await text_tail.wait() == 0
        assert text_tail.stderr is not None
        assert b"Traceback" not in await text_tail.stderr.read()
    finally:
        for proc in (json_tail, text_tail):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
    await finish(client, noise, stack)
    assert {e["run_id"] for e in lines} == {str(run.id)}
    assert lines[0]["type"] == "run.started" and lines[-1]["type"] == "run.completed"
    for line in lines:
        LifecycleEvent.model_validate(line)
    assert all(str(run.id) in t and "t_sdk" in t for t in text)
    assert "run.completed" in text[-1] and "2/2 rows" in text[-1]


async def test_the_documented_examples_run(stack: Stack, client: Client) -> None:
    """Every ```python block of docs/python-api.md, as a script against the stack."""
    examples = re.findall(
        r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S
    )
    assert len(examples) >= 6
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.broker.bootstrap)
    await admin.start()
    try:  # the produce example's topic: Sluice creates only its own
        await admin.create_topics([NewTopic("example.orders", 1, 1)])
    finally:
        await admin.close()
    for code in examples:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=ROOT,
            env=stack.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(180):
            out, err = await proc.communicate()
        assert proc.returncode == 0, (
            f"{code}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
        )
        assert out.strip(), code
