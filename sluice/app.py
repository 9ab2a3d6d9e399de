"""The Faust application: the stages of ``sluice.agents`` registered on one app, bound to one
``Deps``. Each stage registers its own agents, tasks and timers; what they share is one
``Wiring`` (the topics, the dead-letter sender, the retries, the run plans, the publishers)."""

from __future__ import annotations

from pathlib import Path

import faust

from sluice.agents import lag, lifecycle, prune, recover, schedule, upsert, webhooks
from sluice.agents.deps import Deps
from sluice.agents.fetch import agent as fetch
from sluice.agents.firehose import agent as firehose
from sluice.agents.split import agent as split
from sluice.agents.webhooks import HookSet
from sluice.agents.wiring import Wiring
from sluice.streams import faust_consumer
from sluice.streams.kafka import faust_broker_options


def create_app(
    deps: Deps, *, datadir: Path, app_id: str | None = None, hooks: HookSet | None = None
) -> faust.App:
    """``datadir``: Faust's data directory (Faust creates ``v1/tables`` in it; with tables in
    memory nothing else), which the caller makes and removes; ``app_id``: the consumer group
    (default ``SLUICE_GROUP_ID``); ``hooks``: the webhooks, their secrets resolved by the entry
    point; none by default."""
    kafka = deps.settings.kafka
    app_id = app_id or kafka.group_id
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
    app.transport = faust_consumer.Transport(app, kafka.fetch_max_wait_ms)
    wiring = Wiring.of(app, deps, app_id)
    split.register(app, wiring)
    upsert.register(app, wiring)
    fetch.register(app, wiring)
    schedule.register(app, wiring)
    firehose.register(app, wiring)
    lifecycle.register(app, wiring)
    webhooks.register(app, wiring, hooks or HookSet())
    recover.register(app, wiring)
    lag.register(app, wiring)
    prune.register(app, wiring)
    return app
