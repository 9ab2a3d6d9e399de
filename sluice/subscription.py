"""Lifecycle events for downstream consumers: an async iterator over the lifecycle topic.

Delivery is at least once: after a crash or a rebalance an event can come again. Every event
has an ``event_id``; a consumer that must not act twice keys on it.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import ValidationError

from sluice.config import Settings
from sluice.errors import TransientError
from sluice.schemas.events import LifecycleEvent
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.topics import Topics

log = logging.getLogger(__name__)

POLL_MS = 1000


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
        consumer = clients.consumer(
            kafka,
            self.topic,
            group_id=self.group_id,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
        )
        self._consumer = consumer
        try:
            # start() returns with partitions assigned; position() resolves "latest" now rather
            # than at the first fetch, so nothing published after this returns is skipped.
            await consumer.start()
            positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
            await self._commit(start_positions=True)
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
            if not self._buffer:
                await self._commit(start_positions=True)
                batch = await consumer.getmany(timeout_ms=POLL_MS)
                for records in batch.values():
                    self._buffer.extend(records)
                continue
            record = self._buffer.popleft()
            event = self._decode(record)
            if event is not None and self._wanted(event):
                self._last = record
                return event
            self._done(record)

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
