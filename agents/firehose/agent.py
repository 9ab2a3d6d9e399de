"""The firehose stages: the applier (the firehose topic applied in batches), the ``backfill``
agent (a repository's history from its PDS, for each request on the backfill topic) and, when
``SLUICE_FIREHOSE_ENABLED``, the in-worker Jetstream consumer that fills the firehose topic (run
by one worker at a time)."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from sluice.agents.firehose.apply import apply_firehose, parse_events
from sluice.agents.firehose.backfill import Backfiller
from sluice.agents.firehose.leader import run_leader_consumer
from sluice.agents.firehose.project import Projections, projections_for
from sluice.agents.wiring import Wiring, acknowledged
from sluice.retries import Policy, retrying
from sluice.schemas.events import DeadLetter
from sluice.schemas.firehose import BackfillRequested
from sluice.streams import kafka as clients
from sluice.streams.publish import KeyedBatches
from sluice.streams.topics import Topics, firehose_group

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)


def register(app: faust.App, wiring: Wiring) -> None:
    """The firehose applier, the ``backfill`` agent, and the Jetstream consumer if enabled."""
    deps = wiring.deps
    projections = projections_for(deps.registry.all(), deps.applier)

    @app.task  # type: ignore[untyped-decorator]
    async def firehose_applier() -> None:
        await apply_topic(wiring, projections)

    @app.agent(wiring.topics.backfill, name="backfill")
    async def backfill_agent(stream: Any) -> None:
        backfiller: Backfiller | None = None

        async def backfill_event(event: Any) -> None:
            nonlocal backfiller
            request = await wiring.valid(event, BackfillRequested, "a valid backfill request")
            if request is None:
                return
            if backfiller is None:
                backfiller = Backfiller(
                    deps.pool, deps.settings.firehose, deps.settings.url, projections
                )
            try:
                await retrying(
                    f"backfill of {request.did}",
                    partial(backfiller.backfill, request),
                    Policy(attempts=deps.settings.pipeline.apply_attempts),
                    on_retry=deps.metrics.on_retry("backfill"),
                )
            except Exception as exc:
                log.exception("backfill of %s failed", request.did)
                await wiring.dead_letter(event, f"backfill failed: {type(exc).__name__}: {exc}")

        async for event in stream.noack().events():
            await acknowledged(event, backfill_event)

    if deps.settings.firehose.enabled:

        @app.task  # type: ignore[untyped-decorator]
        async def firehose_consumer() -> None:
            await consume_jetstream(wiring)


async def apply_topic(wiring: Wiring, projections: Projections) -> None:
    """Apply the firehose topic in batches of up to 2,000 events. A plain consumer group
    rather than a Faust agent: Faust's per-message machinery cost five times what the
    apply does, and its long fetch wait held small batches back (bench/firehose.py).
    Offsets are committed after the batch's transaction; a replay changes nothing."""
    deps = wiring.deps
    kafka = deps.settings.kafka
    attempts = deps.settings.pipeline.apply_attempts
    group = firehose_group(wiring.group)
    consumer = clients.consumer(
        kafka,
        Topics.of(kafka).firehose,
        group_id=group,
        max_poll_records=2000,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    wiring.consumers.append((group, consumer))
    try:
        while True:
            polled = await consumer.getmany(timeout_ms=1000, max_records=2000)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                continue
            events, bad = parse_events([r.value for r in records])
            if bad:
                deps.metrics.firehose_malformed(len(bad))
            for index, reason in bad:
                await wiring.record_dead_letter(records[index], reason)
            try:
                await retrying(
                    "firehose batch",
                    partial(apply_firehose, deps, projections, events),
                    Policy(attempts=attempts),
                    on_retry=deps.metrics.on_retry("firehose"),
                )
            except Exception as exc:
                log.exception("firehose batch of %d failed %d times", len(events), attempts)
                for record in records:
                    await wiring.record_dead_letter(
                        record, f"could not apply: {type(exc).__name__}: {exc}"
                    )
            await wiring.flush()  # the dead letters are out before the offsets move on
            await consumer.commit()
    finally:
        wiring.consumers.remove((group, consumer))
        await consumer.stop()


async def consume_jetstream(wiring: Wiring) -> None:
    """The Jetstream consumer, in the worker that holds the leader lock: its events go to the
    firehose topic keyed by DID, what does not validate to the dead-letter topic. The events
    go through a producer of their own that gathers them into batches (Faust's sends each
    alone), as ``sluice firehose`` does."""
    deps = wiring.deps
    kafka = deps.settings.kafka
    firehose = Topics.of(kafka).firehose
    producer = clients.event_producer(kafka)
    events = KeyedBatches(producer, firehose, linger=deps.settings.firehose.linger_ms / 1000)

    async def publish(did: str, raw: bytes) -> None:
        await events.send(did.encode(), raw)

    deps.metrics.dead_letters_from("jetstream")

    async def to_dead_letter(raw: bytes, reason: str) -> None:
        letter = DeadLetter.of("jetstream", -1, -1, reason, raw)
        deadletters = wiring.topics.deadletter
        await (await deadletters.send(key=None, value=letter.model_dump_json().encode()))
        deps.metrics.dead_letter("jetstream")
        deps.metrics.firehose_malformed()

    await producer.start()
    try:
        async with events:
            await run_leader_consumer(deps, publish, events.flush, to_dead_letter)
    finally:
        await producer.stop()
