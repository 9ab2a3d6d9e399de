"""Project: AT Protocol records into importers' own tables, through the same mapping and
set-based upsert as files.

``atproto.records`` decides what is newer (revs, tombstones, deleted accounts); a projection
follows what it applied, in the same transaction: the writes it made are mapped and upserted
into each importer that names their collection, and the records it removed are removed there
too. A record that fails the importer's mapping or the database's checks is not projected and
is logged with the reason (there is no run to hold it in the row log).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import orjson

from sluice.agents.split.map import RecordMapper
from sluice.agents.split.plan import plan_for
from sluice.schemas.formats import ParsedRow
from sluice.schemas.importers import Importer
from sluice.storage.atproto import ApplyCounts, RecordWrite, remove_projected
from sluice.storage.writer import BatchApplier, TargetPlan

log = logging.getLogger(__name__)


def record_row(write: RecordWrite) -> dict[str, object]:
    """What the importer's mapping sees for one record."""
    return {
        **write.record,
        "did": write.did,
        "collection": write.collection,
        "rkey": write.rkey,
        "uri": write.uri,
        "rev": write.rev,
        "cid": write.cid,
    }


@dataclass
class Projections:
    importers: Sequence[Importer]
    applier: BatchApplier
    plans: dict[str, TargetPlan] = field(default_factory=dict)

    def plan(self, importer: Importer) -> TargetPlan:
        found = self.plans.get(importer.slug)
        if found is None:
            found = self.plans[importer.slug] = plan_for(importer)
        return found

    async def apply(self, conn: asyncpg.Connection, counts: ApplyCounts) -> int:
        """Project what ``counts`` says was written and removed; returns rows projected."""
        projected = 0
        for importer in self.importers:
            wanted = set(importer.firehose)
            writes = [w for w in counts.written if w.collection in wanted]
            plan = self.plan(importer)
            if counts.removed:
                await remove_projected(conn, plan, counts.removed)
            if not writes:
                continue
            rows = [ParsedRow(n, record_row(w)) for n, w in enumerate(writes, 1)]
            records, failures = RecordMapper(importer, None).map_rows(rows)
            text = orjson.dumps(records, default=str).decode()
            stmts = self.applier.statements(plan)
            result = await self.applier.apply_rows(conn, stmts, text, records, dry_run=False)
            failures.extend(result.failures)
            for f in failures[:5]:
                log.warning(
                    "projection %s: record %s not projected: %s",
                    importer.slug,
                    writes[f.row_number - 1].uri,
                    f.reason,
                )
            projected += len(records) - len(result.failures)
        return projected


def projections_for(importers: Sequence[Importer], applier: BatchApplier) -> Projections:
    """The importers among ``importers`` that project AT Protocol collections into their
    tables."""
    return Projections([i for i in importers if i.firehose], applier)
