"""Split: stream a stored file, map and validate its rows, and send row batches routed by key.

The request's offset is committed only after the split returns, so a worker that dies mid-file
splits it again from the start: batch identities (run id + sequence) are deterministic, and the
batches already applied are skipped by their markers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import operator
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from sluice.agents.deps import Deps
from sluice.agents.split.evolve import SchemaChange, evolve_table
from sluice.agents.split.infer import (
    DEFAULT_NULL_MARKERS,
    adhoc_importer,
    infer_fields,
    to_existing_columns,
)
from sluice.agents.split.map import Record, RecordMapper, cell_text
from sluice.agents.split.parse import ParsedFile, parse_file
from sluice.errors import FileFormatError, MappingError, TerminalError
from sluice.schemas.events import ImportRequested, encode_copy_batch
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem
from sluice.schemas.importers import ADHOC, Importer, normalize_header
from sluice.storage.lookups import LookupResolver
from sluice.storage.runs import RunRepository
from sluice.storage.tables import describe_table, ensure_table, has_unique_key
from sluice.storage.writer import ROW, SUB, Refresh, TargetPlan
from sluice.streams.kafka import RECORD_OVERHEAD
from sluice.streams.publish import Deliveries
from sluice.streams.topics import partition_for_key

log = logging.getLogger(__name__)

SendBatch = Callable[[int, bytes, bytes], Awaitable[Awaitable[Any]]]
"""Sends one batch to a partition; returns the message's delivery (see streams.publish)."""
Flush = Callable[[], Awaitable[None]]

SAMPLE_ROWS = 1000


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


def _json_default(value: Any) -> Any:
    return str(value)  # Decimal and anything else pydantic produced: its text form


