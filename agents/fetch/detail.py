"""Detail: for each batch of discovered items, fetch every item's detail once (under the
cluster's rate limit), map it into a record and apply the batch through the same writer as
files. The items' states are written in the batch's transaction: a redelivered batch changes
nothing, and a completed item is never fetched again.

An item whose fetch failed in a way that may pass is not retried in its batch: it moves, in the
same transaction, to a retry batch due after its backoff (``storage.items.finish_items``), which
the caller sends when it is due. Its batch and its worker go on with other items meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sluice.agents.deps import Deps
from sluice.agents.fetch.api import DetailResult
from sluice.agents.fetch.discover import api_source_of
from sluice.agents.plans import PlanCache
from sluice.agents.split.map import RecordMapper
from sluice.retries import backoff
from sluice.schemas.events import BatchOutcome, ItemPage, RowBatch
from sluice.schemas.formats import ParsedRow
from sluice.schemas.importers import Importer
from sluice.schemas.runs import ItemStatus, RowFailure
from sluice.schemas.sources import ApiSource
from sluice.storage.items import Item, ItemOutcome, Retry, finish_items
from sluice.storage.ratelimit import RateStats
from sluice.storage.runs import insert_row_failures

log = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    return str(value)


@dataclass(frozen=True)
class PageDone:
    """What became of an item batch, and the retry batch it made (to send when due)."""

    outcome: BatchOutcome
    retry: Retry | None = None


async def fetch_page(deps: Deps, page: ItemPage, plans: PlanCache) -> PageDone:
    """The outcome is APPLIED, DUPLICATE (nothing left to do) or INACTIVE (the run is
    finished); the batch is counted in ``deps.metrics``."""
    status, plan, dry_run = await plans.get(deps, page.run_id)
    if plan is None:
        if status.terminal:
            deps.metrics.batch_done(BatchOutcome.INACTIVE)
            return PageDone(BatchOutcome.INACTIVE)
        raise RuntimeError(f"run {page.run_id} has no plan yet")
    run = await deps.runs.get(page.run_id)
    if run is None or run.status.terminal:
        deps.metrics.batch_done(BatchOutcome.INACTIVE)
        return PageDone(BatchOutcome.INACTIVE)
    items = await deps.items.page(page.run_id, page.seq)
    todo = [i for i in items if i.status in (ItemStatus.PENDING, ItemStatus.PROCESSING)]
    if not todo:
        deps.metrics.batch_done(BatchOutcome.DUPLICATE)
        return PageDone(BatchOutcome.DUPLICATE)
    source = api_source_of(deps, run.importer)
    await _until_due(todo, source)
    await deps.items.mark_processing(page.run_id, [i.external_id for i in todo])
    stats = RateStats()
    results = await _fetch_details(deps, run.importer, todo, stats)
    mapped = _map_items(deps.registry.get(run.importer), source, todo, results)
    spent = stats.take()
    logged = 0  # failures newly in the row log (none when the page was applied before)
    retry: Retry | None = None

    async def also(conn: Any) -> None:
        nonlocal logged, retry
        if mapped.failures:
            logged = await insert_row_failures(
                conn, page.run_id, mapped.failures, count_processed=True
            )
        retry = await finish_items(
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
        "run %s item batch %d: %d items, %d failed, %d to retry: %s",
        page.run_id,
        page.seq,
        len(todo),
        len(mapped.failures),
        sum(1 for o in mapped.outcomes if o.retry_in is not None),
        outcome,
    )
    return PageDone(outcome, retry if outcome is BatchOutcome.APPLIED else None)


async def _until_due(todo: list[Item], source: ApiSource) -> None:
    """Wait until a retry batch is due: it comes early only when it was sent again (by a
    resumed discovery, after a crash) before its time."""
    due = max((i.retry_at for i in todo if i.retry_at is not None), default=None)
    if due is not None:
        wait = (due - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, source.backoff_max))


async def _fetch_details(
    deps: Deps, slug: str, todo: list[Item], stats: RateStats
) -> list[DetailResult]:
    """One attempt at every item's detail, at most ``concurrency`` requests at a time (a
    source without a detail endpoint has its items complete from the list)."""
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
    whose fetch failed for good (or ran out of attempts), whose mapping raised, or whose
    record the fields refuse is rejected alone, with its reason. An item whose fetch may pass
    another time, with attempts left, is neither: it is to be tried again after its backoff."""
    by_ordinal = {i.ordinal: i for i in todo}
    failed: dict[int, str] = {}
    again: dict[int, float] = {}
    parsed: list[ParsedRow] = []
    for item, result in zip(todo, results, strict=True):
        attempts = item.failure_count + result.failures
        if result.transient and attempts < source.max_attempts:
            again[item.ordinal] = backoff(attempts, first=source.backoff, cap=source.backoff_max)
        elif result.transient:
            failed[item.ordinal] = f"{result.error} ({attempts} attempts)"
        elif result.error is not None:
            failed[item.ordinal] = result.error
        else:
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
            completed=item.ordinal not in failed and item.ordinal not in again,
            failures=result.failures,
            error=failed.get(item.ordinal) or result.error,
            retry_in=again.get(item.ordinal),
        )
        for item, result in zip(todo, results, strict=True)
    ]
    return _Mapped(records, failures, outcomes)
