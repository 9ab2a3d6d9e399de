"""Split: stream a stored file, map and validate its rows, and send row batches routed by key.

The request's offset is committed only after the split returns, so a worker that dies mid-file
splits it again from the start: batch identities (run id + sequence) are deterministic, and the
batches already applied are skipped by their markers.

The steps have modules of their own: ``parse`` reads the file, ``plan`` decides the run's
target and batching, ``provenance`` records what the run read, ``map`` turns rows into records
and ``route`` cuts the records into batches by key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.agents.deps import Deps
from sluice.agents.split.map import RecordMapper, fitting_importers
from sluice.agents.split.parse import ParsedFile, parse_file
from sluice.agents.split.plan import (
    check_lookups,
    kept_batching,
    refuse_table_without_sample,
    resolve_importer,
    table_plan,
)
from sluice.agents.split.provenance import record_provenance, record_schema_changes
from sluice.agents.split.ranges import (
    FileBytes,
    RangeCutter,
    RangeResult,
    RangeSpec,
    data_start,
    read_ranges,
)
from sluice.agents.split.ranges import processes as ranges_processes
from sluice.agents.split.ranges import usable as ranges_usable
from sluice.agents.split.read import Reading
from sluice.agents.split.repeats import winner
from sluice.agents.split.route import BatchRouter
from sluice.errors import FileFormatError, MappingError, TerminalError
from sluice.schemas.events import ImportRequested
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem
from sluice.schemas.importers import ADHOC, Importer
from sluice.schemas.runs import RowFailure
from sluice.streams.publish import Deliveries

log = logging.getLogger(__name__)

SendBatch = Callable[[int, bytes, bytes], Awaitable[Awaitable[Any]]]
"""Sends one batch to a partition; returns the message's delivery (see streams.publish)."""
Flush = Callable[[], Awaitable[None]]

SAMPLE_ROWS = 1000
REJECTED_AT_ONCE = 5000
"""Rows rejected by the split that are written to the row log in one transaction (at least
once per progress interval, and all of them before the split's totals)."""


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
            await deps.files.download(request.file.id, path, link=True)
            with path.open("rb") as raw:
                await _split(deps, request, raw, send, flush)
    except (FileFormatError, TerminalError) as exc:
        log.warning("run %s failed: %s", request.run_id, exc)
        await runs.fail(request.run_id, str(exc))


def format_options(deps: Deps, request: ImportRequested) -> FormatOptions:
    """How the file is read: as its importer says (the run's sheet, if it names one), or for an
    ad-hoc import its sheet; a retry
    file (the rejected records of a run) is JSON Lines."""
    if request.importer != ADHOC:
        options = deps.registry.get(request.importer).format
        if request.options.get("sheet"):  # the run's --sheet
            options = dataclasses.replace(options, sheet=request.options["sheet"])
    else:
        try:
            options = FormatOptions(sheet=request.options.get("sheet"))
        except ValueError as exc:
            raise FileFormatError(str(exc)) from None
    if request.options.get("format") == "jsonl":  # a retry file: the rejected records
        options = FormatOptions(format="jsonl", encoding="utf-8")
    return options


