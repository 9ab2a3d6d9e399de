"""Detail: for each page of discovered items, fetch every item's detail (under the cluster's
rate limit), map it into a record and apply the page as one batch through the same writer as
files. The items' states are written in the batch's transaction: a redelivered page changes
nothing, and a completed item is never fetched again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from sluice.agents.deps import Deps
from sluice.agents.fetch.api import DetailResult
from sluice.agents.fetch.discover import api_source_of
from sluice.agents.plans import PlanCache
from sluice.agents.split.map import RecordMapper
from sluice.schemas.events import BatchOutcome, ItemPage, RowBatch
from sluice.schemas.formats import ParsedRow
from sluice.schemas.runs import ItemStatus, RowFailure
from sluice.storage.items import ItemOutcome, finish_items
from sluice.storage.ratelimit import RateStats
from sluice.storage.runs import insert_row_failures

log = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    return str(value)


async def fetch_page(deps: Deps, page: ItemPage, plans: PlanCache) -> BatchOutcome:
    """Returns APPLIED, DUPLICATE (nothing left to do) or INACTIVE (the run is finished), and
    counts the page as a batch in ``deps.metrics``."""
    status, plan, dry_run = await plans.get(deps, page.run_id)
    if plan is None:
        if status.terminal:
            deps.metrics.batch_done(BatchOutcome.INACTIVE)
            return BatchOutcome.INACTIVE
        raise RuntimeError(f"run {page.run_id} has no plan yet")
    run = await deps.runs.get(page.run_id)
    if run is None or run.status.terminal:
        deps.metrics.batch_done(BatchOutcome.INACTIVE)
        return BatchOutcome.INACTIVE
    importer = deps.registry.get(run.importer)
    source = api_source_of(deps, run.importer)
    repo = deps.items
    items = await repo.page(page.run_id, page.seq)
    todo = [i for i in items if i.status in (ItemStatus.PENDING, ItemStatus.PROCESSING)]
    if not todo:
        deps.metrics.batch_done(BatchOutcome.DUPLICATE)
        return BatchOutcome.DUPLICATE
    await repo.mark_processing(page.run_id, [i.external_id for i in todo])
    client = deps.api_clients.get(importer.slug, source)
    stats = RateStats()
    gate = asyncio.Semaphore(source.concurrency)

    async def one(external_id: str) -> DetailResult:
        if source.detail_path is None:
            return DetailResult(detail=None)
        async with gate:
            return await client.fetch_detail(external_id, stats)

    results = await asyncio.gather(*(one(i.external_id) for i in todo))
    by_ordinal = {i.ordinal: i for i in todo}
    failed: dict[int, tuple[DetailResult | None, str]] = {}
    parsed: list[ParsedRow] = []
    for item, result in zip(todo, results, strict=True):
        if result.error is not None:
            failed[item.ordinal] = (result, result.error)
            continue
        try:
            parsed.append(ParsedRow(item.ordinal, source.map(item.data, result.detail)))
        except Exception as exc:  # the importer's mapping raised: this item only is rejected
            failed[item.ordinal] = (result, f"mapping failed: {type(exc).__name__}: {exc}")
    records, rejected = RecordMapper(importer, None).map_rows(parsed)
    failures = [
        RowFailure(o, 0, {"id": by_ordinal[o].external_id, "item": by_ordinal[o].data}, why)
        for o, (_, why) in failed.items()
    ]
    for f in rejected:
        failed[f.row_number] = (None, f.reason)
        failures.append(f)
    outcomes = []
    for item, result in zip(todo, results, strict=True):
        reason = failed.get(item.ordinal, (None, None))[1]
        outcomes.append(
            ItemOutcome(
                item.external_id,
                completed=reason is None,
                failures=result.failures,
                error=reason or result.last_error,
            )
        )
    spent = stats.take()
    logged = 0  # failures newly in the row log (none when the page was applied before)

    async def also(conn: Any) -> None:
        nonlocal logged
        if failures:
            logged = await insert_row_failures(conn, page.run_id, failures, count_processed=True)
        await finish_items(conn, page.run_id, outcomes, (spent.hits, spent.sleeps, spent.slept))

    batch = RowBatch(page.run_id, page.seq, orjson.dumps(records, default=_json_default).decode())
    applier = deps.applier
    applied = await applier.apply(batch, plan, dry_run=dry_run, also=also)
    outcome = applied.outcome
    if outcome is BatchOutcome.APPLIED:
        deps.metrics.batch_done(outcome, applied, dry_run=dry_run)
        deps.metrics.rows_rejected(logged, dry_run=dry_run)
    else:
        deps.metrics.batch_done(outcome)
    log.info(
        "run %s page %d: %d items, %d failed: %s",
        page.run_id,
        page.seq,
        len(todo),
        len(failures),
        outcome,
    )
    return outcome
