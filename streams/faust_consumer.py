"""Faust's Kafka transport with the fetch wait of ``SLUICE_KAFKA_FETCH_MAX_WAIT_MS``.

Faust builds its consumer with a fetch wait of 1.5 s and no setting to change it. A fetch
that finds nothing waits at the broker that long for records; Kafka answers it as soon as
records arrive, but the embedded broker (Tansu 0.6) answers only when the wait is over, so
every stage a run goes through (the request, each batch when the appliers have caught up)
waited up to 1.5 s for it (measured: a consumer in a group on 4 partitions got each record
483 ms after it was produced; ten two-row imports waited 307 ms on average from queued to
started). A shorter wait costs an idle worker more empty fetches (10 a second at 100 ms).
"""

from __future__ import annotations

from typing import Any, cast

import aiokafka
from faust.transport.drivers import aiokafka as faust_kafka


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(
        self, transport: faust_kafka.Transport
    ) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # What AIOKafkaConsumer.__init__ keeps of its fetch_max_wait_ms, which start() gives
        # its fetcher: Faust passes 1500 and nothing else reaches it.
        consumer._fetch_max_wait_ms = cast(Transport, transport).fetch_max_wait_ms
        return consumer


class _Consumer(faust_kafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_kafka.Transport):
    """``App.transport``: Faust's own, its consumer fetching with ``fetch_max_wait_ms``."""

    Consumer = _Consumer

    def __init__(self, app: Any, fetch_max_wait_ms: int) -> None:
        super().__init__(app.conf.broker_consumer, app)
        self.fetch_max_wait_ms = fetch_max_wait_ms
