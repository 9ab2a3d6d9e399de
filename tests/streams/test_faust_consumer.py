"""The workers' Faust consumer fetches with SLUICE_KAFKA_FETCH_MAX_WAIT_MS, not Faust's fixed
1.5 s: a broker that answers a waiting fetch only when its wait is over (the embedded one)
would hold every stage of a run that long (sluice/streams/faust_consumer.py)."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest

from sluice.agents.deps import build_deps
from sluice.app import create_app
from sluice.config import KafkaSettings
from sluice.importers.registry import build_registry
from sluice.streams.faust_consumer import Transport
from sluice.streams.kafka import faust_broker_options
from tests.conftest import Stack

pytestmark = pytest.mark.stack


def _app(kafka: KafkaSettings, datadir: Path) -> faust.App:
    app = faust.App(
        "fetch-wait-test", **faust_broker_options(kafka), datadir=datadir, autodiscover=False
    )
    app.transport = Transport(app, kafka.fetch_max_wait_ms)
    return app


@pytest.mark.parametrize("wait", [100, 250])
async def test_the_workers_consumer_fetches_with_the_configured_wait(
    stack: Stack, tmp_path: Path, wait: int
) -> None:
    kafka = KafkaSettings(bootstrap=stack.broker.bootstrap, fetch_max_wait_ms=wait)
    app = _app(kafka, tmp_path)
    thread = app.consumer._thread
    consumer = thread._create_worker_consumer(app.transport)
    await consumer.start()
    try:
        # What every FetchRequest of this consumer asks the broker to wait at most.
        assert consumer._fetcher._fetch_max_wait_ms == wait
    finally:
        await consumer.stop()


def test_the_default_wait_is_short_and_faust_s_own_is_not_used() -> None:
    assert KafkaSettings().fetch_max_wait_ms == 100
    with pytest.raises(ValueError):
        KafkaSettings(fetch_max_wait_ms=0)


async def test_the_worker_app_is_built_with_it(stack: Stack, tmp_path: Path) -> None:
    settings = stack.settings()
    deps = await build_deps(settings, registry=build_registry(settings.pipeline.importers))
    try:
        app = create_app(deps, datadir=tmp_path)
        assert isinstance(app.transport, Transport)
        assert app.transport.fetch_max_wait_ms == settings.kafka.fetch_max_wait_ms
        # The consumer thread that builds the aiokafka consumer is the one that sets the wait.
        assert type(app.consumer._thread).__module__ == "sluice.streams.faust_consumer"
    finally:
        await deps.close()