async def _split(
    deps: Deps, request: ImportRequested, raw: Any, send: SendBatch, flush: Flush
) -> None:
    run_id = request.run_id
    options = format_options(deps, request)
    parsed = parse_file(raw, options, encoding=request.file.encoding)
    items = iter(parsed)
    head = list(itertools.islice(items, SAMPLE_ROWS))
    sample = [r for r in head if isinstance(r, ParsedRow)]
    readings: dict[str, Reading] = {}
    try:
        importer = await resolve_importer(
            deps,
            request,
            parsed.header,
            sample,
            delimiter=parsed.sniffed.delimiter,
            readings=readings,
        )
    except MappingError as exc:
        raise MappingError(f"{exc}{_sheets_hint(parsed)}") from None
    try:
        mapper = RecordMapper(importer, parsed.header)
    except MappingError as exc:
        hint = _fitting_hint(deps, importer.slug, parsed.header) + _sheets_hint(parsed)
        raise MappingError(f"{exc}{hint}") from None
    provenance = await record_provenance(deps, request, parsed, mapper, readings)
    if provenance["duplicate_of"] and importer.skip_duplicate_files:
        log.info("run %s: the same file as run %s; skipped", run_id, provenance["duplicate_of"])
        await deps.runs.finish_split(run_id, 0, 0)
        return
    # Nothing is created from a file without a row: an ad-hoc table made from a header alone
    # would have only text columns, and every later file into it would keep them.
    if not head:
        raise FileFormatError(
            "the file has a header but no data rows" if parsed.header else "the file has no rows"
        )
    if importer.slug == ADHOC and not sample:
        await refuse_table_without_sample(deps, importer, head)
    plan, changes = await table_plan(deps, importer, request, mapper, sample)
    await check_lookups(deps, plan)
    await record_schema_changes(deps, request, provenance, changes)
    data = FileBytes(raw.fileno()) if parsed.sniffed.format == "csv" else None
    start = _range_start(parsed, mapper, data)
    range_bytes = deps.settings.pipeline.split_range_bytes
    if start is None or not data or len(data) <= 2 * range_bytes:
        range_bytes = 0  # read from start to end: small, or not a file ranges can read
    router = await kept_batching(deps, request, importer, mapper, plan, parsed, range_bytes)
    won = winner(importer.policy, importer.version_column)
    pieces: AsyncGenerator[_Piece, None]
    if router.lines:
        if data is None or start is None:
            raise TerminalError(
                "this run's first split read its file by byte ranges, which this file no "
                "longer allows; import the file again as a new run"
            )
        cutter = RangeCutter(data, start[0], router.ranges)
        spec = _range_spec(importer, parsed, router, raw.name, options.max_record_bytes)
        workers = ranges_processes(deps.settings.pipeline.split_processes)
        log.info(
            "run %s: the file is read by byte ranges of %d bytes in %d processes",
            *(request.run_id, router.ranges, workers),
        )
        pieces = _ranged(read_ranges(cutter, spec, workers, start[1]), router, len(data))
    else:
        rows = itertools.chain(head, items)
        pieces = _serial(rows, mapper, router, parsed, request.file.size)
    await _send_batches(deps, request, pieces, mapper, router, send, flush, won)


def _range_start(
    parsed: ParsedFile, mapper: RecordMapper, data: FileBytes | None
) -> tuple[int, int] | None:
    """Where the data records of a file that byte ranges can read start, and the lines before
    them; None for a file that is read from start to end (see ``ranges``)."""
    if not data or parsed.header is None or mapper.text_names() is None:
        return None
    if not ranges_usable(parsed.sniffed):
        return None
    return data_start(data, parsed.sniffed, parsed.header)


def _range_spec(
    importer: Importer, parsed: ParsedFile, router: BatchRouter, path: str, max_record_bytes: int
) -> RangeSpec:
    columns = router.text_columns or ()
    return RangeSpec(
        path=path,
        encoding=parsed.sniffed.encoding or "utf-8",
        delimiter=parsed.sniffed.delimiter or ",",
        header=parsed.header or [],
        importer=importer,
        partitions=router.partitions,
        key_at=tuple(columns.index(c) for c in router.key),
        max_record_bytes=max_record_bytes,
    )


@dataclass(frozen=True)
class _Piece:
    """Some rows of the file: how many were read, those rejected, the batches they filled
    (with their partitions) and the fraction of the file read so far."""

    rows: int
    failures: list[RowFailure]
    batches: list[tuple[int, list[Any]]]
    fraction: float


async def _serial(
    rows: Iterator[ParsedRow | RowProblem],
    mapper: RecordMapper,
    router: BatchRouter,
    parsed: ParsedFile,
    size: int,
) -> AsyncGenerator[_Piece, None]:
    """The file read from start to end here, 200 rows at a time (between them the event loop
    runs: heartbeats, the producer, batches applied while we read)."""
    as_text = router.text_columns is not None
    while True:
        chunk = list(itertools.islice(rows, 200))
        if not chunk:
            return
        records: list[Any]
        records, failures = mapper.map_text(chunk) if as_text else mapper.map_rows(chunk)
        fraction = parsed.bytes_read / size if size else 0.0
        yield _Piece(len(records) + len(failures), failures, router.add(records), fraction)


