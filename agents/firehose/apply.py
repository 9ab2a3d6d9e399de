"""Firehose: apply AT Protocol events from the firehose topic to ``atproto.records``, a batch
of events per transaction (``storage.atproto``: revs decide, so redelivery and replays change
nothing). Events that do not validate go to the dead-letter topic with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from pydantic import ValidationError

from sluice.agents.deps import Deps
from sluice.agents.firehose.project import Projections
from sluice.retries import retrying
from sluice.schemas.firehose import JetstreamEvent, parse_event
from sluice.storage.atproto import ApplyCounts, apply_events
from sluice.storage.db import CONFLICT

log = logging.getLogger(__name__)


def parse_events(
    values: Sequence[bytes | None],
) -> tuple[list[JetstreamEvent], list[tuple[int, str]]]:
    """The valid events, and (index, reason) for each value that is not one."""
    events: list[JetstreamEvent] = []
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            events.append(parse_event(value or b""))
        except ValidationError as exc:
            bad.append((i, describe(exc)))
    return events, bad


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    return "not a Jetstream event: " + "; ".join(parts)


async def apply_firehose(
    deps: Deps, projections: Projections, events: Sequence[JetstreamEvent]
) -> ApplyCounts:
    """Apply ``events`` in one transaction (with the importers' projections of them), and count
    them in ``deps.metrics``."""
    if not events:
        return ApplyCounts()
    counts = await _apply_serializable(deps, projections, events)
    deps.metrics.firehose_applied(counts.applied, counts.skipped, counts.deleted)
    return counts


async def _apply_serializable(
    deps: Deps, projections: Projections, events: Sequence[JetstreamEvent]
) -> ApplyCounts:
    # A concurrent write of the same record (a backfill page) won: apply again.
    return await retrying(
        "firehose batch (serializable)",
        partial(_apply_once, deps, projections, events),
        replace(CONFLICT, attempts=21),
        on_retry=deps.metrics.on_retry("firehose"),
    )


async def _apply_once(
    deps: Deps, projections: Projections, events: Sequence[JetstreamEvent]
) -> ApplyCounts:
    pool = deps.pool
    # Serializable: a backfill page and a live delete of the same record in two concurrent
    # transactions would each miss the other's uncommitted row (write skew) and bring the
    # record back; PostgreSQL aborts one of them instead, and it is applied again.
    async with pool.acquire() as conn, conn.transaction(isolation="serializable"):
        counts = await apply_events(conn, events)
        if projections.importers:
            await projections.apply(conn, counts)
    log.debug(
        "firehose batch of %d: %d applied, %d skipped, %d deleted",
        len(events),
        counts.applied,
        counts.skipped,
        counts.deleted,
    )
    return counts
