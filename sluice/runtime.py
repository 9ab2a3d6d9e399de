"""What the agents, the CLI and the API share in one process: settings, the pool, repositories."""

from __future__ import annotations

import asyncio

import asyncpg

from sluice.config import Settings
from sluice.importers.registry import Registry, build_registry
from storage.db import create_pool
from storage.filestore import PgFileStore
from storage.runs import RunRepository
from storage.writer import BatchApplier


class Runtime:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or build_registry(settings.pipeline.importers)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    db = self.settings.database
                    self._pool = await create_pool(
                        self.settings.database_url, min_size=db.pool_min, max_size=db.pool_max
                    )
        return self._pool

    async def runs(self) -> RunRepository:
        return RunRepository(await self.pool())

    async def files(self) -> PgFileStore:
        return PgFileStore(await self.pool(), chunk_bytes=self.settings.pipeline.file_chunk_bytes)

    async def applier(self) -> BatchApplier:
        if not hasattr(self, "_applier"):
            self._applier = BatchApplier(
                await self.pool(), progress_interval=self.settings.pipeline.progress_interval
            )
        return self._applier

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
