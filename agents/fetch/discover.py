"""Discover: walk a paginated API's list pages, record every item as ``pending`` and send the
new items of each page, in batches of ``ApiSource.detail_batch``, to the items topic for the
detail agent.

The page's items and the cursor after it are written in one transaction, so an interrupted
discovery resumes at the first page it had not recorded and no page before it is listed again.
One discovery per run at a time across the cluster (a PostgreSQL lock held on its connection:
a worker that dies releases it with its connection).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sluice.agents.deps import Deps
from sluice.agents.fetch.base import dig
from sluice.agents.split.plan import plan_for
from sluice.errors import SourceError
from sluice.schemas.runs import Run
from sluice.schemas.sources import ApiSource
from sluice.storage.ratelimit import RateStats
from sluice.storage.tables import ensure_table
from sluice.streams.publish import Deliveries

log = logging.getLogger(__name__)

SendPage = Callable[[uuid.UUID, int], Awaitable[Awaitable[Any]]]
"""Sends one item page; returns the message's delivery (see streams.publish)."""
Flush = Callable[[], Awaitable[None]]


def api_source_of(deps: Deps, slug: str) -> ApiSource:
    pull = deps.registry.get(slug).pull
    if not isinstance(pull, ApiSource):
        raise SourceError(f"importer {slug!r} has no paginated API source (pull=ApiSource(...))")
    return pull


async def _since(deps: Deps, run: Run) -> Any:
    """Where an incremental run's listing starts: the cursor the importer's last completed run
    reached, else the source's ``initial``; None (everything) for a source that is not
    incremental, a run asked ``full``, and a full refresh (it must see every item)."""
    incremental = api_source_of(deps, run.importer).incremental
    fresh = deps.registry.get(run.importer).fresh or run.options.get("fresh")
    if incremental is None or run.options.get("full") or fresh:
        return None
    found, reached = await deps.runs.last_cursor(run.importer)
    return reached if found else incremental.initial


async def discover(deps: Deps, run: Run, send_page: SendPage, flush: Flush) -> None:
    importer = deps.registry.get(run.importer)
    source = api_source_of(deps, run.importer)
    runs = deps.runs
    items = deps.items
    plan = plan_for(importer)
    pool = deps.pool
    async with pool.acquire() as conn:
        await ensure_table(conn, plan)
    await runs.save_plan(run.id, plan.to_json(), {})
    async with items.discovery_lock(run.id):
        deliveries = Deliveries(f"discovery of run {run.id}")
        parent = run.options.get("retry_of")
        if parent:
            # A retry: the parent's failed items, fetched again.
            batches = await items.copy_failed(run.id, uuid.UUID(parent), source.pagination.size)
            for unfinished in await items.unfinished_pages(run.id):
                deliveries.track(await send_page(run.id, unfinished))
            await flush()
            await deliveries.confirm()
            total = (await items.discovery(run.id, {})).items
            await runs.finish_split(run.id, total, batches)
            return
        client = deps.api_clients.get(importer.slug, source)
        found = await items.discovery(run.id, client.first_state(await _since(deps, run)))
        if source.incremental is not None:
            await runs.record_cursor(run.id, found.state.get("since"))
        if found.pages:
            log.info("run %s: discovery resumes after %d pages", run.id, found.pages)
        # Pages recorded before a crash may never have been sent, or never applied.
        for unfinished in await items.unfinished_pages(run.id):
            deliveries.track(await send_page(run.id, unfinished))
        stats = RateStats()
        while not found.done:
            status = await runs.record_split_progress(run.id, found.items, 0.0)
            if status is None or status.terminal:
                log.info("run %s is %s; discovery stops", run.id, status)
                return
            page = await client.list_page(found.state, stats)
            ids = []
            for n, item in enumerate(page.items, 1):
                external_id = dig(item, source.id_path)
                if external_id is None or isinstance(external_id, (dict, list)):
                    raise SourceError(
                        f"item {n} of page {found.pages + 1} has no id at {source.id_path!r}; "
                        "set ApiSource.id_path to the field that identifies an item"
                    )
                ids.append(str(external_id))
            spent = stats.take()
            found, seqs = await items.record_page(
                run.id,
                found,
                ids,
                page.items,
                page.next_state,
                page.done,
                (spent.hits, spent.sleeps, spent.slept),
                source.detail_batch,
            )
            for seq in seqs:
                deliveries.track(await send_page(run.id, seq))
            deliveries.check()
        await flush()
        # The pages confirmed by the broker before the totals say they exist; a refused one
        # raises, and discovery is done again (it sends the pages not applied yet once more).
        await deliveries.confirm()
        if source.incremental is not None:
            await runs.record_cursor(run.id, found.state.get("since"), found.state.get("reached"))
        await runs.finish_split(run.id, found.items, found.batches)
        log.info("run %s: discovered %d items on %d pages", run.id, found.items, found.pages)
