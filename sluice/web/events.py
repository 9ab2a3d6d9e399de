"""``GET /api/v1/events``: every run's lifecycle events as Server-Sent Events, live from the
lifecycle topic (a ``Subscription`` without a group, from the latest offset)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.params import Depends
from fastapi.responses import StreamingResponse

from sluice.config import Settings
from sluice.schemas.events import LifecycleEvent
from sluice.subscription import Subscription

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
# How often a quiet stream checks that its client is still there.
DISCONNECT_CHECK_SECONDS = 1.0
RECONNECT_MS = 3000


def format_event(event: LifecycleEvent) -> bytes:
    """One Server-Sent Event: named by the event's type, its JSON as the data."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


def _names(value: str | None) -> list[str] | None:
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    return names or None


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


def create_events_router(settings: Settings, api_auth: Sequence[Depends]) -> APIRouter:
    router = APIRouter()

    # Not in the OpenAPI document: a generated client (or a contract test) would wait on an
    # endless stream.
    @router.get("/api/v1/events", dependencies=list(api_auth), include_in_schema=False)
    async def live_events(
        request: Request,
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
            stream_events(subscription, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
