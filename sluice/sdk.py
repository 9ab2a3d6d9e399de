"""The Python API as functions: start runs, inspect them, follow their events, publish to topics.

    import sluice

    run = await sluice.start("products", "products.csv", user="etl")
    run = await sluice.wait(run.id, timeout=600)

Every function takes ``settings``; without them they come from the environment or the stack
running under ``SLUICE_HOME``, as for the command line. ``sluice.sync`` has blocking versions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from sluice.config import Settings
from sluice.errors import (
    DatabaseUnavailable,
    InvalidRequest,
    StackNotFound,
    StackUnreachable,
    TransientError,
)
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client, run_options
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.subscription import Subscription

Chunks = bytes | bytearray | memoryview | AsyncIterable[bytes] | Iterable[bytes]
Payload = str | os.PathLike[str] | Chunks
"""A path (streamed from disk), the bytes of a file, or its chunks (sync or async)."""
RunId = uuid.UUID | str
Message = BaseModel | dict[str, Any] | list[Any] | bytes


def resolve_settings(settings: Settings | None = None, *, database: bool = True) -> Settings:
    """``settings`` as given, else from the environment and the stack under ``SLUICE_HOME``."""
    if settings is not None:
        return settings
    from sluice.env import load_settings

    found = load_settings(require_stack=False)
    if not found.kafka.bootstrap or (database and not found.database_url):
        raise StackNotFound(
            f"no Sluice stack is running under {found.pipeline.home.resolve()}: start one with "
            "`sluice up --detach`, set SLUICE_KAFKA_BOOTSTRAP and SLUICE_DATABASE_URL, or pass "
            "settings="
        )
    return found


FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
"""OSErrors about the caller's own files: those propagate as they are."""


@asynccontextmanager
async def _client(settings: Settings | None) -> AsyncIterator[Client]:
    resolved = resolve_settings(settings)
    try:
        async with Client(resolved) as client:
            yield client
    except FILE_ERRORS:
        raise
    except (OSError, DatabaseUnavailable) as exc:
        # A refused or unresolvable connection: aiokafka's sockets, or the database (which
        # sluice.storage.db raises as DatabaseUnavailable).
        database = urlsplit(resolved.database_url or "").netloc.rpartition("@")[2]
        raise StackUnreachable(
            f"cannot reach the broker ({resolved.kafka.bootstrap}) or the database ({database}):"
            f" {exc}. Is the stack running? `sluice env` prints the settings of the one under"
            " SLUICE_HOME, `sluice up --detach` starts one"
        ) from exc


def _run_id(run_id: RunId) -> uuid.UUID:
    if isinstance(run_id, uuid.UUID):
        return run_id
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise InvalidRequest(f"{run_id!r} is not a run id (a UUID, as in Run.id)") from None


async def _chunks(payload: Chunks) -> AsyncIterator[bytes]:
    if isinstance(payload, bytes | bytearray | memoryview):
        yield bytes(payload)
    elif isinstance(payload, AsyncIterable):
        async for chunk in payload:
            yield chunk
    elif isinstance(payload, Iterable):
        for chunk in payload:
            yield chunk
    else:
        raise InvalidRequest(
            f"cannot import a {type(payload).__name__}: give a path, bytes, or an iterable of "
            "bytes chunks"
        )


async def start(
    importer: str,
    payload: Payload,
    *,
    user: str | None = None,
    dry_run: bool = False,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    settings: Settings | None = None,
) -> Run:
    """Store ``payload`` and queue a run of ``importer`` on it; returns the queued run.

    A path is streamed from disk, never read whole; ``name`` (default ``"upload"``) names bytes
    and chunk streams in the run. ``user`` is recorded as ``requested_by``.
    """
    if isinstance(payload, str) and "\n" in payload:
        raise InvalidRequest("a str payload is a path: pass the file's contents as bytes")
    async with _client(settings) as client:
        if isinstance(payload, (str, os.PathLike)):
            return await client.submit_file(
                importer, Path(payload), dry_run=dry_run, options=options, requested_by=user
            )
        return await client.submit_stream(
            importer,
            _chunks(payload),
            name=name or "upload",
            dry_run=dry_run,
            options=options,
            requested_by=user,
        )


async def trigger(
    importer: str,
    params: dict[str, Any] | None = None,
    *,
    user: str | None = None,
    dry_run: bool = False,
    full: bool = False,
    settings: Settings | None = None,
) -> Run:
    """Queue a run that pulls its data: ``{"url": ...}`` for URL sources, ``{"file": ...}`` or
    ``{"pattern": ...}`` for FTP/SFTP, ``{"path": ...}`` for the filesystem, nothing for the
    importer's paginated API (``full``: an incremental one lists everything, not only what
    changed since its last completed run). Returns the queued run; a refused URL raises
    ``SourceError``."""
    async with _client(settings) as client:
        return await client.trigger(
            importer,
            params,
            dry_run=dry_run,
            requested_by=user,
            options=run_options(full=full),
        )


