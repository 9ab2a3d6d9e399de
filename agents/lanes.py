"""Lanes: work on items of one lane in order, on items of different lanes at the same time.

The upsert agent puts each batch in the lane of its partition: batches of one partition carry
the same keys in file order and must be applied in that order, while batches of different
partitions touch different keys and can be applied side by side, each in its own PostgreSQL
transaction on its own connection. With one lane, PostgreSQL worked on one batch at a time and
the worker waited for it; with a lane per partition the database uses the cores it has.

A lane holds at most ``depth`` waiting items and ``put`` waits for room, so back pressure still
reaches the consumer: Kafka holds the backlog, not the worker's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

from sluice.retries import Policy, retrying

log = logging.getLogger(__name__)

T = TypeVar("T")


class Lanes(Generic[T]):
    def __init__(
        self,
        work: Callable[[T], Awaitable[None]],
        *,
        depth: int = 2,
        retry_delay: float = 1.0,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        """``on_retry`` is called each time an item is tried again (a metrics counter)."""
        self._work = work
        self._on_retry = on_retry
        self._depth = depth
        self._retry_delay = retry_delay
        self._queues: dict[Hashable, asyncio.Queue[T]] = {}
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}

    async def put(self, lane: Hashable, item: T) -> None:
        """Queue ``item`` behind the earlier items of ``lane``; waits while the lane is full."""
        queue = self._queues.get(lane)
        if queue is None:
            queue = self._queues[lane] = asyncio.Queue(self._depth)
            self._tasks[lane] = asyncio.create_task(self._run(lane, queue), name=f"lane-{lane}")
        await queue.put(item)

    async def _run(self, lane: Hashable, queue: asyncio.Queue[T]) -> None:
        # The work handles its own failures; what escapes it (the dead-letter topic refusing a
        # message, say) is tried again, whatever it is. Never skipped: the next item of the
        # lane must not be worked on before this one.
        policy = Policy(attempts=None, first=self._retry_delay, cap=30.0, retry_on=lambda exc: True)
        while True:
            item = await queue.get()
            await retrying(
                f"lane {lane}", partial(self._work, item), policy, on_retry=self._on_retry
            )
            del item  # not kept alive while the lane waits: Faust waits for it on a rebalance
            queue.task_done()

    async def join(self) -> None:
        """Wait until every item put so far has been worked on."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def close(self) -> None:
        """Stop every lane; items still waiting are dropped (they were not acknowledged)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
