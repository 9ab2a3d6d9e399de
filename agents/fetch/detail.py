"""Detail: for each page of discovered items, fetch every item's detail (under the cluster's
rate limit), map it into a record and apply the page as one batch through the same writer as
files. The items' states are written in the batch's transaction: a redelivered page changes
nothing, and a completed item is never fetched again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.agents.deps import Deps
from sluice.agents.fetch.api import DetailResult
from sluice.agents.fetch.discover import api_source_of
from sluice.agents.plans import PlanCache
from sluice.agents.split.map import RecordMapper
from sluice.schemas.events import BatchOutcome, ItemPage, RowBatch
from sluice.schemas.formats import ParsedRow
from sluice.schemas.importers import Importer
from sluice.schemas.runs import ItemStatus, RowFailure
from sluice.schemas.sources import ApiSource
from sluice.storage.items import Item, ItemOutcome, finish_items
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
    items = await deps.items.page(page.run_id, page.seq)
    todo = [i for i in items if i.status in (ItemStatus.PENDING, ItemStatus.PROCESSING)]
    if not todo:
        deps.metrics.batch_done(BatchOutcome.DUPLICATE)
        return BatchOutcome.DUPLICATE
    await deps.items.mark_processing(page.run_id, [i.external_id for i in todo])
    stats = RateStats()
    results = await _fetch_details(deps, run.importer, todo, stats)
    mapped = _map_items(
        deps.registry.get(run.importer), api_source_of(deps, run.importer), todo, results
    )
    spent = stats.take()
    logged = 0  # failures newly in the row log (none when the page was applied before)

    async def also(conn: Any) -> None:
        nonlocal logged
        if mapped.failures:
            logged = await insert_row_failures(
                conn, page.run_id, mapped.failures, count_processed=True
            )
        await finish_items(
            conn, page.run_id, mapped.outcomes, (spent.hits, spent.sleeps, spent.slept)
        )

    records = orjson.dumps(mapped.records, default=_json_default).decode()
    applied = await deps.applier.apply(
        RowBatch(page.run_id, page.seq, records), plan, dry_run=dry_run, also=also
    )
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
        len(mapped.failures),
        outcome,
    )
    return outcome


async def _fetch_details(
    deps: Deps, slug: str, todo: list[Item], stats: RateStats
) -> list[DetailResult]:
    """Every item's detail, at most ``concurrency`` requests at a time (a source without a
    detail endpoint has its items complete from the list)."""
    source = api_source_of(deps, slug)
    client = deps.api_clients.get(slug, source)
    gate = asyncio.Semaphore(source.concurrency)

    async def one(external_id: str) -> DetailResult:
        if source.detail_path is None:
            return DetailResult(detail=None)
        async with gate:
            return await client.fetch_detail(external_id, stats)

    return list(await asyncio.gather(*(one(i.external_id) for i in todo)))


@dataclass
class _Mapped:
    """A page's items as records for the writer, the rejected ones for the row log, and what
    became of each item."""

    records: list[dict[str, Any]]
    failures: list[RowFailure]
    outcomes: list[ItemOutcome]


def _map_items(
    importer: Importer, source: ApiSource, todo: list[Item], results: list[DetailResult]
) -> _Mapped:
    """Map each fetched item through the source's mapping and the importer's fields; an item
    whose fetch failed, whose mapping raised, or whose record the fields refuse is rejected
    alone, with its reason."""
    by_ordinal = {i.ordinal: i for i in todo}
    failed: dict[int, str] = {}
    parsed: list[ParsedRow] = []
    for item, result in zip(todo, results, strict=True):
        if result.error is not None:
            failed[item.ordinal] = result.error
            continue
        try:
            parsed.append(ParsedRow(item.ordinal, source.map(item.data, result.detail)))
        except Exception as exc:  # the importer's mapping raised: this item only is rejected
            failed[item.ordinal] = f"mapping failed: {type(exc).__name__}: {exc}"
    records, rejected = RecordMapper(importer, None).map_rows(parsed)
    failures = [
        RowFailure(o, 0, {"id": by_ordinal[o].external_id, "item": by_ordinal[o].data}, why)
        for o, why in failed.items()
    ]
    for f in rejected:
        failed[f.row_number] = f.reason
        failures.append(f)
    outcomes = [
        ItemOutcome(
            item.external_id,
            completed=item.ordinal not in failed,
            failures=result.failures,
            error=failed.get(item.ordinal) or result.last_error,
        )
        for item, result in zip(todo, results, strict=True)
    ]
    return _Mapped(records, failures, outcomes)
