"""What the agents, the CLI and the API share in one process: settings, the pool, repositories."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

import asyncpg

from sluice.config import Settings
from sluice.importers.registry import Registry, build_registry
from sluice.sources.api import ApiClient
from sluice.sources.base import ApiSource
from sluice.storage.db import create_pool
from sluice.storage.filestore import PgFileStore
from sluice.storage.items import ItemRepository
from sluice.storage.ratelimit import RateLimiter
from sluice.storage.runs import RunRepository
from sluice.storage.writer import BatchApplier

if TYPE_CHECKING:
    from sluice.agents.project import Projections

POOL_CLOSE_TIMEOUT = 5.0


class Runtime:
    """``secrets``: the environment variables pull sources name for credentials, read by the
    entry point (library code never reads ``os.environ``)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or build_registry(settings.pipeline.importers)
        self.secrets: Mapping[str, str] = secrets or {}
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._api_clients: dict[str, ApiClient] = {}
        self._limiter: RateLimiter | None = None

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

    async def files(self) -> PgFileStore:
        return PgFileStore(await self.pool(), chunk_bytes=self.settings.pipeline.file_chunk_bytes)

    async def applier(self) -> BatchApplier:
        pool = await self.pool()  # no await between the test and the assignment: one applier
        if not hasattr(self, "_applier"):
            self._applier = BatchApplier(
                pool, progress_interval=self.settings.pipeline.progress_interval
            )
        return self._applier

    async def projections(self) -> Projections:
        """The importers that project AT Protocol collections into their tables."""
        from sluice.agents.project import Projections

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
            client = self._api_clients[slug] = ApiClient(source, self._limiter, self.secrets)
        return client

    async def close(self) -> None:
        """Close the HTTP clients and the pool. The pool waits up to POOL_CLOSE_TIMEOUT seconds
        for its connections to be released and closed politely (a server that is down never
        answers the goodbye), then drops them."""
        for client in self._api_clients.values():
            await client.close()
        self._api_clients.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)
            except TimeoutError:
                pool.terminate()
