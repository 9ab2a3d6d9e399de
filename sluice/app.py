"""The Faust application: topics, agents and the outbox relay, bound to one ``Deps``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import faust
import orjson
from pydantic import ValidationError

from sluice.agents.deps import Deps
from sluice.agents.fetch.detail import fetch_page
from sluice.agents.fetch.discover import discover
from sluice.agents.fetch.trigger import adopt_trigger, after_import, handle_trigger
from sluice.agents.firehose.apply import apply_firehose, parse_events
from sluice.agents.firehose.project import projections_for
from sluice.agents.lanes import Lanes
from sluice.agents.lifecycle import relay_outbox
from sluice.agents.recover import Recovery
from sluice.agents.retry import retrying
from sluice.agents.schedule import fire_due
from sluice.agents.split.split import split_file
from sluice.agents.upsert import PlanCache, upsert_batch
from sluice.agents.webhooks import HookSet, WebhookDispatcher
from sluice.errors import TerminalError
from sluice.schemas.events import (
    BatchOutcome,
    DeadLetter,
    ImportRequested,
    ItemPage,
    LifecycleEvent,
    TriggerRequested,
)
from sluice.schemas.firehose import BackfillRequested
from sluice.schemas.runs import Run
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.kafka import faust_broker_options
from sluice.streams.lag import aiokafka_lag, faust_lag
from sluice.streams.topics import Topic, Topics, outbox_topic

log = logging.getLogger(__name__)


def start_message(value: bytes | None) -> TriggerRequested | ValidationError | None:
    """A message on the requests topic that asks to start an import of a pull source (the
    shape of a run-less trigger: no run id, no stored file), what is wrong with one that tries,
    or None for anything else (a broken ImportRequested: its own errors say why)."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "file" in data or data.get("run_id") is not None:
        return None
    try:
        return TriggerRequested.model_validate(data)
    except ValidationError as exc:
        return exc


async def acknowledged(event: Any, work: Callable[[Any], Awaitable[None]]) -> None:
    """``work(event)``, then acknowledge the event (its offset may be committed) however the
    work ended, unless it was cancelled: a worker that stops cancels its work in flight rather
    than waiting for it (see sluice.worker.Worker), and an event whose work was cancelled must
    be delivered again. The agents read their streams with ``noack()`` and acknowledge here;
    Faust's own acknowledgement would also cover a cancelled event."""
    try:
        await work(event)
    except asyncio.CancelledError:
        raise
    except BaseException:
        event.ack()
        raise
    event.ack()


