"""Blocking versions of the Python API, for scripts and for threads without an event loop.

    import sluice.sync as sluice

    run = sluice.start("products", "products.csv")
    run = sluice.wait(run.id, timeout=600)

Each call runs its own event loop (``asyncio.run``). Inside async code, await the functions of
``sluice`` instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from sluice import sdk
from sluice.config import Settings
from sluice.schemas.runs import Run, RunStatus

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    name = getattr(coro, "__qualname__", "call")
    raise RuntimeError(
        f"sluice.sync.{name} blocks and this thread runs an event loop: "
        f"`await sluice.{name}(...)` instead, or call it through asyncio.to_thread"
    )


def start(
    importer: str,
    payload: sdk.Payload,
    *,
    user: str | None = None,
    dry_run: bool = False,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    settings: Settings | None = None,
) -> Run:
    """See ``sluice.start``."""
    return _run(
        sdk.start(
            importer,
            payload,
            user=user,
            dry_run=dry_run,
            options=options,
            name=name,
            settings=settings,
        )
    )


def trigger(
    importer: str,
    params: dict[str, Any] | None = None,
    *,
    user: str | None = None,
    dry_run: bool = False,
    settings: Settings | None = None,
) -> Run:
    """Blocking ``sluice.trigger``."""
    return _run(sdk.trigger(importer, params, user=user, dry_run=dry_run, settings=settings))


def get_run(run_id: sdk.RunId, *, settings: Settings | None = None) -> Run:
    """See ``sluice.get_run``."""
    return _run(sdk.get_run(run_id, settings=settings))


def list_runs(
    status: RunStatus | str | Sequence[RunStatus | str] | None = None,
    importer: str | None = None,
    limit: int = 50,
    *,
    settings: Settings | None = None,
) -> list[Run]:
    """See ``sluice.list_runs``."""
    return _run(sdk.list_runs(status, importer, limit, settings=settings))


def cancel(run_id: sdk.RunId, *, settings: Settings | None = None) -> Run:
    """See ``sluice.cancel``."""
    return _run(sdk.cancel(run_id, settings=settings))


def retry(
    run_id: sdk.RunId,
    dry_run: bool = False,
    *,
    user: str | None = None,
    settings: Settings | None = None,
) -> Run:
    """See ``sluice.retry``."""
    return _run(sdk.retry(run_id, dry_run, user=user, settings=settings))


def wait(
    run_id: sdk.RunId, timeout: float | None = None, *, settings: Settings | None = None
) -> Run:
    """See ``sluice.wait``."""
    return _run(sdk.wait(run_id, timeout, settings=settings))


def produce(
    topic: str,
    value: sdk.Message,
    *,
    key: str | bytes | uuid.UUID | None = None,
    settings: Settings | None = None,
) -> None:
    """See ``sluice.produce``."""
    _run(sdk.produce(topic, value, key=key, settings=settings))
