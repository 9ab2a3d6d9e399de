"""What the stages share in one process, built once by the entry point and passed to every
agent: the settings, the importers, the connection pool and the repositories on it, the file
store, the batch writer, the rate limiter, the API sources' HTTP clients and the metrics.

    deps = await build_deps(settings, registry=registry, secrets=os.environ)
    ...
    await deps.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import asyncpg

from sluice.agents.fetch.api import ApiClients
from sluice.agents.split.parse.inspect import Inspector
from sluice.config import FileStoreSettings, Settings
from sluice.metrics import WorkerMetrics
from sluice.schemas.importers import Importer
from sluice.storage.db import create_pool
from sluice.storage.filestore import FileStore, LocalFileStore, Objects, PgFileStore
from sluice.storage.items import ItemRepository
from sluice.storage.ratelimit import RateLimiter
from sluice.storage.runs import RunRepository
from sluice.storage.writer import BatchApplier

if TYPE_CHECKING:
    from sluice.storage.objectstore import S3Objects

log = logging.getLogger(__name__)

POOL_CLOSE_TIMEOUT = 5.0
"""Seconds a pool waits for its connections to be released and closed politely before it drops
them (a server that is down never answers the goodbye)."""


class Importers(Protocol):
    """The importers a process knows (``sluice.importers.registry.Registry``)."""

    def get(self, slug: str) -> Importer: ...

    def all(self) -> list[Importer]: ...


class LazyObjects:
    """The process's S3 client, connected on first use: a PostgreSQL-only deployment never
    needs the ``s3`` extra."""

    def __init__(self, settings: FileStoreSettings) -> None:
        self.settings = settings
        self._client: S3Objects | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> Objects:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from sluice.storage.objectstore import S3Objects

                    self._client = await S3Objects.connect(self.settings)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


@dataclass
class Deps:
    settings: Settings
    registry: Importers
    pool: asyncpg.Pool
    runs: RunRepository
    items: ItemRepository
    files: FileStore
    applier: BatchApplier
    limiter: RateLimiter
    api_clients: ApiClients
    objects: LazyObjects
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    """What this process did, for Prometheus (served by workers)."""
    secrets: Mapping[str, str] = field(default_factory=dict)
    """The environment variables pull sources and hooks name for credentials, read by the
    entry point (library code never reads ``os.environ``)."""

    async def close(self) -> None:
        """Close the HTTP clients, the S3 client and the pool (which waits at most
        POOL_CLOSE_TIMEOUT seconds for its connections, then drops them)."""
        await self.api_clients.close()
        await self.objects.close()
        try:
            await asyncio.wait_for(self.pool.close(), POOL_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("the database did not say goodbye within %gs", POOL_CLOSE_TIMEOUT)
            self.pool.terminate()


def file_store(settings: Settings, pool: asyncpg.Pool, objects: LazyObjects) -> FileStore:
    """The configured file store (``SLUICE_FILE_STORE``): new files go there; files of either
    store are read and deleted from wherever their row says they are."""
    store = settings.files
    if store.uses_s3:
        from sluice.storage.objectstore import S3FileStore

        return S3FileStore(
            pool,
            objects,
            bucket=store.bucket,
            prefix=store.prefix,
            part_bytes=store.part_bytes,
            inspect=Inspector,
        )
    if store.directory is not None:
        return LocalFileStore(pool, store.directory, objects=objects, inspect=Inspector)
    return PgFileStore(
        pool, chunk_bytes=settings.pipeline.file_chunk_bytes, objects=objects, inspect=Inspector
    )


async def build_deps(
    settings: Settings,
    *,
    registry: Importers,
    secrets: Mapping[str, str] | None = None,
    metrics: WorkerMetrics | None = None,
    pool_size: tuple[int, int] | None = None,
) -> Deps:
    """Connect to PostgreSQL and build everything on the pool. ``pool_size`` (min, max)
    overrides ``SLUICE_DATABASE_POOL_MIN/MAX`` (a command needs two connections, not eight)."""
    db = settings.database
    low, high = pool_size or (db.pool_min, db.pool_max)
    pool = await create_pool(settings.database_url, schemas=db.schemas, min_size=low, max_size=high)
    objects = LazyObjects(settings.files)
    limiter = RateLimiter(pool)
    secrets = secrets or {}
    return Deps(
        settings=settings,
        registry=registry,
        pool=pool,
        runs=RunRepository(pool),
        items=ItemRepository(pool),
        files=file_store(settings, pool, objects),
        applier=BatchApplier(pool, progress_interval=settings.pipeline.progress_interval),
        limiter=limiter,
        api_clients=ApiClients(limiter, secrets, settings.url),
        objects=objects,
        metrics=metrics or WorkerMetrics(),
        secrets=secrets,
    )
