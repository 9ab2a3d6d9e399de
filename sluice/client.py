"""The Python API: start imports, follow and inspect runs.

async with Client(settings) as client:
    run = await client.submit_file("products", Path("products.csv"))
    run = await client.wait(run.id)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas.events import FileRef, ImportRequested
from schemas.runs import Run
from sluice.config import Settings
from sluice.errors import InvalidRequest, NothingToRetry, RunNotCancellable, RunNotFound
from sluice.importers.adhoc import ADHOC
from sluice.runtime import Runtime
from storage.filestore import iter_path
from streams.admin import ensure_topics
from streams.topics import REQUESTS


class Client:
    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.rt = runtime or Runtime(settings)
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        await self.rt.close()

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            await ensure_topics(
                self.settings.kafka.bootstrap,
                self.settings.kafka.partitions,
                self.settings.kafka.replication,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka.bootstrap,
                acks="all",
                request_timeout_ms=30000,
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def submit_file(
        self,
        importer: str,
        path: Path,
        *,
        dry_run: bool = False,
        options: dict[str, Any] | None = None,
        requested_by: str | None = None,
        source: str = "file",
    ) -> Run:
        if not path.is_file():  # noqa: ASYNC240 - one stat before the upload starts
            raise InvalidRequest(f"{path} is not a file; give the path of the file to import")
        return await self.submit_stream(
            importer,
            iter_path(path),
            name=path.name,
            dry_run=dry_run,
            options=options,
            requested_by=requested_by,
            source=source,
        )

    async def submit_stream(
        self,
        importer: str,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        dry_run: bool = False,
        options: dict[str, Any] | None = None,
        requested_by: str | None = None,
        source: str = "upload",
        content_type: str | None = None,
        max_bytes: int | None = None,
        parent_run_id: uuid.UUID | None = None,
    ) -> Run:
        """Store the file (claim check), create a queued run and publish the request."""
        if importer != ADHOC:
            # Unknown importers and sources it does not accept fail before anything is stored.
            definition = self.rt.registry.get(importer)
            if source not in (*definition.sources, "retry"):
                raise InvalidRequest(
                    f"importer {importer!r} does not accept {source!r} imports; it accepts: "
                    f"{', '.join(definition.sources)}"
                )
        files = await self.rt.files()
        ref = await files.put(chunks, name=name, content_type=content_type, max_bytes=max_bytes)
        runs = await self.rt.runs()
        run = await runs.create(
            importer=importer,
            source=source,
            dry_run=dry_run,
            file_id=ref.id,
            file_name=name,
            options=options,
            requested_by=requested_by,
            parent_run_id=parent_run_id,
        )
        await self.publish_request(run, ref)
        return run

    async def publish_request(self, run: Run, ref: FileRef) -> None:
        request = ImportRequested(
            run_id=run.id,
            importer=run.importer,
            file=ref,
            dry_run=run.dry_run,
            options=run.options,
            requested_at=datetime.now(UTC),
        )
        producer = await self.producer()
        await producer.send_and_wait(
            REQUESTS, request.model_dump_json().encode(), key=str(run.id).encode()
        )

    async def get_run(self, run_id: uuid.UUID) -> Run:
        run = await (await self.rt.runs()).get(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id}; list runs with `sluice runs`")
        return run

    async def list_runs(
        self,
        *,
        status: str | None = None,
        importer: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        """Runs, newest first."""
        return await (await self.rt.runs()).list(
            status=status, importer=importer, limit=limit, offset=offset
        )

    async def cancel(self, run_id: uuid.UUID) -> Run:
        """Stop a queued or running run: no batch is applied after this returns."""
        runs = await self.rt.runs()
        cancelled = await runs.cancel(run_id)
        if cancelled is None:
            run = await self.get_run(run_id)
            raise RunNotCancellable(
                f"run {run_id} is {run.status.value}; only queued or running runs can be cancelled"
            )
        return cancelled

    async def retry(
        self, run_id: uuid.UUID, *, dry_run: bool = False, requested_by: str | None = None
    ) -> Run:
        """Start a child run with the rows ``run_id`` rejected, through the importer as it is
        now (fixed importers or reference data land rows that failed before). Rows that could not
        be read at all (a wrong number of fields) are rejected again: fix those in the file."""
        parent = await self.get_run(run_id)
        runs = await self.rt.runs()
        failures = await runs.failed_rows(run_id)
        if not failures:
            raise NothingToRetry(f"run {run_id} has no rejected rows to retry")

        async def lines() -> AsyncIterator[bytes]:
            for f in failures:
                raw = f.raw
                if isinstance(raw, dict):
                    raw = {k: v for k, v in raw.items() if not k.startswith("_sluice")}
                yield orjson.dumps(raw, default=str) + b"\n"

        return await self.submit_stream(
            parent.importer,
            lines(),
            name=f"retry-of-{run_id}.jsonl",
            dry_run=dry_run,
            options={**parent.options, "format": "jsonl"},
            requested_by=requested_by,
            source="retry",
            content_type="application/x-ndjson",
            parent_run_id=parent.id,
        )

    async def wait(
        self,
        run_id: uuid.UUID,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - returns the run as it is, no raise
        poll: float = 0.25,
        on_update: Callable[[Run], None] | None = None,
    ) -> Run:
        """Until the run is finished (PostgreSQL is the source of truth, so poll it)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            run = await self.get_run(run_id)
            if on_update is not None:
                on_update(run)
            if run.status.terminal:
                return run
            if deadline is not None and loop.time() > deadline:
                return run
            await asyncio.sleep(poll)
