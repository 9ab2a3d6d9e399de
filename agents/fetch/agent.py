"""The fetch agents: ``fetch`` carries out each trigger on the triggers topic (a file-like
source is fetched into the file store and handed to the split; an API source starts its
discovery, which publishes batches of items), and ``detail`` fetches and applies each batch of
items on the items topic.

Item batches go to the items topic's partitions in turn (batch number modulo partitions), not
by the hash of their key, so they spread evenly over the workers. A retry batch that a detail
batch made is sent when it is due; a worker that dies first leaves it ``pending`` in
PostgreSQL, where the recovery finds it overdue and sends it again (``agents.recover``), as a
resumed discovery would.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from sluice.agents.fetch.detail import PageDone, fetch_page
from sluice.agents.fetch.discover import discover
from sluice.agents.fetch.trigger import adopt_trigger, handle_trigger
from sluice.agents.wiring import Wiring, acknowledged
from sluice.errors import TerminalError
from sluice.retries import Policy, retrying
from sluice.schemas.events import BatchOutcome, ItemPage, TriggerRequested
from sluice.schemas.runs import Run
from sluice.storage.items import Retry

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)


def register(app: faust.App, wiring: Wiring) -> None:
    """The ``fetch`` and ``detail`` agents."""
    deps, topics = wiring.deps, wiring.topics

    due_later: set[asyncio.Task[None]] = set()
    send_page = wiring.send_item_page

    def send_when_due(run_id: Any, retry: Retry) -> None:
        async def send() -> None:
            await asyncio.sleep(retry.due_in)
            try:
                await (await send_page(run_id, retry.seq))
            except Exception:
                log.exception(
                    "retry batch %d of run %s not sent; the recovery sends it once it is overdue",
                    retry.seq,
                    run_id,
                )

        task = asyncio.get_running_loop().create_task(send())
        due_later.add(task)
        task.add_done_callback(due_later.discard)

    async def run_discovery(run: Run, trigger: TriggerRequested) -> None:
        await discover(deps, run, send_page, wiring.flush)

    async def fetch_event(event: Any) -> None:
        trigger = await wiring.valid(event, TriggerRequested, "a valid trigger")
        if trigger is None:
            return
        if trigger.run_id is None:
            try:
                trigger = await retrying(
                    "a run for a produced trigger",
                    partial(adopt_trigger, deps, trigger),
                    Policy(attempts=deps.settings.pipeline.apply_attempts),
                    on_retry=deps.metrics.on_retry("trigger"),
                )
            except TerminalError as exc:
                await wiring.dead_letter(event, f"cannot start a run: {exc}")
                return
        await wiring.with_retries(
            "fetch",
            "fetch",
            trigger.run_id,
            event,
            lambda: handle_trigger(deps, trigger, wiring.publish_request, run_discovery),
        )

    async def detail_event(event: Any) -> None:
        page = await wiring.valid(event, ItemPage, "a valid item page")
        if page is None:
            return
        done: list[PageDone] = []

        async def work() -> None:
            done.append(await fetch_page(deps, page, wiring.plans))

        if not await wiring.with_retries("item details", "detail", page.run_id, event, work):
            deps.metrics.batch_done(BatchOutcome.DEAD)
        elif (retry := done[-1].retry) is not None:
            send_when_due(page.run_id, retry)

    @app.agent(topics.triggers, name="fetch")
    async def fetch_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, fetch_event)

    @app.agent(topics.items, name="detail")
    async def detail_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            await acknowledged(event, detail_event)