def create_app(
    deps: Deps, *, datadir: Path, app_id: str | None = None, hooks: HookSet | None = None
) -> faust.App:
    """``datadir``: Faust's data directory (Faust creates ``v1/tables`` in it; with tables in
    memory nothing else), which the caller makes and removes; ``app_id``: the consumer group
    (default ``SLUICE_GROUP_ID``); ``hooks``: the webhooks, their secrets resolved by the entry
    point; none by default."""
    kafka = deps.settings.kafka
    app_id = app_id or kafka.group_id
    names = Topics.of(kafka)
    app = faust.App(
        app_id,
        **faust_broker_options(kafka),
        store="memory://",
        datadir=datadir,
        autodiscover=False,
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        web_enabled=False,
        # Back pressure: a batch message is up to ~1 MB, so a deep prefetch buffer is memory
        # that grows with the file. Kafka holds the backlog, not the worker.
        stream_buffer_maxsize=32,
        broker_max_poll_records=16,
    )

    def topic(name: str, partitions: int) -> Any:
        return app.topic(
            name,
            value_type=bytes,
            key_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
            partitions=partitions,
        )

    requests = topic(names.requests, kafka.partitions)
    batches = topic(names.batches, kafka.partitions)
    dead = topic(names.deadletter, 1)
    out_topics = {
        Topic.LIFECYCLE: topic(names.lifecycle, kafka.partitions),
        Topic.DEADLETTER: dead,
    }
    plans = PlanCache()
    projections = projections_for(deps.registry.all(), deps.applier)
    deps.metrics.dead_letters_from(
        names.requests, names.batches, names.triggers, names.items, names.lifecycle,
        names.backfill, names.firehose,
    )  # fmt: skip

    async def record_dead_letter(record: Any, reason: str) -> None:
        """``record``: a Kafka message (aiokafka's, or a Faust event's ``message``)."""
        topic_name, partition, offset = record.topic, record.partition, record.offset
        letter = DeadLetter.of(topic_name, partition, offset, reason, record.value or b"")
        log.error("dead letter from %s[%d]@%d: %s", topic_name, partition, offset, reason)
        # Confirmed: the caller moves on (commits the offset) once the letter is on the broker.
        await (await dead.send(key=record.key, value=letter.model_dump_json().encode()))
        deps.metrics.dead_letter(topic_name)

    async def dead_letter(event: Any, reason: str) -> None:
        await record_dead_letter(event.message, reason)

    async def flush() -> None:
        await app.producer.flush()

    async def with_retries(what: str, stage: str, run_id: Any, event: Any, work: Any) -> bool:
        """Work that fails for a reason other than its input (database, broker or source
        trouble) is tried again: splitting, fetching and applying are idempotent. After the last
        try the run fails with the cause and the message goes to the dead-letter topic, to be
        replayed once the cause is fixed. Returns False then. ``stage`` labels the retries."""
        attempts = deps.settings.pipeline.apply_attempts
        try:
            await retrying(
                f"{what} of run {run_id}", attempts, work, on_retry=deps.metrics.on_retry(stage)
            )
            return True
        except Exception as exc:
            log.exception("%s of run %s failed %d times", what, run_id, attempts)
            await dead_letter(event, f"{what} failed: {type(exc).__name__}: {exc}")
            try:
                await deps.runs.fail(
                    run_id,
                    f"{what} failed {attempts} times ({type(exc).__name__}: {exc}); "
                    "the message is on the dead-letter topic",
                )
            except Exception:
                log.exception("could not mark run %s failed", run_id)
            return False

    async def split_with_retry(request: ImportRequested, send: Any, event: Any) -> None:
        await with_retries(
            "split", "split", request.run_id, event, lambda: split_file(deps, request, send, flush)
        )

    triggers = topic(names.triggers, kafka.partitions)

    async def split_event(event: Any) -> None:
        try:
            request = ImportRequested.model_validate_json(event.value)
        except ValidationError as exc:
            start = start_message(event.value)
            if isinstance(start, TriggerRequested):
                # A producer outside Sluice asked for an import of a pull source: the
                # fetch agent creates its run (idempotent by request_id).
                key = (start.request_id or start.importer).encode()
                await (await triggers.send(key=key, value=event.value))
            elif start is not None:
                await dead_letter(
                    event, f"not a valid start message (a trigger): {start.errors()[:3]}"
                )
            else:
                await dead_letter(event, f"not a valid import request: {exc.errors()[:3]}")
            return

        async def send(partition: int, key: bytes, value: bytes) -> Awaitable[Any]:
            delivery: Awaitable[Any] = await batches.send(key=key, value=value, partition=partition)
            return delivery

        await split_with_retry(request, send, event)

    @app.agent(requests, name="split")
    async def split_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, split_event)

    async def apply_batch(event: Any) -> None:
        async def to_dead(reason: str) -> None:
            await dead_letter(event, reason)

        await upsert_batch(deps, event.key, event.value, plans, to_dead)
        # Only now may the offset be committed; Faust commits a partition up to its first
        # offset not yet acknowledged, so batches finishing out of order lose nothing.
        event.ack()

    @app.agent(batches, name="upsert")
    async def upsert_agent(stream: Any) -> None:
        # One lane per partition: in order within a partition (its keys, in file order), side
        # by side across partitions (see agents.lanes).
        lanes: Lanes[Any] = Lanes(apply_batch, depth=2, on_retry=deps.metrics.on_retry("lane"))
        try:
            async for event in stream.noack().events():
                await lanes.put(event.message.partition, event)
        finally:
            await lanes.close()

    item_pages = topic(names.items, kafka.partitions)

    async def publish_request(request: ImportRequested) -> None:
        delivery = await requests.send(
            key=str(request.run_id).encode(), value=request.model_dump_json().encode()
        )
        await delivery  # the trigger is done only once its import request is on the broker

    async def send_page(run_id: Any, seq: int) -> Awaitable[Any]:
        page = ItemPage(run_id=run_id, seq=seq)
        delivery: Awaitable[Any] = await item_pages.send(
            key=f"{run_id}:{seq}".encode(), value=page.model_dump_json().encode()
        )
        return delivery

    async def fetch_event(event: Any) -> None:
        try:
            trigger = TriggerRequested.model_validate_json(event.value)
        except ValidationError as exc:
            await dead_letter(event, f"not a valid trigger: {exc.errors()[:3]}")
            return
        if trigger.run_id is None:
            try:
                trigger = await retrying(
                    "a run for a produced trigger",
                    deps.settings.pipeline.apply_attempts,
                    partial(adopt_trigger, deps, trigger),
                    on_retry=deps.metrics.on_retry("trigger"),
                )
            except TerminalError as exc:
                await dead_letter(event, f"cannot start a run: {exc}")
                return

        async def run_discovery(run: Run, trigger: TriggerRequested) -> None:
            await discover(deps, run, send_page, flush)

        await with_retries(
            "fetch",
            "fetch",
            trigger.run_id,
            event,
            lambda: handle_trigger(deps, trigger, publish_request, run_discovery),
        )

    @app.agent(triggers, name="fetch")
    async def fetch_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, fetch_event)

    async def detail_event(event: Any) -> None:
        try:
            page = ItemPage.model_validate_json(event.value)
        except ValidationError as exc:
            await dead_letter(event, f"not a valid item page: {exc.errors()[:3]}")
            return
        done = await with_retries(
            "item details", "detail", page.run_id, event, lambda: fetch_page(deps, page, plans)
        )
        if not done:
            deps.metrics.batch_done(BatchOutcome.DEAD)

    @app.agent(item_pages, name="detail")
    async def detail_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, detail_event)

    async def publish_trigger(run: Run, kind: str, params: dict[str, Any]) -> None:
        trigger = TriggerRequested.for_run(run, kind, params)
        await (
            await triggers.send(key=str(run.id).encode(), value=trigger.model_dump_json().encode())
        )

    @app.timer(deps.settings.pipeline.schedule_interval)  # type: ignore[untyped-decorator]
    async def schedule_tick() -> None:
        try:
            await fire_due(deps, publish_trigger, grace=deps.settings.pipeline.schedule_grace)
        except Exception:
            log.exception("schedule tick failed; will try again")

    firehose = topic(names.firehose, kafka.partitions)
    backfills = topic(names.backfill, kafka.partitions)

    # The firehose applier's consumer, for the lag gauges (measure_lag).
    firehose_consumers: list[Any] = []

    @app.task  # type: ignore[untyped-decorator]
    async def firehose_applier() -> None:
        """Apply the firehose topic in batches of up to 2,000 events. A plain consumer group
        rather than a Faust agent: Faust's per-message machinery cost five times what the
        apply does, and its long fetch wait held small batches back (bench/firehose.py).
        Offsets are committed after the batch's transaction; a replay changes nothing."""
        attempts = deps.settings.pipeline.apply_attempts
        consumer = clients.consumer(
            kafka,
            names.firehose,
            group_id=f"{app_id}-firehose",
            max_poll_records=2000,
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        firehose_consumers.append(consumer)
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
                    await record_dead_letter(records[index], reason)
                try:
                    await retrying(
                        "firehose batch",
                        attempts,
                        partial(apply_firehose, deps, projections, events),
                        on_retry=deps.metrics.on_retry("firehose"),
                    )
                except Exception as exc:
                    log.exception("firehose batch of %d failed %d times", len(events), attempts)
                    for record in records:
                        await record_dead_letter(
                            record, f"could not apply: {type(exc).__name__}: {exc}"
                        )
                await flush()  # the dead letters are out before the offsets move on
                await consumer.commit()
        finally:
            firehose_consumers.remove(consumer)
            await consumer.stop()

    @app.agent(backfills, name="backfill")
    async def backfill_agent(stream: Any) -> None:
        from sluice.agents.firehose.backfill import Backfiller

        backfiller: Backfiller | None = None

        async def backfill_event(event: Any) -> None:
            nonlocal backfiller
            try:
                request = BackfillRequested.model_validate_json(event.value)
            except ValidationError as exc:
                await dead_letter(event, f"not a valid backfill request: {exc.errors()[:3]}")
                return
            if backfiller is None:
                backfiller = Backfiller(
                    deps.pool, deps.settings.firehose, deps.settings.url, projections
                )
            try:
                await retrying(
                    f"backfill of {request.did}",
                    deps.settings.pipeline.apply_attempts,
                    partial(backfiller.backfill, request),
                    on_retry=deps.metrics.on_retry("backfill"),
                )
            except Exception as exc:
                log.exception("backfill of %s failed", request.did)
                await dead_letter(event, f"backfill failed: {type(exc).__name__}: {exc}")

        async for event in stream.noack().events():
            await acknowledged(event, backfill_event)

    if deps.settings.firehose.enabled:

        @app.task  # type: ignore[untyped-decorator]
        async def firehose_consumer() -> None:
            from sluice.agents.firehose.leader import run_leader_consumer

            async def publish(did: str, raw: bytes) -> None:
                await firehose.send(key=did.encode(), value=raw)

            deps.metrics.dead_letters_from("jetstream")

            async def to_dead_letter(raw: bytes, reason: str) -> None:
                letter = DeadLetter.of("jetstream", -1, -1, reason, raw)
                await (await dead.send(key=None, value=letter.model_dump_json().encode()))
                deps.metrics.dead_letter("jetstream")
                deps.metrics.firehose_malformed()

            await run_leader_consumer(deps, publish, flush, to_dead_letter)

    @app.timer(deps.settings.pipeline.relay_interval)  # type: ignore[untyped-decorator]
    async def relay() -> None:
        async def send(topic_name: str, key: str | None, value: bytes) -> Any:
            out = out_topics[outbox_topic(topic_name)]
            return await out.send(key=key.encode() if key else None, value=value)

        try:
            await relay_outbox(deps, send, flush)
        except Exception:
            log.exception("outbox relay failed; will retry")
            # A broker that restarted lost its topics: the next relay needs them back.
            try:
                await ensure_topics(kafka)
            except Exception:
                log.warning("could not check the topics; will retry")

    webhooks = WebhookDispatcher(deps, hooks or HookSet())

    async def react_to(event: Any) -> None:
        try:
            LifecycleEvent.model_validate_json(event.value or b"")
        except ValidationError as exc:
            await dead_letter(event, f"not a lifecycle event: {exc.errors()[:3]}")
            return
        for react in (webhooks.on_event, partial(after_import, deps)):
            try:
                await react(event.value)
            except Exception:
                # The delivery log and the next event go on; a webhook retried later.
                log.exception("reacting to a lifecycle event failed")

    @app.agent(out_topics[Topic.LIFECYCLE], name="webhooks")
    async def webhooks_agent(stream: Any) -> None:
        """Reactions to lifecycle events: webhooks, and moving pulled files after import."""
        async for event in stream.noack().events():
            await acknowledged(event, react_to)

    @app.timer(deps.settings.webhooks.retry_interval)  # type: ignore[untyped-decorator]
    async def retry_webhooks() -> None:
        await webhooks.retry_due()

    async def publish_backfill(did: str, collections: list[str]) -> None:
        request = BackfillRequested(did=did, collections=collections)
        await (await backfills.send(key=did.encode(), value=request.model_dump_json().encode()))

    recovery = Recovery(
        deps,
        publish_request=publish_request,
        publish_trigger=publish_trigger,
        publish_backfill=publish_backfill,
        flush=flush,
    )

    @app.timer(deps.settings.pipeline.recovery_interval)  # type: ignore[untyped-decorator]
    async def recover() -> None:
        """One worker at a time resumes stalled runs from what PostgreSQL holds."""
        try:
            await recovery.resume_stalled()
        except Exception:
            log.exception("recovery of stalled runs failed; will try again")

    @app.timer(deps.settings.pipeline.topic_check_interval)  # type: ignore[untyped-decorator]
    async def watch_topics() -> None:
        """A broker that lost its topics: recreate them and resume the runs in flight."""
        try:
            await recovery.check_topics()
        except Exception as exc:
            log.warning(
                "could not check the topics (%s: %s); will try again", type(exc).__name__, exc
            )

    @app.timer(deps.settings.metrics.lag_interval)  # type: ignore[untyped-decorator]
    async def measure_lag() -> None:
        """The consumer lag gauges, from what the consumers know already (the end offsets of
        their last fetches, the offsets committed): no request to the broker."""
        try:
            deps.metrics.set_lag(app_id, await faust_lag(app.consumer))
            for consumer in firehose_consumers:
                deps.metrics.set_lag(f"{app_id}-firehose", await aiokafka_lag(consumer))
        except Exception as exc:
            log.debug("consumer lag not measured: %s: %s", type(exc).__name__, exc)

    @app.timer(deps.settings.pipeline.prune_interval)  # type: ignore[untyped-decorator]
    async def prune() -> None:
        """Retention: stored files and finished runs older than configured go. Deleting is
        idempotent, so workers pruning at the same time do no harm."""
        from sluice.storage.filestore import prune_files

        pipeline = deps.settings.pipeline
        try:
            files, size = await prune_files(deps.files, pipeline.file_retention_hours)
            runs, rows = await deps.runs.prune(pipeline.run_retention_days)
            if files or runs:
                log.info(
                    "pruned %d files (%d bytes), %d runs, %d rejected rows",
                    files,
                    size,
                    runs,
                    rows,
                )
        except Exception:
            log.exception("pruning failed; will try again")

    return app