async def backfill(
    dids: Iterable[str],
    *,
    collections: Iterable[str] | None = None,
    reset: bool = False,
    user: str | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """Queue AT Protocol repositories for backfill by the workers; returns the DIDs queued.
    Follow them with ``backfill_status`` or the ``backfill.*`` lifecycle events."""
    async with _client(settings) as client:
        return await client.backfill(
            list(dids), collections=list(collections or []), reset=reset, requested_by=user
        )


async def backfill_status(
    did: str | None = None, status: str | None = None, *, settings: Settings | None = None
) -> list[Any]:
    """Backfill state per (did, collection): ``BackfillState`` objects."""
    async with _client(settings) as client:
        return list(await client.backfill_states(did, status))


async def get_run(run_id: RunId, *, settings: Settings | None = None) -> Run:
    """The run as it is now; ``RunNotFound`` when there is none."""
    async with _client(settings) as client:
        return await client.get_run(_run_id(run_id))


async def list_runs(
    status: RunStatus | str | Sequence[RunStatus | str] | None = None,
    importer: str | None = None,
    limit: int = 50,
    *,
    settings: Settings | None = None,
) -> list[Run]:
    """Runs, newest first; ``status`` one status, several (a list, or ``"failed,cancelled"``)
    or None for all. An unknown status raises ``InvalidRequest`` naming the valid ones."""
    if status is None:
        wanted = None
    else:
        text = status if isinstance(status, str) else ",".join(str(s) for s in status)
        try:
            wanted = [s.value for s in RunStatus.parse_many(text)]
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    async with _client(settings) as client:
        return await client.list_runs(status=wanted, importer=importer, limit=limit)


async def cancel(run_id: RunId, *, settings: Settings | None = None) -> Run:
    """Stop a queued or running run; rows applied before stay."""
    async with _client(settings) as client:
        return await client.cancel(_run_id(run_id))


async def retry(
    run_id: RunId,
    dry_run: bool = False,
    *,
    user: str | None = None,
    settings: Settings | None = None,
) -> Run:
    """Queue a child run with the rows ``run_id`` rejected (``parent_run_id`` links them)."""
    async with _client(settings) as client:
        return await client.retry(_run_id(run_id), dry_run=dry_run, requested_by=user)


async def wait(
    run_id: RunId,
    timeout: float | None = None,  # noqa: ASYNC109 - returns the run as it is, no raise
    *,
    settings: Settings | None = None,
) -> Run:
    """Until the run is finished, or ``timeout`` seconds: check ``run.status.terminal``."""
    async with _client(settings) as client:
        return await client.wait(_run_id(run_id), timeout=timeout)


def subscribe(
    *,
    group_id: str | None = None,
    importers: str | Iterable[str] | None = None,
    run_id: RunId | None = None,
    types: str | Iterable[str] | None = None,
    from_beginning: bool = False,
    settings: Settings | None = None,
) -> Subscription:
    """Lifecycle events as they happen: ``async with subscribe(...) as events: async for ...``.

    Without ``group_id`` it starts at the newest event (the oldest kept with ``from_beginning``)
    and remembers nothing. With one it commits what was handled and a restart resumes there;
    subscribers sharing a group id share the events. Filters are all optional and combined.
    Delivery is at least once: de-duplicate on ``event.event_id``.
    """
    return Subscription(
        resolve_settings(settings, database=False),
        group_id=group_id,
        importers=importers,
        run_id=_run_id(run_id) if run_id is not None else None,
        types=types,
        from_beginning=from_beginning,
    )


def encode_message(value: Message) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    return orjson.dumps(value)


def _key(key: str | bytes | uuid.UUID | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


class Publisher:
    """One producer for many messages (``produce`` opens one per call).

    async with Publisher() as publisher:
        await publisher.send("some.topic", {"id": 1}, key="1")
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = resolve_settings(settings, database=False)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> Publisher:
        if self._producer is None:
            kafka = self.settings.kafka
            producer = clients.producer(kafka)
            try:
                await ensure_topics(kafka)
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                raise TransientError(
                    f"cannot reach the broker at {kafka.bootstrap} ({exc!r}); is it running? "
                    "`sluice env` shows the settings"
                ) from exc
            self._producer = producer
        return self

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def __aenter__(self) -> Publisher:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self, topic: str, value: Message, *, key: str | bytes | uuid.UUID | None = None
    ) -> None:
        """Publish ``value`` as JSON (bytes as they are); returns when all replicas have it."""
        await self.start()
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(topic, encode_message(value), key=_key(key))
        except KafkaError as exc:
            raise TransientError(
                f"could not publish to {topic} ({exc!r}); check that the topic exists and the "
                "broker is reachable"
            ) from exc


async def produce(
    topic: str,
    value: Message,
    *,
    key: str | bytes | uuid.UUID | None = None,
    settings: Settings | None = None,
) -> None:
    """Publish one JSON message (a pydantic model, a dict or list, or bytes) with acks=all."""
    async with Publisher(settings) as publisher:
        await publisher.send(topic, value, key=key)