async def _ranged(
    results: AsyncGenerator[RangeResult, None], router: BatchRouter, size: int
) -> AsyncGenerator[_Piece, None]:
    """The file read by byte ranges in the pool (see ``ranges``), in file order."""
    async with contextlib.aclosing(results):  # a split that stops drops the ranges read ahead
        async for result in results:
            batches = [
                (partition, batch)
                for partition, lines in enumerate(result.lines)
                for batch in router.add_lines(partition, lines)
            ]
            router.repeats.add_hashes(result.hashes)
            yield _Piece(result.records, result.failures, batches, result.end / size)


def _sheets_hint(parsed: ParsedFile) -> str:
    """For a workbook of several sheets: which one was read, and how to read another."""
    sniffed = parsed.sniffed
    others = [s for s in sniffed.sheets if s != sniffed.sheet]
    if not others:
        return ""
    return (
        f" This read the sheet {sniffed.sheet!r}; the workbook's other sheets are: "
        f"{', '.join(repr(s) for s in others)}. Pick one with --sheet NAME (`sheet` in the"
        " API's upload form, FormatOptions(sheet=...) in an importer)"
    )


def _fitting_hint(deps: Deps, slug: str, header: list[str] | None) -> str:
    """Which other importers would read a file that does not fit ``slug``."""
    if header is None or slug == ADHOC:
        return ""
    others = [i for i in deps.registry.all() if i.slug not in (slug, ADHOC)]
    fits = fitting_importers(others, header)
    if not fits:
        return " No other importer reads this header (`sluice importers` lists them)."
    if len(fits) == 1:
        return f" Importer {fits[0]!r} fits it: sluice run {fits[0]} --file FILE"
    return f" These importers fit it: {', '.join(repr(f) for f in fits[:5])}."


async def _send_batches(
    deps: Deps,
    request: ImportRequested,
    pieces: AsyncGenerator[_Piece, None],
    mapper: RecordMapper,
    router: BatchRouter,
    send: SendBatch,
    flush: Flush,
    won: str,
) -> None:
    """Send the batches of the file's pieces, recording the split's progress as it goes and
    its totals once the broker confirmed every batch. Stops early when the run was finished
    meanwhile (cancelled, say)."""
    runs, settings = deps.runs, deps.settings
    run_id = request.run_id
    run_key = str(run_id)
    deliveries = Deliveries(f"split of run {run_id}")

    async def emit(partition: int, batch: list[Any]) -> None:
        for key, value in router.encode(run_key, batch):
            deliveries.track(await send(partition, key, value))

    # Rows rejected by the split (a wrong field count, a required field empty) go to the row
    # log in groups, not one transaction per chunk: a file with a bad row every few hundred
    # would otherwise cost a transaction (and a lock on the run's row) every few hundred rows.
    rejected: list[RowFailure] = []

    async def log_rejected() -> None:
        if rejected:
            logged = await runs.record_rejections(run_id, rejected)
            deps.metrics.rows_rejected(logged, dry_run=request.dry_run)
            rejected.clear()

    total = 0
    last_report = time.monotonic()
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            total += piece.rows
            rejected.extend(piece.failures)
            if len(rejected) >= REJECTED_AT_ONCE:
                await log_rejected()
            for partition, batch in piece.batches:
                await emit(partition, batch)
            now = time.monotonic()
            if now - last_report >= settings.pipeline.progress_interval:
                last_report = now
                deliveries.check()  # a refused batch fails the split now, not at the end
                await log_rejected()
                status = await runs.record_split_progress(
                    run_id, total, min(piece.fraction, 1.0), mapper.gaps
                )
                if status is None or status.terminal:
                    log.info("run %s is %s; the split stops at row %d", run_id, status, total)
                    return
            await asyncio.sleep(0)  # let heartbeats and the producer run
    for partition, rest in enumerate(router.buffers):
        if rest:
            await emit(partition, rest)
    await log_rejected()
    await flush()
    # Every batch confirmed by the broker before the totals say they exist: a refused one
    # raises DeliveryFailed, and the split is done again (applied batches are skipped).
    await deliveries.confirm()
    repeats = router.repeats.count()
    await runs.finish_split(
        run_id, total, router.seq, mapper.gaps, repeated={**repeats.to_json(), "won": won}
    )
    log.info(
        "run %s split: %d rows in %d batches, %d gaps, %d keys repeated",
        *(run_id, total, router.seq, mapper.gaps, repeats.keys),
    )
