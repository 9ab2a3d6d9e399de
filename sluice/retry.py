"""One retry policy for every loop in Sluice that waits and tries again (tenacity underneath).

- Exponential backoff with jitter (half the delay fixed, half random), capped, so workers that
  failed together do not retry together.
- A :class:`~sluice.errors.TerminalError` (and cancellation) is never retried: the input is
  wrong, trying again cannot help.
- Waits that are not the work's fault do not use up its tries:

  - while the database cannot be reached (:class:`~sluice.errors.DatabaseUnavailable`), the
    work waits for it, up to ``Policy.outage`` seconds in all: a restart of PostgreSQL is
    waited out, not failed;
  - an error that says when to come back (a ``retry_after`` attribute: a 429 answer with its
    ``Retry-After``) waits that long and is asked again; a 429 is never a final failure.

``backoff(attempt)`` is the same delay for the loops that keep their schedule in PostgreSQL
(webhook deliveries) rather than in a running coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from sluice.errors import DatabaseUnavailable, TerminalError

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGE_PAUSE = 1.0
"""Seconds between looks at a database that cannot be reached."""


@dataclass(frozen=True)
class Policy:
    """How often and how long to try. ``attempts=None`` tries forever (a consumer that must
    reconnect)."""

    attempts: int | None = 5
    first: float = 0.5
    """Seconds before the second try; each later wait doubles, up to ``cap``."""
    cap: float = 10.0
    outage: float = 120.0
    """Seconds in all that the work waits for an unreachable database without using a try."""


def backoff(attempt: int, *, first: float = 0.5, cap: float = 10.0) -> float:
    """The wait after failed try number ``attempt`` (1, 2, ...): doubling from ``first`` up to
    ``cap``, half of it random."""
    full = min(cap, first * 2 ** max(0, attempt - 1))
    jittered: float = full / 2 + random.uniform(0, full / 2)
    return jittered


def retry_after(exc: BaseException) -> float | None:
    """Seconds the error asks to wait before the next try, if it says."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


class _Budget:
    """The tries a loop has used and the outage time it has waited (tenacity's stop and wait
    callbacks share it: free waits do not count as tries)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.tries = 0
        self.outage = 0.0

    def stop(self, state: RetryCallState) -> bool:
        exc = _exception(state)
        if isinstance(exc, DatabaseUnavailable):
            return self.outage >= self.policy.outage
        if retry_after(exc) is not None:
            return False
        self.tries += 1
        return self.policy.attempts is not None and self.tries >= self.policy.attempts

    def wait(self, state: RetryCallState) -> float:
        exc = _exception(state)
        if isinstance(exc, DatabaseUnavailable):
            self.outage += OUTAGE_PAUSE
            return OUTAGE_PAUSE
        asked = retry_after(exc)
        if asked is not None:
            return asked
        return backoff(self.tries, first=self.policy.first, cap=self.policy.cap)


def _exception(state: RetryCallState) -> BaseException:
    assert state.outcome is not None and state.outcome.failed
    exc = state.outcome.exception()
    assert exc is not None
    return exc


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, TerminalError | asyncio.CancelledError)


async def retrying(
    what: str,
    work: Callable[[], Awaitable[T]],
    policy: Policy = Policy(),
    *,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``work()``, tried again under ``policy`` while it raises anything but a TerminalError;
    the last exception propagates. ``what`` names the work in the log; ``on_retry`` is told
    of every failed try that is tried again (metrics)."""
    budget = _Budget(policy)

    def before_sleep(state: RetryCallState) -> None:
        exc = _exception(state)
        pause = state.upcoming_sleep
        if isinstance(exc, DatabaseUnavailable):
            log.warning("%s: the database is unreachable (%s); waiting", what, exc)
        else:
            log.warning(
                "%s: attempt %d failed (%s: %s); again in %.1fs",
                what,
                state.attempt_number,
                type(exc).__name__,
                exc,
                pause,
            )
        if on_retry is not None:
            on_retry(exc)

    retryer = AsyncRetrying(
        retry=retry_if_exception(_retryable),
        stop=budget.stop,
        wait=budget.wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retryer(work)
