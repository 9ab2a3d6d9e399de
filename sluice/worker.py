"""``sluice worker``: one Faust worker process (split, upsert, outbox relay, webhooks), with its
Prometheus metrics on SLUICE_METRICS_HOST:SLUICE_METRICS_PORT."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

import faust

from sluice.agents.deps import Deps, Importers, LazyObjects, build_deps
from sluice.agents.webhooks import resolve_hooks
from sluice.app import create_app
from sluice.config import Settings
from sluice.errors import InvalidConfig, SluiceError
from sluice.importers.registry import build_registry
from sluice.metrics import WorkerMetrics, serve
from sluice.storage.db import connect, migrate
from sluice.storage.tables import ensure_table
from sluice.streams.admin import ensure_topics
from sluice.streams.kafka import check_connection

log = logging.getLogger(__name__)


async def prepare(settings: Settings, registry: Importers) -> None:
    """What must exist before any agent runs: the broker's topics, the bucket of the object
    store, Sluice's tables and the importers' tables."""
    from sluice.agents.split.plan import plan_for

    await check_connection(settings.kafka)
    await ensure_topics(settings.kafka)
    if settings.files.uses_s3:
        # A missing bucket or refused keys stop the worker here, not the first upload.
        objects = LazyObjects(settings.files)
        try:
            await (await objects()).check_bucket(settings.files.bucket)
        finally:
            await objects.close()
    schemas = settings.database.schemas
    conn = await connect(settings.database_url, schemas=schemas)
    try:
        await migrate(conn, schemas)
        for importer in registry.all():
            await ensure_table(conn, plan_for(importer))
    finally:
        await conn.close()


class Worker(faust.Worker):
    """A Faust worker that stops promptly.

    Faust waits, when it stops, until every event being worked on is acknowledged. Work that is
    waiting for a database that is down (retries riding out an outage, a connection attempt)
    would hold the worker for minutes, so on shutdown the work in flight is cancelled instead:
    the agents acknowledge an event only once its work is done, so what was cancelled is
    delivered again (to this worker after its restart, or to another one), and every write is
    idempotent. Rebalances still wait for the work in flight (partitions must not move under
    a batch being applied). Once the app has stopped, the runtime's pool is closed.
    """

    deps: Deps | None = None

    async def on_stop(self) -> None:
        # Runs before the app (a child of the worker) stops; rebalances read the setting at
        # their own time and are over by now.
        self.app.conf.stream_wait_empty = False
        await super().on_stop()

    async def on_shutdown(self) -> None:
        if self.deps is not None:
            await self.deps.close()
        await super().on_shutdown()


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Pull sources and hooks name the variables holding their secrets; this entry point is
    # where they are read.
    secrets = dict(os.environ)
    registry = build_registry(settings.pipeline.importers)
    metrics = WorkerMetrics()
    try:
        hooks = resolve_hooks(settings.webhooks, registry.all(), secrets)
        # First, so that a port taken by another process stops the worker before it joins.
        server = serve(metrics.registry, settings.metrics)
    except InvalidConfig as exc:
        raise SystemExit(f"error: {exc}") from None
    if server is not None:
        # Faust sets up logging only when it starts: this line goes straight to the log.
        where = f"{settings.metrics.host}:{settings.metrics.port}"
        print(f"metrics on http://{where}/metrics", file=sys.stderr, flush=True)
    try:
        loop.run_until_complete(prepare(settings, registry))
        deps = loop.run_until_complete(
            build_deps(settings, registry=registry, secrets=secrets, metrics=metrics)
        )
    except SluiceError as exc:
        # A wrong password, an untrusted certificate, no broker: one line that says what to fix.
        raise SystemExit(f"error: {exc}") from None
    # Faust's data directory (it holds RocksDB tables; Sluice's tables are in memory, so it
    # stays empty): private to this process and removed when it exits, never in the current
    # folder.
    with tempfile.TemporaryDirectory(prefix="sluice-faust-") as datadir:
        app = create_app(deps, hooks=hooks, datadir=Path(datadir))
        worker = Worker(app, loglevel=loglevel, loop=loop)
        worker.deps = deps
        worker.execute_from_commandline()
