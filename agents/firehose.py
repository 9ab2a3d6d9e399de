"""Firehose: apply AT Protocol events from the firehose topic to ``atproto.records``, a batch
of events per transaction (``storage.atproto``: revs decide, so redelivery and replays change
nothing). Events that do not validate go to the dead-letter topic with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError

from schemas.firehose import JetstreamEvent
from sluice.runtime import Runtime
from storage.atproto import ApplyCounts, apply_events

log = logging.getLogger(__name__)


def parse_events(
    values: Sequence[bytes | None],
) -> tuple[list[JetstreamEvent], list[tuple[int, str]]]:
    """The valid events, and (index, reason) for each value that is not one."""
    events: list[JetstreamEvent] = []
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            events.append(JetstreamEvent.model_validate_json(value or b""))
        except ValidationError as exc:
            bad.append((i, describe(exc)))
    return events, bad


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    return "not a Jetstream event: " + "; ".join(parts)


async def apply_firehose(rt: Runtime, events: Sequence[JetstreamEvent]) -> ApplyCounts:
    if not events:
        return ApplyCounts()
    pool = await rt.pool()
    projections = await rt.projections()
    async with pool.acquire() as conn, conn.transaction():
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
