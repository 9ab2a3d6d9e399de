"""What the agents, the CLI and the API share in one process: settings, the pool, repositories."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

import asyncpg

from sluice.agents.fetch.api import ApiClient
from sluice.config import Settings
from sluice.importers.registry import Registry, build_registry
from sluice.metrics import WorkerMetrics
from sluice.schemas.sources import ApiSource
from sluice.storage.db import create_pool
from sluice.storage.filestore import FileStore, Objects, PgFileStore
from sluice.storage.items import ItemRepository
from sluice.storage.ratelimit import RateLimiter
from sluice.storage.runs import RunRepository
from sluice.storage.writer import BatchApplier

if TYPE_CHECKING:
    from sluice.agents.firehose.project import Projections
    from sluice.storage.objectstore import S3Objects

POOL_CLOSE_TIMEOUT = 5.0


class Runtime:
    """``secrets``: the environment variables pull sources name for credentials, read by the
    entry point (library code never reads ``os.environ``); ``metrics``: where the agents count
    what they do (a registry of its own by default)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        secrets: Mapping[str, str] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        """What this process did, for Prometheus (served by workers)."""
        self.registry = registry or build_registry(settings.pipeline.importers)
        self.secrets: Mapping[str, str] = secrets or {}
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._api_clients: dict[str, ApiClient] = {}
        self._limiter: RateLimiter | None = None
        self._objects: S3Objects | None = None
        self._objects_lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    db = self.settings.database
                    self._pool = await create_pool(
                        self.settings.database_url,
                        schemas=db.schemas,
                        min_size=db.pool_min,
                        max_size=db.pool_max,
                    )
        return self._pool

    async def runs(self) -> RunRepository:
        return RunRepository(await self.pool())

    async def files(self) -> FileStore:
        """The configured file store (``SLUICE_FILE_STORE``): new files go there; files of
        either store are read and deleted from wherever their row says they are."""
        pool = await self.pool()
        store = self.settings.files
        if store.uses_s3:
            from sluice.storage.objectstore import S3FileStore

            return S3FileStore(
                pool,
                self.objects,
                bucket=store.bucket,
                prefix=store.prefix,
                part_bytes=store.part_bytes,
            )
        return PgFileStore(
            pool, chunk_bytes=self.settings.pipeline.file_chunk_bytes, objects=self.objects
        )

    async def objects(self) -> Objects:
        """The process's S3 client, connected on first use (a PostgreSQL-only deployment never
        needs the ``s3`` extra)."""
        if self._objects is None:
            async with self._objects_lock:
                if self._objects is None:
                    from sluice.storage.objectstore import S3Objects

                    self._objects = await S3Objects.connect(self.settings.files)
        return self._objects

    async def applier(self) -> BatchApplier:
        pool = await self.pool()  # no await between the test and the assignment: one applier
        if not hasattr(self, "_applier"):
            self._applier = BatchApplier(
                pool, progress_interval=self.settings.pipeline.progress_interval
            )
        return self._applier

    async def projections(self) -> Projections:
        """The importers that project AT Protocol collections into their tables."""
        from sluice.agents.firehose.project import Projections

        importers = [i for i in self.registry.all() if i.firehose]
        return Projections(importers, await self.applier())

    async def items(self) -> ItemRepository:
        return ItemRepository(await self.pool())

    async def api_client(self, slug: str, source: ApiSource) -> ApiClient:
        """One HTTP client per importer and process, sharing the cluster's rate limiter."""
        client = self._api_clients.get(slug)
        if client is None:
            if self._limiter is None:
                self._limiter = RateLimiter(await self.pool())
            client = self._api_clients[slug] = ApiClient(
                source, self._limiter, self.secrets, self.settings.url
            )
        return client

    async def close(self) -> None:
        """Close the HTTP clients and the pool. The pool waits up to POOL_CLOSE_TIMEOUT seconds
        for its connections to be released and closed politely (a server that is down never
        answers the goodbye), then drops them."""
        for client in self._api_clients.values():
            await client.close()
        self._api_clients.clear()
        if self._objects is not None:
            await self._objects.close()
            self._objects = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)
            except TimeoutError:
                pool.terminate()
