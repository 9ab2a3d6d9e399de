"""One retry policy for every loop in Sluice that waits and tries again (tenacity underneath).
(``retries``, not ``retry``: ``sluice.retry`` is the Python API's "retry a run".)

- Exponential backoff with jitter (half the delay fixed, half random), capped, so workers that
  failed together do not retry together.
- A :class:`~sluice.errors.TerminalError` (and cancellation) is never retried: the input is
  wrong, trying again cannot help. A policy may narrow what it retries (``retry_on``: a
  serializable transaction's conflicts only) or widen it (a lane that must never skip).
- Waits that are not the work's fault do not use up its tries:

  - while the database cannot be reached (:class:`~sluice.errors.DatabaseUnavailable`), the
    work waits for it, up to ``Policy.outage`` seconds in all: a restart of PostgreSQL is
    waited out, not failed (after that, its failures count as tries);
  - an error that says when to come back (a ``retry_after`` attribute: a 429 answer with its
    ``Retry-After``) waits that long and is asked again; a 429 is never a final failure.

``backoff(attempt)`` is the same delay for the loops that keep their schedule in PostgreSQL
(webhook deliveries) rather than in a running coroutine, and for loops that keep running
between failures (the firehose reconnecting).
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
    """How often and how long to try. ``attempts=None`` tries forever (a lane that must not
    skip its item)."""

    attempts: int | None = 5
    first: float = 0.5
    """Seconds before the second try; each later wait doubles, up to ``cap``."""
    cap: float = 10.0
    outage: float = 120.0
    """Seconds in all that the work waits for an unreachable database without using a try;
    after that, its failures count as tries again."""
    retry_on: Callable[[BaseException], bool] | None = None
    """Which errors are tried again; None: anything but a TerminalError (and cancellation)."""


def backoff(attempt: int, *, first: float = 0.5, cap: float = 10.0, jitter: bool = True) -> float:
    """The wait after failed try number ``attempt`` (1, 2, ...): doubling from ``first`` up to
    ``cap``; with ``jitter``, half of it random. Without, the schedule is exact (webhook
    deliveries, whose next attempt is a time stored in PostgreSQL and shown to users)."""
    full = float(min(cap, first * 2 ** min(max(0, attempt - 1), 64)))
    if not jitter:
        return full
    jittered: float = full / 2 + random.uniform(0, full / 2)
    return jittered


def retry_after(exc: BaseException) -> float | None:
    """Seconds the error asks to wait before the next try, if it says."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


class _Budget:
    """The tries a loop has used and the outage time it has waited. Tenacity asks for the
    wait, then whether to stop; both come from one decision per failed try, so waits that
    are not the work's fault do not count as tries."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.tries = 0
        self.outage = 0.0
        self._decided: tuple[int, bool, float] = (0, False, 0.0)

    def _decide(self, state: RetryCallState) -> tuple[bool, float]:
        """(stop, pause) for the try that just failed."""
        number, stop, pause = self._decided
        if number == state.attempt_number:
            return stop, pause
        exc = _exception(state)
        policy = self.policy
        asked = retry_after(exc)
        if isinstance(exc, DatabaseUnavailable) and self.outage < policy.outage:
            stop, pause = False, OUTAGE_PAUSE
            self.outage += pause
        elif asked is not None:
            stop, pause = False, asked
        else:
            self.tries += 1
            stop = policy.attempts is not None and self.tries >= policy.attempts
            pause = backoff(self.tries, first=policy.first, cap=policy.cap)
        self._decided = (state.attempt_number, stop, pause)
        return stop, pause

    def stop(self, state: RetryCallState) -> bool:
        return self._decide(state)[0]

    def wait(self, state: RetryCallState) -> float:
        return self._decide(state)[1]


def _exception(state: RetryCallState) -> BaseException:
    assert state.outcome is not None and state.outcome.failed
    exc = state.outcome.exception()
    assert exc is not None
    return exc


def _retryable(policy: Policy) -> Callable[[BaseException], bool]:
    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            return False
        if policy.retry_on is not None:
            return policy.retry_on(exc)
        return not isinstance(exc, TerminalError)

    return retryable


async def retrying(
    what: str,
    work: Callable[[], Awaitable[T]],
    policy: Policy = Policy(),
    *,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``work()``, tried again under ``policy`` while it raises what the policy retries; the
    last exception propagates. ``what`` names the work in the log; ``on_retry`` is called
    before each wait to try again (a metrics counter)."""
    budget = _Budget(policy)

    def before_sleep(state: RetryCallState) -> None:
        exc = _exception(state)
        if isinstance(exc, DatabaseUnavailable):
            log.warning("%s: the database is unreachable (%s); waiting", what, exc)
        else:
            log.warning(
                "%s: attempt %d failed (%s: %s); retrying in %.1fs",
                what,
                state.attempt_number,
                type(exc).__name__,
                exc,
                state.upcoming_sleep,
            )
        if on_retry is not None:
            on_retry()

    retryer = AsyncRetrying(
        retry=retry_if_exception(_retryable(policy)),
        stop=budget.stop,
        wait=budget.wait,
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # A coroutine function for tenacity, which calls anything else (a lambda or partial
        # returning an awaitable) without awaiting it.
        return await work()

    return await retryer(attempt)
