"""Confirmed publishing: a stage records a step as done only once the broker confirmed every
message the step produced.

A producer's ``send`` returns when the message is buffered; its delivery future says whether
the broker took it. ``flush()`` does not raise for a refused message, so a stage that only
flushed would record its step as done with messages missing (a broker failover, a message over
the limit, a broker that lost its topics). :class:`Deliveries` keeps the futures of one step
and :meth:`Deliveries.confirm` raises :class:`~sluice.errors.DeliveryFailed` if any failed, so
the step goes to the retry path instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from sluice.errors import DeliveryFailed


class Deliveries:
    """The delivery futures of one step's messages (``what`` names the step in errors)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._pending: list[asyncio.Future[Any]] = []
        self.confirmed = 0

    def track(self, delivery: Awaitable[Any] | None) -> None:
        if delivery is None:
            return
        self._pending.append(asyncio.ensure_future(delivery))
        if len(self._pending) >= 256:
            self._settle()

    def check(self) -> None:
        """Raise now if a message already failed (a long step stops early)."""
        self._settle()

    async def confirm(self) -> int:
        """Wait for every tracked message; returns how many were confirmed in all."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.wait(pending)
        self._pending = pending
        self._settle()
        return self.confirmed

    def _settle(self) -> None:
        failed: list[BaseException] = []
        waiting = []
        for fut in self._pending:
            if not fut.done():
                waiting.append(fut)
            elif fut.cancelled():
                failed.append(asyncio.CancelledError())
            elif (exc := fut.exception()) is not None:
                failed.append(exc)
            else:
                self.confirmed += 1
        self._pending = waiting
        if failed:
            for fut in waiting:  # their outcome no longer matters: the step is done again
                fut.add_done_callback(_retrieve)
            self._pending = []
            first = failed[0]
            raise DeliveryFailed(
                f"{self.what}: the broker did not confirm {len(failed)} message(s) "
                f"({type(first).__name__}: {first}); the step will be done again"
            ) from first


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning
