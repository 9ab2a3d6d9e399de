"""Lifecycle events for downstream consumers: an async iterator over the lifecycle topic.

Delivery is at least once: after a crash or a rebalance an event can come again. Every event
has an ``event_id``; a consumer that must not act twice keys on it.

A broker can lose its topics (an in-memory broker restarted, a cluster rebuilt): the workers
recreate them and record the loss in PostgreSQL. A subscription that can reach the database
(``SLUICE_DATABASE_URL``) watches for that; after a loss it reads the new topic from its start
and takes from the outbox every event it may have missed (those written since it started and
relayed since it last had read everything), so a subscriber following a run still sees the
run's terminal event. Without the database it cannot fill such a gap.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import ValidationError

from sluice.config import Settings
from sluice.errors import DatabaseUnavailable, TransientError
from sluice.schemas.events import LifecycleEvent
from sluice.storage.db import connect
from sluice.storage.outbox import events_since, last_topic_loss
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.topics import Topics

log = logging.getLogger(__name__)

POLL_MS = 1000
LOSS_CHECK_SECONDS = 2.0
"""How often a subscription asks PostgreSQL whether the broker lost its topics."""
CLOCK_MARGIN = timedelta(seconds=5)
"""Slack between this machine's clock and the database's when reading the outbox back."""
SEEN = 20_000
"""Event ids remembered, so an event taken from the outbox and read again from the topic is
delivered once."""


def _names(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([str(value)] if isinstance(value, str) else (str(v) for v in value))


class Subscription(AsyncIterator[LifecycleEvent]):
    """Lifecycle events, filtered, in topic order per run.

    ``async with`` positions the subscription (partitions assigned, offsets resolved) before its
    body runs, so a run started inside the body is seen from its first event. Iterated without
    ``async with``, it starts on the first ``__anext__``; close it with ``aclose()``.

    With a ``group_id`` the position is committed as events are consumed: an event counts as
    handled when the next one is asked for, or when the ``async with`` body exits without an
    exception. A subscriber restarted with the same group id resumes after the last handled event.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str | None = None,
        importers: str | Iterable[str] | None = None,
        run_id: uuid.UUID | str | None = None,
        types: str | Iterable[str] | None = None,
        from_beginning: bool = False,
        topic: str | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or Topics.of(settings.kafka).lifecycle
        self.group_id = group_id
        self.importers = _names(importers)
        self.run_id = uuid.UUID(str(run_id)) if run_id is not None else None
        self.types = _names(types)
        self.from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None
        self._closed = False
        self._buffer: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._last: ConsumerRecord[bytes, bytes] | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        # Filling a gap after the broker lost its topics (see the module's docstring).
        self._started_at = datetime.now(UTC)
        self._caught_up: dict[TopicPartition, datetime] = {}
        self._db: asyncpg.Connection | None = None
        self._losses_seen: int | None = None
        self._next_check = 0.0
        self._replay: deque[LifecycleEvent] = deque()
        self._seen: OrderedDict[uuid.UUID, None] = OrderedDict()

    async def start(self) -> Subscription:
        """Join the group (when there is one) and resolve the starting offsets."""
        if self._closed:
            raise RuntimeError("this subscription is closed; call subscribe() again")
        if self._consumer is None:
            try:
                await self._connect()
            except KafkaError as exc:
                raise TransientError(
                    f"cannot subscribe to {self.topic} at {self.settings.kafka.bootstrap} "
                    f"({exc!r}); is the broker running? `sluice env` shows the settings"
                ) from exc
        return self

    async def _connect(self) -> None:
        kafka = self.settings.kafka
        await ensure_topics(kafka)
        # "earliest" for a position that is gone (a truncated or recreated topic, a group the
        # broker forgot): reading the new log from its start loses nothing. Where to start the
        # first time is decided below.
        if self.group_id is None:
            consumer = clients.consumer(kafka)
        else:
            consumer = clients.consumer(kafka, self.topic, group_id=self.group_id)
        self._consumer = consumer
        try:
            # With a group, start() returns with the partitions assigned. Without one, every
            # partition is assigned here; position() resolves the start now rather than at the
            # first fetch, so nothing published after this returns is skipped.
            await consumer.start()
            if self.group_id is None:
                await consumer.topics()  # the metadata partitions_for_topic reads
                partitions = sorted(consumer.partitions_for_topic(self.topic) or ())
                consumer.assign([TopicPartition(self.topic, p) for p in partitions])
            start_at_end = [
                tp
                for tp in consumer.assignment()
                if not self.from_beginning
                and (self.group_id is None or await consumer.committed(tp) is None)
            ]
            if start_at_end:
                await consumer.seek_to_end(*start_at_end)
            positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
            await self._commit(start_positions=True)
            await self._watch_losses()  # the losses so far: only later ones are gaps
        except BaseException:
            self._consumer = None
            await consumer.stop()
            raise
        log.debug(
            "subscribed to %s (group %s) at %s",
            self.topic,
            self.group_id,
            ", ".join(f"{tp.partition}:{offset}" for tp, offset in sorted(positions.items())),
        )

    async def aclose(self) -> None:
        """Commit what was handled (with a group id) and leave."""
        await self._close(handled=True)

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception in the body may come from handling the last event: deliver it again.
        await self._close(handled=exc is None)

    async def __anext__(self) -> LifecycleEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        consumer = self._consumer
        assert consumer is not None
        self._handled()
        while True:
            if self._replay:
                missed = self._replay.popleft()
                if self._fresh(missed):
                    return missed
                continue
            if not self._buffer:
                await self._watch_losses()
                if self._replay:
                    continue
                await self._commit(start_positions=True)
                batch = await consumer.getmany(timeout_ms=POLL_MS)
                for records in batch.values():
                    self._buffer.extend(records)
                await self._note_caught_up(consumer)
                continue
            record = self._buffer.popleft()
            event = self._decode(record)
            if event is not None and self._wanted(event) and self._fresh(event):
                self._last = record
                return event
            self._done(record)

    def _fresh(self, event: LifecycleEvent) -> bool:
        """Not delivered before by this subscription (the outbox and the topic can both hold
        it after a gap was filled)."""
        if event.event_id in self._seen:
            return False
        self._seen[event.event_id] = None
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        return True

    async def _note_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        """Remember when each partition was read to its end: what was relayed before then
        reached this subscriber."""
        now = datetime.now(UTC)
        pending = {r.partition for r in self._buffer}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None or tp.partition in pending:
                continue
            # Some brokers under-report the high watermark: at or past it counts as the end.
            if await consumer.position(tp) >= highwater:
                self._caught_up[tp] = now

    async def _watch_losses(self) -> None:
        """Every few seconds: did the broker lose its topics since the last look? Then read the
        new topic from its start and queue what the outbox holds that may have been missed."""
        url = self.settings.database_url
        if not url or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + LOSS_CHECK_SECONDS
        try:
            if self._db is None or self._db.is_closed():
                self._db = await connect(url, schemas=self.settings.database.schemas)
            latest = await last_topic_loss(self._db)
            if self._losses_seen is None or latest <= self._losses_seen:
                self._losses_seen = latest
                return
            await self._fill_gap(self._db)
            self._losses_seen = latest
        except (OSError, DatabaseUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot check for lost topics in the database (%s); will try again", exc)

    async def _fill_gap(self, db: asyncpg.Connection) -> None:
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        caught_up = [self._caught_up.get(tp, self._started_at) for tp in assigned]
        relayed = min(caught_up, default=self._started_at) - CLOCK_MARGIN
        created = self._started_at - CLOCK_MARGIN if not self.from_beginning else datetime.min
        missed = await events_since(
            db,
            created=created.replace(tzinfo=UTC) if created.tzinfo is None else created,
            relayed=relayed,
            run_id=self.run_id,
            importers=self.importers,
            types=self.types,
        )
        self._replay.extend(LifecycleEvent.model_validate(m) for m in missed)
        # The positions belong to the old log: start the new one from its beginning.
        self._buffer.clear()
        self._last = None
        self._pending.clear()
        self._committed.clear()
        if assigned:
            await consumer.seek_to_beginning(*assigned)
        log.warning(
            "the broker lost %s; reading it again from its start, with %d events from the outbox",
            self.topic,
            len(missed),
        )

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> LifecycleEvent | None:
        try:
            return LifecycleEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            log.warning(
                "skipped a message that is not a lifecycle event (%s partition %d offset %d): %s",
                record.topic,
                record.partition,
                record.offset,
                exc.errors(include_url=False)[:3],
            )
            return None

    def _wanted(self, event: LifecycleEvent) -> bool:
        return (
            (self.run_id is None or event.run_id == self.run_id)
            and (self.importers is None or event.importer in self.importers)
            and (self.types is None or event.type in self.types)
        )

    def _done(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self._pending[TopicPartition(record.topic, record.partition)] = record.offset + 1

    def _handled(self) -> None:
        if self._last is not None:
            self._done(self._last)
            self._last = None

    async def _commit(self, *, start_positions: bool = False) -> None:
        consumer = self._consumer
        if self.group_id is None or consumer is None:
            return
        assigned = consumer.assignment()
        if start_positions:
            # A partition the group has no offset for would start at "latest" after a restart and
            # skip what was published meanwhile: commit where this subscriber starts. Only with
            # nothing buffered, else the position is past records not handled yet.
            for tp in assigned - self._pending.keys():
                self._pending[tp] = await consumer.position(tp)
        due = {
            tp: offset
            for tp, offset in self._pending.items()
            if tp in assigned and self._committed.get(tp) != offset
        }
        if not due:
            return
        try:
            await consumer.commit(due)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance moved the partition: its new owner reads these events again.
            log.warning(
                "could not commit %s offsets (group %s): %s", self.topic, self.group_id, exc
            )
            return
        self._committed.update(due)

    async def _close(self, *, handled: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._consumer is None:
            return
        try:
            if handled:
                self._handled()
            await self._commit()
        except KafkaError as exc:
            log.warning("could not commit %s offsets on close: %s", self.topic, exc)
        finally:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()
