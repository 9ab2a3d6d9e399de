"""Lifecycle events as Server-Sent Events: one run's (``GET /api/v1/runs/{run_id}/events``,
from the outbox table, which keeps them) and every run's as they happen
(``GET /api/v1/events``, live from the lifecycle topic: a ``Subscription`` without a group,
from the latest offset). The dashboard's pages follow runs through them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from sluice.api.auth import TOKEN_REQUIRED
from sluice.api.deps import ClientDep, SettingsDep
from sluice.schemas.events import LifecycleEvent
from sluice.storage.runs import RunRepository
from sluice.subscription import Subscription

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
# How often a quiet stream checks that its client is still there.
DISCONNECT_CHECK_SECONDS = 1.0
RECONNECT_MS = 3000
# How often a run's stream reads the outbox for the run's next events.
RUN_EVENTS_POLL_SECONDS = 0.25
FINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter(dependencies=TOKEN_REQUIRED)


def format_event(event: LifecycleEvent) -> bytes:
    """One Server-Sent Event: named by the event's type, its JSON as the data."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


def _names(value: str | None) -> list[str] | None:
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    return names or None


@router.get(
    "/api/v1/runs/{run_id}/events",
    tags=["runs"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def run_events(run_id: uuid.UUID, request: Request, client: ClientDep) -> StreamingResponse:
    """The run's lifecycle events as Server-Sent Events, from its first event (or after
    ``Last-Event-ID``); the stream ends after the run's final event."""
    await client.get_run(run_id)
    try:
        after = int(request.headers.get("last-event-id", "0"))
    except ValueError:
        after = 0
    runs = (await client.deps()).runs
    return StreamingResponse(
        stream_run_events(runs, run_id, request, after=after),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def stream_run_events(
    runs: RunRepository,
    run_id: uuid.UUID,
    request: Request,
    *,
    after: int,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """The run's events after event ``after`` as SSE frames with their ids, until its final
    event or until the client goes away; a comment after ``keepalive`` quiet seconds."""
    idle = 0.0
    while True:
        events = await runs.events(run_id, after=after)
        for event_id, payload in events:
            after = event_id
            yield (
                f"id: {event_id}\nevent: {payload['type']}\n".encode()
                + b"data: "
                + orjson.dumps(payload)
                + b"\n\n"
            )
            if payload["type"] in FINAL_EVENTS:
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(RUN_EVENTS_POLL_SECONDS)
        idle = 0.0 if events else idle + RUN_EVENTS_POLL_SECONDS
        if idle >= keepalive:  # a comment keeps proxies from closing a quiet stream
            idle = 0.0
            yield b": keep-alive\n\n"


# Not in the OpenAPI document: a generated client (or a contract test) would wait on an
# endless stream.
@router.get("/api/v1/events", include_in_schema=False)
async def live_events(
    request: Request,
    settings: SettingsDep,
    importer: Annotated[str | None, Query(description="slugs, comma-separated")] = None,
    type: Annotated[str | None, Query(description="event types, comma-separated")] = None,
) -> StreamingResponse:
    """Lifecycle events of every run as they happen (nothing from before the request),
    optionally only of some importers or types; a ``: keep-alive`` comment every 15 s."""
    subscription = Subscription(settings, importers=_names(importer), types=_names(type))
    # Positioned before the answer starts: a client that sees the stream open and then
    # reads the runs' state misses nothing in between.
    await subscription.start()
    return StreamingResponse(
        stream_events(subscription, request), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def stream_events(
    subscription: Subscription,
    request: Request,
    *,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """The subscription's events as SSE frames, a comment after ``keepalive`` quiet seconds,
    until the client goes away (or the subscription fails: the browser then reconnects)."""
    queue: asyncio.Queue[LifecycleEvent | Exception] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for event in subscription:
                await queue.put(event)
        except Exception as exc:
            await queue.put(exc)

    task = asyncio.create_task(pump())
    try:
        # Tells the browser how soon to reconnect, and opens the stream at once.
        yield f"retry: {RECONNECT_MS}\n: connected\n\n".encode()
        last_sent = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                if time.monotonic() - last_sent >= keepalive:
                    last_sent = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            if isinstance(item, Exception):
                log.warning("live lifecycle stream ended: %r", item)
                return
            last_sent = time.monotonic()
            yield format_event(item)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await subscription.aclose()
