"""The split agent: each import request on the requests topic is split into row batches on the
batches topic (``sluice.agents.split.split``). A producer outside Sluice may also put a start
message for a pull source there: it goes on to the fetch agent."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from sluice.agents.split.split import split_file
from sluice.agents.wiring import Wiring, acknowledged
from sluice.schemas.events import ImportRequested, TriggerRequested

if TYPE_CHECKING:
    import faust


def start_message(value: bytes | None) -> TriggerRequested | ValidationError | None:
    """A message on the requests topic that asks to start an import of a pull source (the
    shape of a run-less trigger: no run id, no stored file), what is wrong with one that tries,
    or None for anything else (a broken ImportRequested: its own errors say why)."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "file" in data or data.get("run_id") is not None:
        return None
    try:
        return TriggerRequested.model_validate(data)
    except ValidationError as exc:
        return exc


def register(app: faust.App, wiring: Wiring) -> None:
    """The ``split`` agent."""
    topics = wiring.topics

    async def send(partition: int, key: bytes, value: bytes) -> Awaitable[Any]:
        delivery: Awaitable[Any] = await topics.batches.send(
            key=key, value=value, partition=partition
        )
        return delivery

    async def split_event(event: Any) -> None:
        try:
            request = ImportRequested.model_validate_json(event.value)
        except ValidationError as exc:
            await not_a_request(event, exc)
            return
        await wiring.with_retries(
            "split",
            "split",
            request.run_id,
            event,
            lambda: split_file(wiring.deps, request, send, wiring.flush),
        )

    async def not_a_request(event: Any, exc: ValidationError) -> None:
        start = start_message(event.value)
        if isinstance(start, TriggerRequested):
            # A producer outside Sluice asked for an import of a pull source: the fetch agent
            # creates its run (idempotent by request_id).
            key = (start.request_id or start.importer).encode()
            await (await topics.triggers.send(key=key, value=event.value))
        elif start is not None:
            await wiring.dead_letter(
                event, f"not a valid start message (a trigger): {start.errors()[:3]}"
            )
        else:
            await wiring.dead_letter(event, f"not a valid import request: {exc.errors()[:3]}")

    @app.agent(topics.requests, name="split")
    async def split_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, split_event)
