"""What the stages of one Faust app share, built once by ``sluice.app.create_app`` and passed to
the ``register(app, wiring)`` of every stage: the deployment's topics as Faust topics, the
dead-letter sender, the retries that end on the dead-letter topic, the run plans, and the
publishers that more than one stage (and the recovery) use.

Every agent reads its stream with ``noack()`` and acknowledges each event with
:func:`acknowledged`; every publisher awaits its delivery (see ``sluice.streams.publish``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, ValidationError

from sluice.agents.deps import Deps
from sluice.agents.plans import PlanCache
from sluice.config import KafkaSettings
from sluice.retries import Policy, retrying
from sluice.schemas.events import DeadLetter, ImportRequested, ItemPage, TriggerRequested
from sluice.schemas.firehose import BackfillRequested
from sluice.schemas.runs import Run
from sluice.streams.topics import Topics

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

Flush = Callable[[], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)


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


@dataclass(frozen=True)
class StageTopics:
    """The deployment's topics as one app's Faust topics: raw bytes for keys and values."""

    requests: faust.TopicT
    batches: faust.TopicT
    lifecycle: faust.TopicT
    triggers: faust.TopicT
    items: faust.TopicT
    firehose: faust.TopicT
    backfill: faust.TopicT
    deadletter: faust.TopicT

    @classmethod
    def of(cls, app: faust.App, kafka: KafkaSettings) -> StageTopics:
        names = Topics.of(kafka)

        def topic(name: str, partitions: int = kafka.partitions) -> faust.TopicT:
            return app.topic(
                name,
                value_type=bytes,
                key_type=bytes,
                value_serializer="raw",
                key_serializer="raw",
                partitions=partitions,
            )

        return cls(
            requests=topic(names.requests),
            batches=topic(names.batches),
            lifecycle=topic(names.lifecycle),
            triggers=topic(names.triggers),
            items=topic(names.items),
            firehose=topic(names.firehose),
            backfill=topic(names.backfill),
            deadletter=topic(names.deadletter, 1),
        )


@dataclass
class Wiring:
    """What the stages of one app share (see the module's docstring)."""

    deps: Deps
    group: str
    """The app's consumer group (``SLUICE_GROUP_ID`` unless the caller named another)."""
    topics: StageTopics
    flush: Flush
    """Flush the app's producer."""
    plans: PlanCache = field(default_factory=PlanCache)
    consumers: list[tuple[str, AIOKafkaConsumer]] = field(default_factory=list)
    """The consumers outside Faust that are running (the firehose applier's), with their
    groups: the lag gauges read them."""

    @classmethod
    def of(cls, app: faust.App, deps: Deps, group: str) -> Wiring:
        kafka = deps.settings.kafka
        names = Topics.of(kafka)
        deps.metrics.dead_letters_from(
            names.requests, names.batches, names.triggers, names.items, names.lifecycle,
            names.backfill, names.firehose,
        )  # fmt: skip

        async def flush() -> None:
            await app.producer.flush()

        return cls(deps=deps, group=group, topics=StageTopics.of(app, kafka), flush=flush)

    async def record_dead_letter(self, record: Any, reason: str) -> None:
        """``record``: a Kafka message (aiokafka's, or a Faust event's ``message``)."""
        topic_name, partition, offset = record.topic, record.partition, record.offset
        letter = DeadLetter.of(topic_name, partition, offset, reason, record.value or b"")
        log.error("dead letter from %s[%d]@%d: %s", topic_name, partition, offset, reason)
        # Confirmed: the caller moves on (commits the offset) once the letter is on the broker.
        await (
            await self.topics.deadletter.send(
                key=record.key, value=letter.model_dump_json().encode()
            )
        )
        self.deps.metrics.dead_letter(topic_name)

    async def dead_letter(self, event: Any, reason: str) -> None:
        """Set a Faust event aside on the dead-letter topic, with the reason."""
        await self.record_dead_letter(event.message, reason)

    async def valid(self, event: Any, model: type[M], what: str) -> M | None:
        """The event's value as a ``model``; None once the event is on the dead-letter topic
        for not being ``what`` ("a valid trigger")."""
        try:
            return model.model_validate_json(event.value)
        except ValidationError as exc:
            await self.dead_letter(event, f"not {what}: {exc.errors()[:3]}")
            return None

    async def with_retries(self, what: str, stage: str, run_id: Any, event: Any, work: Any) -> bool:
        """Work that fails for a reason other than its input (database, broker or source
        trouble) is tried again: splitting, fetching and applying are idempotent. After the last
        try the run fails with the cause and the message goes to the dead-letter topic, to be
        replayed once the cause is fixed. Returns False then. ``stage`` labels the retries."""
        deps = self.deps
        attempts = deps.settings.pipeline.apply_attempts
        try:
            await retrying(
                f"{what} of run {run_id}",
                work,
                Policy(attempts=attempts),
                on_retry=deps.metrics.on_retry(stage),
            )
            return True
        except Exception as exc:
            log.exception("%s of run %s failed %d times", what, run_id, attempts)
            await self.dead_letter(event, f"{what} failed: {type(exc).__name__}: {exc}")
            try:
                await deps.runs.fail(
                    run_id,
                    f"{what} failed {attempts} times ({type(exc).__name__}: {exc}); "
                    "the message is on the dead-letter topic",
                )
            except Exception:
                log.exception("could not mark run %s failed", run_id)
            return False

    async def publish_request(self, request: ImportRequested) -> None:
        """Publish an import request; returns once it is on the broker."""
        delivery = await self.topics.requests.send(
            key=str(request.run_id).encode(), value=request.model_dump_json().encode()
        )
        await delivery  # the trigger is done only once its import request is on the broker

    async def publish_trigger(self, run: Run, kind: str, params: dict[str, Any]) -> None:
        """Publish the trigger of a pull source's run; returns once it is on the broker."""
        trigger = TriggerRequested.for_run(run, kind, params)
        await (
            await self.topics.triggers.send(
                key=str(run.id).encode(), value=trigger.model_dump_json().encode()
            )
        )

    async def send_item_page(self, run_id: Any, seq: int) -> Awaitable[Any]:
        """Send batch ``seq`` of an API run's items (its delivery, to await). Item batches go
        to the items topic's partitions in turn (batch number modulo partitions), not by the
        hash of a key, so they spread evenly over the workers."""
        page = ItemPage(run_id=run_id, seq=seq)
        delivery: Awaitable[Any] = await self.topics.items.send(
            key=f"{run_id}:{seq}".encode(),
            value=page.model_dump_json().encode(),
            partition=abs(seq) % self.deps.settings.kafka.partitions,
        )
        return delivery

    async def publish_backfill(self, did: str, collections: list[str]) -> None:
        """Publish a backfill request of a repository; returns once it is on the broker."""
        request = BackfillRequested(did=did, collections=collections)
        await (
            await self.topics.backfill.send(
                key=did.encode(), value=request.model_dump_json().encode()
            )
        )
