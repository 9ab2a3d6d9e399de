"""Sluice: an event-driven ingestion engine into PostgreSQL over Kafka.

The Python API (``sluice.start``, ``sluice.subscribe``, ...) is imported on first use, so
``import sluice`` stays cheap. Blocking versions are in ``sluice.sync``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.sdk import (
        backfill,
        backfill_status,
        cancel,
        get_run,
        list_runs,
        produce,
        retry,
        start,
        subscribe,
        trigger,
        wait,
    )

__version__ = "0.1.0"
__all__ = [
    "backfill",
    "backfill_status",
    "cancel",
    "get_run",
    "list_runs",
    "produce",
    "retry",
    "start",
    "subscribe",
    "trigger",
    "wait",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sluice import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
