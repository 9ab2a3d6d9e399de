"""Retry with exponential backoff, for agents: Faust acks an event even when the agent raises,
so an agent tries again itself and, after the last try, hands the failure to its caller (which
dead-letters the message and fails the run)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sluice.errors import TerminalError
from sluice.storage.db import is_connection_error

log = logging.getLogger(__name__)

T = TypeVar("T")


async def retrying(
    what: str,
    attempts: int,
    work: Callable[[], Awaitable[T]],
    *,
    delay: float = 0.5,
    max_delay: float = 10.0,
    outage: float = 120.0,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``work()``, tried up to ``attempts`` times while it raises anything but a TerminalError;
    the last exception propagates. While the database cannot be reached, tries do not count,
    for up to ``outage`` seconds: a restart of PostgreSQL is waited out, not failed.
    ``on_retry`` is called before each wait to try again (a metrics counter)."""
    attempt = 0
    waited = 0.0
    while True:
        try:
            return await work()
        except (asyncio.CancelledError, TerminalError):
            raise
        except Exception as exc:
            if is_connection_error(exc) and waited < outage:
                pause = min(delay, max_delay, 2.0)
                log.warning("%s: the database is unreachable (%s); waiting", what, exc)
                if on_retry is not None:
                    on_retry()
                await asyncio.sleep(pause)
                waited += pause
                continue
            attempt += 1
            if attempt >= attempts:
                raise
            log.warning(
                "%s: attempt %d failed (%s: %s); retrying in %.1fs",
                what,
                attempt,
                type(exc).__name__,
                exc,
                delay,
            )
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
