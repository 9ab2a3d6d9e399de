"""Retry with exponential backoff, for agents: Faust acks an event even when the agent raises,
so an agent tries again itself and, after the last try, hands the failure to its caller (which
dead-letters the message and fails the run)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sluice.errors import TerminalError

log = logging.getLogger(__name__)

T = TypeVar("T")


async def retrying(
    what: str,
    attempts: int,
    work: Callable[[], Awaitable[T]],
    *,
    delay: float = 0.5,
    max_delay: float = 10.0,
) -> T:
    """``work()``, tried up to ``attempts`` times while it raises anything but a TerminalError;
    the last exception propagates."""
    for attempt in range(1, attempts + 1):
        try:
            return await work()
        except (asyncio.CancelledError, TerminalError):
            raise
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning(
                "%s: attempt %d failed (%s: %s); retrying in %.1fs",
                what,
                attempt,
                type(exc).__name__,
                exc,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")
