"""Plan: the target of a run. The importer (an ad-hoc import's inferred from the sample of its
file), the table plan (created when missing; an ad-hoc import's table evolved for the file
first), the lookups checked, and the batching kept with the run's plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sluice.agents.deps import Deps
from sluice.agents.split.evolve import SchemaChange, evolve_table
from sluice.agents.split.infer import (
    DEFAULT_NULL_MARKERS,
    adhoc_importer,
    infer_fields,
    to_existing_columns,
)
from sluice.agents.split.map import RecordMapper, cell_text
from sluice.agents.split.parse import ParsedFile
from sluice.agents.split.read import Reading, RunReading
from sluice.agents.split.route import BatchRouter
from sluice.errors import FileFormatError, MappingError, TerminalError
from sluice.schemas.events import ImportRequested
from sluice.schemas.formats import ParsedRow, RowProblem
from sluice.schemas.importers import ADHOC, Importer
from sluice.storage.lookups import LookupResolver
from sluice.storage.tables import describe_table, ensure_table, has_unique_key
from sluice.storage.writer import ROW, SUB, Refresh, TargetPlan
from sluice.streams.kafka import RECORD_OVERHEAD


def plan_for(importer: Importer) -> TargetPlan:
    return TargetPlan(
        table=importer.table,
        schema=importer.schema,
        columns=tuple((f.name, f.pg_type) for f in importer.output_fields()),
        key=importer.key_columns,
        policy=importer.policy,
        version_column=importer.version_column,
        lookups=importer.lookups,
    )


async def resolve_importer(
    deps: Deps,
    request: ImportRequested,
    parsed_header: list[str] | None,
    sample: list[ParsedRow],
    *,
    delimiter: str | None = None,
    readings: dict[str, Reading] | None = None,
) -> Importer:
    """The run's importer: its registered one with the run's readings (``--date-format``,
    ``--decimal-comma``), or for an ad-hoc import one inferred from the sample; ``readings``
    receives the readings inference chose (and why), by column."""
    try:
        run = RunReading.of(request.options)
    except ValueError as exc:
        raise MappingError(str(exc)) from None
    if request.importer != ADHOC:
        return run.apply(deps.registry.get(request.importer))
    table = request.options.get("table")
    key = request.options.get("key") or []
    schema = request.options.get("schema", "public")
    nulls = tuple(request.options.get("null_markers", DEFAULT_NULL_MARKERS))
    if not table or not key:
        raise MappingError("an ad-hoc import needs a table and at least one key column")
    nested: set[str] = set()
    if parsed_header is None:
        keys = {k for r in sample if isinstance(r.values, dict) for k in r.values}
        header = sorted(keys)
        objects = [r.values for r in sample if isinstance(r.values, dict)]
        rows = [[cell_text(o.get(h)) for h in header] for o in objects]
        nested = _nested_columns(header, objects)
    else:
        header = parsed_header
        rows = [[cell_text(v) for v in r.values] for r in sample if isinstance(r.values, list)]
    # JSON keeps its strings ("NA" is a value there; JSON has null): no markers for it.
    inferred: dict[str, Reading] = {}
    fields = infer_fields(
        header,
        rows,
        nulls if parsed_header is not None else (),
        run,
        semicolons=delimiter == ";",
        readings=inferred,
    )
    if nested:  # JSON objects and arrays land as jsonb, not as their text
        fields = [
            dataclasses.replace(f, type="jsonb") if f.aliases[0] in nested else f for f in fields
        ]
    pool = deps.pool
    async with pool.acquire() as conn:
        existing = await describe_table(conn, schema, table)
        if existing is not None:
            renamed = to_existing_columns(fields, [c for c, _ in existing])
            names = {f.name: r.name for f, r in zip(fields, renamed, strict=True)}
            inferred = {names.get(n, n): r for n, r in inferred.items()}
            fields = renamed
        if readings is not None:
            readings.update(inferred)
        importer = adhoc_importer(table, key, fields, schema=schema, null_markers=nulls)
        if existing is not None and not await has_unique_key(
            conn, schema, table, importer.key_columns
        ):
            cols = ", ".join(importer.key_columns)
            raise MappingError(
                f"table {schema}.{table} has no primary key or unique index on ({cols}); "
                f"add one (ALTER TABLE {schema}.{table} ADD PRIMARY KEY ({cols})) or pick a "
                "--key that has one"
            )
    return importer


def _nested_columns(header: list[str], objects: list[dict[str, Any]]) -> set[str]:
    """The keys whose every non-null value in the sample is a JSON object or array."""
    out = set()
    for key in header:
        values = [o[key] for o in objects if o.get(key) is not None]
        if values and all(isinstance(v, (dict, list)) for v in values):
            out.add(key)
    return out


def refresh_for(importer: Importer, request: ImportRequested) -> Refresh | None:
    """A full refresh when the importer always refreshes or the run asked for one."""
    if not (importer.fresh or request.options.get("fresh")):
        return None
    return Refresh(
        scope=importer.refresh_scope,
        soft_delete=importer.soft_delete_column,
        max_failed=importer.refresh_max_failed,
    )


async def table_plan(
    deps: Deps,
    importer: Importer,
    request: ImportRequested,
    mapper: RecordMapper,
    sample: list[ParsedRow],
) -> tuple[TargetPlan, list[SchemaChange]]:
    """The run's target, created when missing. An ad-hoc import first evolves the table for the
    file (see sluice.agents.split.evolve) and targets the columns the table then has."""
    plan = dataclasses.replace(plan_for(importer), refresh=refresh_for(importer, request))
    pool = deps.pool
    if importer.slug != ADHOC:
        async with pool.acquire() as conn:
            await ensure_table(conn, plan)
        return plan, []
    records, _ = mapper.map_rows(sample)
    samples = {f.name: [cell_text(r.get(f.name)) for r in records] for f in importer.fields}
    async with pool.acquire() as conn:
        changes = await evolve_table(
            conn,
            importer.schema,
            importer.table,
            importer.fields,
            samples,
            create_sql=plan.create_table_sql(),
            apply=request.options.get("evolve", True) and not request.dry_run,
        )
        existing = await describe_table(conn, importer.schema, importer.table)
    types = dict(existing or [])
    columns = tuple((c, types[c]) for c, _ in plan.columns if c in types)
    return dataclasses.replace(plan, columns=columns), changes


async def refuse_table_without_sample(
    deps: Deps, importer: Importer, head: list[ParsedRow | RowProblem]
) -> None:
    """An ad-hoc table is made from the rows of the sample: when none of them could be read,
    there is nothing to infer its types from, and a table of text columns would stay behind.
    A table that exists already takes the rows (and rejects the bad ones) as usual."""
    async with deps.pool.acquire() as conn:
        if await describe_table(conn, importer.schema, importer.table) is not None:
            return
    first = next(r for r in head if isinstance(r, RowProblem))
    raise FileFormatError(
        f"none of the first {len(head)} records could be read, so there is nothing to infer "
        f"the columns of {importer.schema}.{importer.table} from (record {first.number}: "
        f"{first.reason}). Fix the file, or create the table yourself and import into it"
    )


def text_batch_columns(
    mapper: RecordMapper, plan: TargetPlan, parsed: ParsedFile
) -> tuple[str, ...] | None:
    """The columns of COPY batches, when this file's records stay text (a delimited file that
    ``RecordMapper.map_text`` can map) and the plan can apply them by COPY; else None."""
    names = mapper.text_names()
    if parsed.sniffed.format != "csv" or names is None or not plan.copyable:
        return None
    if not set(names) <= {c for c, _ in plan.columns}:  # a column the table does not have
        return None
    return (ROW, SUB, *names)


async def check_lookups(deps: Deps, plan: TargetPlan) -> None:
    """A lookup that cannot work (no such table or column) fails the run here, before any
    batch: batches resolve their lookups as they are applied."""
    if plan.lookups:
        async with deps.pool.acquire() as conn:
            await LookupResolver(plan.lookups).prepare(conn)


async def kept_batching(
    deps: Deps,
    request: ImportRequested,
    importer: Importer,
    mapper: RecordMapper,
    plan: TargetPlan,
    parsed: ParsedFile,
    range_bytes: int = 0,
) -> BatchRouter:
    """Save the run's plan with its batching, and return the router that cuts the batches so.

    How the file is cut into batches is fixed by the run's first split: a split done again
    (after a crash, or by a worker with other settings or a newer version) must give every
    batch number the same rows, or the markers of batches applied before would skip rows.
    ``range_bytes``: the ranges the file may be read by (see ``ranges``), 0 if it may not."""
    settings = deps.settings
    runs = deps.runs
    text_columns = (
        text_batch_columns(mapper, plan, parsed) if settings.pipeline.copy_batches else None
    )
    _, _, saved = await runs.plan(request.run_id)
    cutting = (saved or {}).get("batching") or {
        "size": importer.batch_size or settings.pipeline.batch_size,
        "partitions": settings.kafka.partitions,
        "max_bytes": settings.kafka.max_message_bytes - RECORD_OVERHEAD,
        "copy": text_columns is not None,
        "ranges": range_bytes if text_columns is not None else 0,
    }
    if cutting["copy"] and text_columns is None:
        raise TerminalError(
            "this run's first split sent its rows as COPY batches, which this worker cannot "
            "make for it; import the file again as a new run"
        )
    await runs.save_plan(request.run_id, {**plan.to_json(), "batching": cutting}, mapper.mapping)
    return BatchRouter(
        plan.key,
        cutting["partitions"],
        cutting["size"],
        cutting["max_bytes"],
        text_columns if cutting["copy"] else None,
        ranges=cutting.get("ranges", 0),  # a run planned before ranges reads its file whole
    )
