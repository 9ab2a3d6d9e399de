"""The Python API: start imports, follow and inspect runs.

async with Client(settings) as client:
    run = await client.submit_file("products", Path("products.csv"))
    run = await client.wait(run.id)
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from sluice.agents.deps import Deps, Importers, build_deps
from sluice.config import Settings
from sluice.errors import (
    InvalidRequest,
    NothingToRetry,
    RunNotCancellable,
    RunNotFound,
)
from sluice.importers.registry import build_registry
from sluice.schemas.events import FileRef, ImportRequested, TriggerRequested
from sluice.schemas.firehose import BackfillRequested, BackfillState
from sluice.schemas.importers import ADHOC, pull_kind
from sluice.schemas.runs import ItemStatus, RowFailure, Run
from sluice.schemas.sources import UrlSource
from sluice.storage.filestore import iter_path
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.topics import Topics


def run_options(
    *,
    fresh: bool = False,
    full: bool = False,
    date_formats: Sequence[str] = (),
    decimal_comma: bool = False,
    sheet: str | None = None,
    check_formats: bool = True,
) -> dict[str, Any] | None:
    """A run's options from a caller's switches: ``fresh`` asks for a full refresh (once the run
    completed, the rows it did not contain are deleted); ``date_formats`` (strptime formats,
    tried in order) and ``decimal_comma`` (``1.234,5``) say how the file writes dates and
    numbers, for the fields that do not say themselves; ``sheet`` the worksheet of an XLSX
    file to read. ``InvalidRequest`` for a date format that names no day, month and year
    (unless ``check_formats`` is off: the run then fails with that message). ``full``: an
    incremental API source lists everything, not only what changed since its last completed
    run."""
    from sluice.schemas.importers import date_formats as checked_formats

    options: dict[str, Any] = {}
    if fresh:
        options["fresh"] = True
    if full:
        options["full"] = True
    formats = [f for f in date_formats if f.strip()]
    if formats:
        try:
            options["date_formats"] = list(
                checked_formats(formats, "date format") if check_formats else formats
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    if decimal_comma:
        options["decimal_comma"] = True
    if sheet:
        if "\x00" in sheet:
            raise InvalidRequest("the sheet name may not hold NUL bytes")
        options["sheet"] = sheet
    return options or None


def adhoc_options(
    *,
    table: str | None,
    key: str | Sequence[str] | None,
    schema: str = "public",
    null_markers: Sequence[str] = (),
    evolve: bool = True,
    sheet: str | None = None,
    fresh: bool = False,
    date_formats: Sequence[str] = (),
    decimal_comma: bool = False,
    check_formats: bool = True,
) -> dict[str, Any]:
    """The options of an import without an importer, as ``sluice import`` and
    ``POST /api/v1/imports/adhoc/upload`` take them: ``key`` a list or comma-separated. The
    table's name is normalised as column names are (``My Table`` -> ``my_table``), so it needs
    no quoting in SQL. ``InvalidRequest`` when the table or the key is missing."""
    from sluice.agents.split.infer import normalize_identifier

    keys = [k.strip() for k in (key.split(",") if isinstance(key, str) else key or ()) if k.strip()]
    if not (table or "").strip() or not keys:
        raise InvalidRequest(
            "an import without an importer needs the target table and its key: give `table`"
            " (created when missing) and `key` (one or more column names, comma-separated),"
            " e.g. table=products, key=sku"
        )
    if any("\x00" in value for value in (table or "", schema, *keys, sheet or "")):
        raise InvalidRequest("table, schema, key and sheet may not hold NUL bytes")
    # PostgreSQL's text holds no NUL, so no stored cell can equal a marker holding one.
    null_markers = [m for m in null_markers if "\x00" not in m]
    options: dict[str, Any] = {
        "table": normalize_identifier(table or "", 0),
        "key": keys,
        "schema": schema,
    }
    options.update(
        run_options(
            fresh=fresh,
            date_formats=date_formats,
            decimal_comma=decimal_comma,
            sheet=sheet,
            check_formats=check_formats,
        )
        or {}
    )
    if null_markers:
        options["null_markers"] = list(null_markers)
    if not evolve:
        options["evolve"] = False
    return options


def backfill_request(
    did: str,
    *,
    collections: Sequence[str] = (),
    reset: bool = False,
    requested_by: str | None = None,
) -> BackfillRequested:
    """The backfill of one repository; ``InvalidRequest`` when ``did`` is not a DID."""
    try:
        return BackfillRequested(
            did=did, collections=list(collections), reset=reset, requested_by=requested_by
        )
    except ValueError:
        raise InvalidRequest(f"{did!r} is not a DID; write did:plc:... or did:web:...") from None


class Client:
    def __init__(
        self,
        settings: Settings,
        *,
        registry: Importers | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or build_registry(settings.pipeline.importers)
        self.topics = Topics.of(settings.kafka)
        self._secrets = secrets
        self._deps: Deps | None = None
        self._deps_lock = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None

    async def deps(self) -> Deps:
        """The pool and the repositories, connected on first use and kept until close()."""
        if self._deps is None:
            async with self._deps_lock:
                if self._deps is None:
                    self._deps = await build_deps(
                        self.settings, registry=self.registry, secrets=self._secrets
                    )
        return self._deps

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._deps is not None:
            deps, self._deps = self._deps, None
            await deps.close()

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            await ensure_topics(self.settings.kafka)
            producer = clients.producer(self.settings.kafka)
            await producer.start()
            self._producer = producer
        return self._producer

    async def submit_file(
        self,
        importer: str,
        path: Path,
        *,
        dry_run: bool = False,
        options: dict[str, Any] | None = None,
        requested_by: str | None = None,
        source: str = "file",
    ) -> Run:
        if not path.is_file():  # noqa: ASYNC240 - one stat before the upload starts
            raise InvalidRequest(f"{path} is not a file; give the path of the file to import")
        return await self.submit_stream(
            importer,
            iter_path(path),
            name=path.name,
            dry_run=dry_run,
            options=options,
            requested_by=requested_by,
            source=source,
        )

    async def submit_stream(
        self,
        importer: str,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        dry_run: bool = False,
        options: dict[str, Any] | None = None,
        requested_by: str | None = None,
        source: str = "upload",
        content_type: str | None = None,
        max_bytes: int | None = None,
        parent_run_id: uuid.UUID | None = None,
    ) -> Run:
        """Store the file (claim check), create a queued run and publish the request."""
        if importer != ADHOC:
            # Unknown importers and sources it does not accept fail before anything is stored.
            definition = self.registry.get(importer)
            if source not in (*definition.sources, "retry"):
                raise InvalidRequest(
                    f"importer {importer!r} does not accept {source!r} imports; it accepts: "
                    f"{', '.join(definition.sources)}"
                )
        files = (await self.deps()).files
        ref = await files.put(chunks, name=name, content_type=content_type, max_bytes=max_bytes)
        runs = (await self.deps()).runs
        run = await runs.create(
            importer=importer,
            source=source,
            dry_run=dry_run,
            file_id=ref.id,
            file_name=name,
            options=options,
            requested_by=requested_by,
            parent_run_id=parent_run_id,
        )
        await self.publish_request(run, ref)
        return run

    async def publish_request(self, run: Run, ref: FileRef) -> None:
        request = ImportRequested.for_run(run, ref)
        producer = await self.producer()
        await producer.send_and_wait(
            self.topics.requests, request.model_dump_json().encode(), key=str(run.id).encode()
        )

    async def trigger(
        self,
        importer: str,
        params: dict[str, Any] | None = None,
        *,
        dry_run: bool = False,
        requested_by: str | None = None,
        options: dict[str, Any] | None = None,
        parent_run_id: uuid.UUID | None = None,
    ) -> Run:
        """Queue a run that pulls its data (URL, FTP/SFTP, filesystem, paginated API). A URL is
        checked against the host policy now, so a refused target fails the request itself."""
        definition = self.registry.get(importer)
        params = dict(params or {})
        kind = pull_kind(definition, params)
        if kind == "url":
            from sluice.agents.fetch.guard import check_url
            from sluice.agents.fetch.url import url_request_parts

            source = definition.pull if isinstance(definition.pull, UrlSource) else UrlSource()
            # Only the URL matters here: the workers hold the secrets, not this process.
            bare = dataclasses.replace(source, secret_headers={}, basic_auth_env=None)
            url, _, _ = url_request_parts(bare, params, {})
            await check_url(url, self.settings.url)
        runs = (await self.deps()).runs
        run = await runs.create(
            importer=importer,
            source=kind,
            dry_run=dry_run,
            options={**(options or {}), "params": params},
            requested_by=requested_by,
            parent_run_id=parent_run_id,
        )
        await self.publish_trigger(run, kind, params)
        return run

    async def publish_trigger(self, run: Run, kind: str, params: dict[str, Any]) -> None:
        trigger = TriggerRequested.for_run(run, kind, params)
        producer = await self.producer()
        await producer.send_and_wait(
            self.topics.triggers, trigger.model_dump_json().encode(), key=str(run.id).encode()
        )

    async def backfill(
        self,
        dids: list[str],
        *,
        collections: list[str] | None = None,
        reset: bool = False,
        requested_by: str | None = None,
    ) -> list[str]:
        """Queue the backfill of each DID for the workers; returns the DIDs queued. Each shows
        in ``backfill_states`` at once, ``pending`` (collection ``*`` when none is named)."""
        from sluice.agents.firehose.backfill import record_queued

        requests = [
            backfill_request(
                did, collections=collections or [], reset=reset, requested_by=requested_by
            )
            for did in dids
        ]
        producer = await self.producer()
        pool = (await self.deps()).pool
        for request in requests:
            await record_queued(pool, request.did, request.collections)
            await producer.send_and_wait(
                self.topics.backfill, request.model_dump_json().encode(), key=request.did.encode()
            )
        return [r.did for r in requests]

    async def get_run(self, run_id: uuid.UUID) -> Run:
        run = await (await self.deps()).runs.get(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id}; list runs with `sluice runs`")
        return run

    async def list_runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        importer: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        """Runs, newest first."""
        return await (await self.deps()).runs.list(
            status=status, importer=importer, limit=limit, offset=offset
        )

    async def count_runs(
        self, *, status: str | Sequence[str] | None = None, importer: str | None = None
    ) -> int:
        """How many runs ``list_runs`` would find without a limit."""
        return await (await self.deps()).runs.count(status=status, importer=importer)

    async def failed_rows(
        self, run_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> Sequence[RowFailure]:
        """The rows the run rejected, in file order; ``RunNotFound`` for an unknown run."""
        await self.get_run(run_id)
        return await (await self.deps()).runs.failed_rows(run_id, limit=limit, offset=offset)

    async def count_failed_rows(self, run_id: uuid.UUID) -> int:
        return await (await self.deps()).runs.count_failed_rows(run_id)

    async def items(
        self,
        run_id: uuid.UUID,
        *,
        status: ItemStatus | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """A paginated API run's items: how many are in each state, and the items themselves
        (only those in ``status`` when given) with their failures and last errors."""
        await self.get_run(run_id)
        repo = (await self.deps()).items
        counts = await repo.counts(run_id)
        state = status.value if status else None
        return counts, await repo.list(run_id, status=state, limit=limit, offset=offset)

    async def backfill_states(
        self, did: str | None = None, status: str | None = None
    ) -> list[BackfillState]:
        """Backfill state per repository and collection (only ``did``'s, or in ``status``)."""
        from sluice.agents.firehose.backfill import Backfiller

        backfiller = Backfiller((await self.deps()).pool, self.settings.firehose, self.settings.url)
        try:
            return list(await backfiller.states(did, status))
        finally:
            await backfiller.close()

    async def cancel(self, run_id: uuid.UUID) -> Run:
        """Stop a queued or running run: no batch is applied after this returns."""
        runs = (await self.deps()).runs
        cancelled = await runs.cancel(run_id)
        if cancelled is None:
            run = await self.get_run(run_id)
            raise RunNotCancellable(
                f"run {run_id} is {run.status.value}; only queued or running runs can be cancelled"
            )
        return cancelled

    async def retry(
        self, run_id: uuid.UUID, *, dry_run: bool = False, requested_by: str | None = None
    ) -> Run:
        """Start a child run with the rows ``run_id`` rejected, through the importer as it is
        now (fixed importers or reference data land rows that failed before). Rows that could not
        be read at all (a wrong number of fields) are rejected again: fix those in the file."""
        parent = await self.get_run(run_id)
        if parent.source == "api":
            return await self._retry_items(parent, dry_run=dry_run, requested_by=requested_by)
        runs = (await self.deps()).runs
        failures = await runs.failed_rows(run_id)
        if not failures:
            raise NothingToRetry(f"run {run_id} has no rejected rows to retry")

        async def lines() -> AsyncIterator[bytes]:
            for f in failures:
                raw = f.raw
                if isinstance(raw, dict):
                    raw = {k: v for k, v in raw.items() if not k.startswith("_sluice")}
                yield orjson.dumps(raw, default=str) + b"\n"

        return await self.submit_stream(
            parent.importer,
            lines(),
            name=f"retry-of-{run_id}.jsonl",
            dry_run=dry_run,
            options={**parent.options, "format": "jsonl"},
            requested_by=requested_by,
            source="retry",
            content_type="application/x-ndjson",
            parent_run_id=parent.id,
        )

    async def _retry_items(self, parent: Run, *, dry_run: bool, requested_by: str | None) -> Run:
        """An API run's failed items, fetched again in a child run."""
        counts = await (await self.deps()).items.counts(parent.id)
        if not counts["failed"]:
            raise NothingToRetry(f"run {parent.id} has no failed items to retry")
        params = dict(parent.options.get("params") or {})
        runs = (await self.deps()).runs
        run = await runs.create(
            importer=parent.importer,
            source="api",
            dry_run=dry_run,
            options={"params": params, "retry_of": str(parent.id)},
            requested_by=requested_by,
            parent_run_id=parent.id,
        )
        await self.publish_trigger(run, "api", params)
        return run

    async def wait(
        self,
        run_id: uuid.UUID,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - returns the run as it is, no raise
        poll: float = 0.25,
        on_update: Callable[[Run], None] | None = None,
    ) -> Run:
        """Until the run is finished (PostgreSQL is the source of truth, so poll it)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            run = await self.get_run(run_id)
            if on_update is not None:
                on_update(run)
            if run.status.terminal:
                return run
            if deadline is not None and loop.time() > deadline:
                return run
            await asyncio.sleep(poll)


def failed_rows_csv(failures: Sequence[Any], out: Any) -> None:
    """The rejected rows as CSV: ``row_number``, ``reason``, then the rows' own columns (an
    unpivoted row as the file had it: its header's columns), so the file can be fixed and
    imported again (the two first columns are ignored then)."""
    import csv

    columns: list[str] = []
    for f in failures:
        if isinstance(f.raw, dict):
            columns += [k for k in f.raw if not k.startswith("_sluice") and k not in columns]
    writer = csv.writer(out)
    writer.writerow(
        ["row_number", "reason", *columns] if columns else ["row_number", "reason", "raw"]
    )
    for f in failures:
        if columns:
            raw = f.raw if isinstance(f.raw, dict) else {}
            cells = [raw.get(c) for c in columns]
        else:
            cells = [f.raw]
        writer.writerow([f.row_number, _csv_cell(f.reason), *(_csv_cell(c) for c in cells)])


# A plain number ("-0.25", "+3"): no spreadsheet reads it as a formula, and a quote before it
# would make the value wrong when the fixed file is imported again.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _csv_cell(value: Any) -> str:
    """A cell safe to open in a spreadsheet: text starting with = + - @ is not a formula."""
    text = (
        "" if value is None else value if isinstance(value, str) else orjson.dumps(value).decode()
    )
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.fullmatch(text):
        return "'" + text
    return text
