"""``sluice worker``: one Faust worker process (split, upsert, outbox relay, webhooks), with its
Prometheus metrics on SLUICE_METRICS_HOST:SLUICE_METRICS_PORT."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import faust

from sluice.agents.webhooks import resolve_hooks
from sluice.app import create_app
from sluice.config import Settings
from sluice.errors import InvalidConfig, SluiceError
from sluice.metrics import serve
from sluice.runtime import Runtime
from sluice.storage.db import connect, migrate
from sluice.storage.tables import ensure_table
from sluice.streams.admin import ensure_topics
from sluice.streams.kafka import check_connection

log = logging.getLogger(__name__)


async def prepare(rt: Runtime) -> None:
    """What must exist before any agent runs: topics, Sluice's tables, importers' tables."""
    from sluice.agents.split import plan_for

    settings = rt.settings
    await check_connection(settings.kafka)
    await ensure_topics(settings.kafka)
    if settings.files.uses_s3:
        # A missing bucket or refused keys stop the worker here, not the first upload.
        await (await rt.objects()).check_bucket(settings.files.bucket)
    schemas = settings.database.schemas
    conn = await connect(settings.database_url, schemas=schemas)
    try:
        await migrate(conn, schemas)
        for importer in rt.registry.all():
            await ensure_table(conn, plan_for(importer))
    finally:
        await conn.close()


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Pull sources and hooks name the variables holding their secrets; this entry point is
    # where they are read.
    rt = Runtime(settings, secrets=dict(os.environ))
    try:
        hooks = resolve_hooks(settings.webhooks, rt.registry.all(), os.environ)
        # First, so that a port taken by another process stops the worker before it joins.
        server = serve(rt.metrics.registry, settings.metrics)
    except InvalidConfig as exc:
        raise SystemExit(f"error: {exc}") from None
    if server is not None:
        # Faust sets up logging only when it starts: this line goes straight to the log.
        where = f"{settings.metrics.host}:{settings.metrics.port}"
        print(f"metrics on http://{where}/metrics", file=sys.stderr, flush=True)
    try:
        loop.run_until_complete(prepare(rt))
    except SluiceError as exc:
        # A wrong password, an untrusted certificate, no broker: one line that says what to fix.
        raise SystemExit(f"error: {exc}") from None
    app = create_app(rt, hooks=hooks)
    worker = faust.Worker(app, loglevel=loglevel, loop=loop)
    worker.execute_from_commandline()