class BatchRouter:
    """Buffers records per partition of their key and hands out full batches in file order.

    Records are dicts (sent as JSON), or, when ``text_columns`` is given, lists of text in that
    order (sent as COPY batches, see RowBatch)."""

    def __init__(
        self,
        key: tuple[str, ...],
        partitions: int,
        batch_size: int,
        max_bytes: int,
        text_columns: tuple[str, ...] | None = None,
    ):
        self.partitions = partitions
        self.max_bytes = max_bytes
        self.buffers: list[list[Any]] = [[] for _ in range(partitions)]
        self.seq = 0
        # Rows per message: the batch size, lowered when rows turn out too wide for a message.
        # It depends only on the file's rows, so a re-split cuts the same batches.
        self.limit = batch_size
        self.text_columns = text_columns
        self._key_of: Callable[[Any], str]
        if text_columns is None:
            self._key_of = lambda record: "\x1f".join(str(record[c]) for c in key)
        else:  # the same key text as the dict of the same row gives
            at = [text_columns.index(c) for c in key]
            if len(at) == 1:
                self._key_of = operator.itemgetter(at[0])
            else:
                self._key_of = lambda row: "\x1f".join(row[i] for i in at)

    def add(self, records: list[Any]) -> list[tuple[int, list[Any]]]:
        """Buffer ``records``; returns the batches they filled, with their partitions."""
        full = []
        buffers, partitions, limit = self.buffers, self.partitions, self.limit
        for record, key in zip(records, map(self._key_of, records), strict=True):
            p = partition_for_key(key, partitions)
            buf = buffers[p]
            buf.append(record)
            if len(buf) >= limit:
                buffers[p] = []
                full.append((p, buf))
        return full

    def encode(self, run_id: str, rows: list[Any]) -> Iterator[tuple[bytes, bytes]]:
        """One or more (key, value) messages for ``rows``, each under the size limit."""
        if self.text_columns is not None:
            value = encode_copy_batch(self.text_columns, rows)
        else:
            value = orjson.dumps(rows, default=_json_default)
        if len(value) > self.max_bytes and len(rows) > 1:
            fits = int(len(rows) * self.max_bytes * 0.8 / len(value))
            self.limit = max(1, min(self.limit, fits, len(rows) // 2))
            # The step is fixed here: a part still too big lowers self.limit again while the
            # loop runs, and a slice that re-read it would leave rows out.
            step = self.limit
            for start in range(0, len(rows), step):
                yield from self.encode(run_id, rows[start : start + step])
            return
        if len(value) > self.max_bytes:
            row = rows[0][0] if self.text_columns is not None else rows[0].get(ROW)
            raise FileFormatError(
                f"row {row} is larger than the {self.max_bytes}-byte "
                "message limit; shorten it or raise SLUICE_KAFKA_MAX_MESSAGE_BYTES"
            )
        key = f"{run_id}:{self.seq}".encode()
        self.seq += 1
        yield key, value


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


async def resolve_importer(
    deps: Deps, request: ImportRequested, parsed_header: list[str] | None, sample: list[ParsedRow]
) -> Importer:
    if request.importer != ADHOC:
        return deps.registry.get(request.importer)
    table = request.options.get("table")
    key = request.options.get("key") or []
    schema = request.options.get("schema", "public")
    nulls = tuple(request.options.get("null_markers", DEFAULT_NULL_MARKERS))
    if not table or not key:
        raise MappingError("an ad-hoc import needs a table and at least one key column")
    if parsed_header is None:
        keys = {k for r in sample if isinstance(r.values, dict) for k in r.values}
        header = sorted(keys)
        rows = [
            [cell_text(r.values.get(h)) for h in header]
            for r in sample
            if isinstance(r.values, dict)
        ]
    else:
        header = parsed_header
        rows = [[cell_text(v) for v in r.values] for r in sample if isinstance(r.values, list)]
    # JSON keeps its strings ("NA" is a value there; JSON has null): no markers for it.
    fields = infer_fields(header, rows, nulls if parsed_header is not None else ())
    pool = deps.pool
    async with pool.acquire() as conn:
        existing = await describe_table(conn, schema, table)
        if existing is not None:
            fields = to_existing_columns(fields, [c for c, _ in existing])
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


def refresh_for(importer: Importer, request: ImportRequested) -> Refresh | None:
    """A full refresh when the importer always refreshes or the run asked for one."""
    if not (importer.fresh or request.options.get("fresh")):
        return None
    return Refresh(
        scope=importer.refresh_scope,
        soft_delete=importer.soft_delete_column,
        max_failed=importer.refresh_max_failed,
    )


async def _table_plan(
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


async def _refuse_table_without_sample(
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


async def describe_source(
    deps: Deps, request: ImportRequested, parsed: ParsedFile, mapper: RecordMapper
) -> dict[str, Any]:
    """The run's provenance: what it read and how the columns were mapped."""
    ref = request.file
    runs = deps.runs
    content_type = await deps.pool.fetchval("SELECT content_type FROM files WHERE id = $1", ref.id)
    columns = dict(mapper.mapping)
    duplicate = await runs.same_file_run(request.importer, ref.sha256, request.run_id)
    return {
        "file": {
            "name": ref.name,
            "size": ref.size,
            "content_type": content_type,
            "compression": ref.compression,
        },
        "sha256": ref.sha256,
        "format": parsed.sniffed.format,
        "delimiter": parsed.sniffed.delimiter,
        "sheet": parsed.sniffed.sheet,
        "encoding": parsed.sniffed.encoding,
        "header": parsed.header,
        "columns": columns,
        # Unpivoted columns map to "value[period]": they are listed in columns, not as aliases.
        "aliases": {
            f: n
            for n, f in columns.items()
            if "[" not in f and normalize_header(n) != normalize_header(f)
        },
        "ignored": [h for h in (parsed.header or []) if h not in columns],
        "duplicate_of": str(duplicate) if duplicate else None,
    }


async def split_file(deps: Deps, request: ImportRequested, send: SendBatch, flush: Flush) -> None:
    """Split one requested import into batches. Terminal problems fail the run with a message
    that says what to fix; anything else propagates (and is retried by the caller)."""
    runs = deps.runs
    run = await runs.start(request.run_id)
    if run is None:
        log.info("run %s is finished or unknown; request ignored", request.run_id)
        return
    try:
        if request.file.encoding_error:
            raise FileFormatError(request.file.encoding_error)
        with tempfile.TemporaryDirectory(prefix="sluice-split-") as tmp:
            path = Path(tmp) / "file"
            await deps.files.download(request.file.id, path)
            with path.open("rb") as raw:
                await _split(deps, runs, request, raw, send, flush)
    except (FileFormatError, TerminalError) as exc:
        log.warning("run %s failed: %s", request.run_id, exc)
        await runs.fail(request.run_id, str(exc))


async def _split(
    deps: Deps,
    runs: RunRepository,
    request: ImportRequested,
    raw: Any,
    send: SendBatch,
    flush: Flush,
) -> None:
    settings = deps.settings
    run_id = request.run_id
    if request.importer != ADHOC:
        options = deps.registry.get(request.importer).format
    else:
        try:
            options = FormatOptions(sheet=request.options.get("sheet"))
        except ValueError as exc:
            raise FileFormatError(str(exc)) from None
    if request.options.get("format") == "jsonl":  # a retry file: the rejected records
        options = FormatOptions(format="jsonl", encoding="utf-8")
    parsed = parse_file(raw, options, encoding=request.file.encoding)
    items = iter(parsed)
    head = list(itertools.islice(items, SAMPLE_ROWS))
    sample = [r for r in head if isinstance(r, ParsedRow)]
    importer = await resolve_importer(deps, request, parsed.header, sample)
    mapper = RecordMapper(importer, parsed.header)
    # A split done again (after a crash, or a retry) finds its schema changes made already:
    # the first report stands.
    earlier_changes = list(await runs.schema_changes(run_id))
    provenance = await describe_source(deps, request, parsed, mapper)
    provenance["schema_changes"] = earlier_changes
    await runs.save_provenance(run_id, provenance)
    if provenance["duplicate_of"] and importer.skip_duplicate_files:
        log.info("run %s: the same file as run %s; skipped", run_id, provenance["duplicate_of"])
        await runs.finish_split(run_id, 0, 0)
        return
    # Nothing is created from a file without a row: an ad-hoc table made from a header alone
    # would have only text columns, and every later file into it would keep them.
    if not head:
        raise FileFormatError(
            "the file has a header but no data rows" if parsed.header else "the file has no rows"
        )
    if importer.slug == ADHOC and not sample:
        await _refuse_table_without_sample(deps, importer, head)
    plan, changes = await _table_plan(deps, importer, request, mapper, sample)
    if plan.lookups:
        # A lookup that cannot work (no such table or column) fails the run here, before any
        # batch: batches resolve their lookups as they are applied.
        async with deps.pool.acquire() as conn:
            await LookupResolver(plan.lookups).prepare(conn)
    provenance["schema_changes"] = [c.to_json() for c in changes] or earlier_changes
    await runs.save_provenance(run_id, provenance)
    text_columns = (
        text_batch_columns(mapper, plan, parsed) if settings.pipeline.copy_batches else None
    )
    # How the file is cut into batches is fixed by the run's first split: a split done again
    # (after a crash, or by a worker with other settings or a newer version) must give every
    # batch number the same rows, or the markers of batches applied before would skip rows.
    _, _, saved = await runs.plan(run_id)
    cutting = (saved or {}).get("batching") or {
        "size": importer.batch_size or settings.pipeline.batch_size,
        "partitions": settings.kafka.partitions,
        "max_bytes": settings.kafka.max_message_bytes - RECORD_OVERHEAD,
        "copy": text_columns is not None,
    }
    if cutting["copy"] and text_columns is None:
        raise TerminalError(
            "this run's first split sent its rows as COPY batches, which this worker cannot "
            "make for it; import the file again as a new run"
        )
    await runs.save_plan(run_id, {**plan.to_json(), "batching": cutting}, mapper.mapping)
    router = BatchRouter(
        plan.key,
        cutting["partitions"],
        cutting["size"],
        cutting["max_bytes"],
        text_columns if cutting["copy"] else None,
    )
    as_text = router.text_columns is not None
    run_key = str(run_id)
    deliveries = Deliveries(f"split of run {run_id}")

    async def emit(partition: int, rows: list[Record]) -> None:
        for key, value in router.encode(run_key, rows):
            deliveries.track(await send(partition, key, value))

    total = 0
    last_report = time.monotonic()
    chunk_size = 200  # rows between yields to the event loop, so batches apply while we read
    all_items = itertools.chain(head, items)
    while True:
        chunk = list(itertools.islice(all_items, chunk_size))
        if not chunk:
            break
        records: list[Any]
        records, failures = mapper.map_text(chunk) if as_text else mapper.map_rows(chunk)
        total += len(records) + len(failures)
        if failures:
            logged = await runs.record_rejections(run_id, failures)
            deps.metrics.rows_rejected(logged, dry_run=request.dry_run)
        for partition, batch in router.add(records):
            await emit(partition, batch)
        now = time.monotonic()
        if now - last_report >= settings.pipeline.progress_interval:
            last_report = now
            fraction = parsed.bytes_read / request.file.size if request.file.size else 0.0
            deliveries.check()  # a refused batch fails the split now, not at the end
            status = await runs.record_split_progress(run_id, total, min(fraction, 1.0))
            if status is None or status.terminal:
                log.info("run %s is %s; the split stops at row %d", run_id, status, total)
                return
        await asyncio.sleep(0)  # let heartbeats and the producer run
    for partition, rows in enumerate(router.buffers):
        if rows:
            await emit(partition, rows)
    await flush()
    # Every batch confirmed by the broker before the totals say they exist: a refused one
    # raises DeliveryFailed, and the split is done again (applied batches are skipped).
    await deliveries.confirm()
    await runs.finish_split(run_id, total, router.seq)
    log.info("run %s split: %d rows in %d batches", run_id, total, router.seq)
