"""The ``sluice`` command line.

Exit codes scripts can rely on: 0 success (a waited-for run completed), 1 an error (message on
stderr), 2 wrong usage, 3 the run completed with rejected rows, 4 the run failed, 5 cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

from sluice import __version__
from sluice.config import ApiSettings, KafkaSettings, PipelineSettings, Settings

if TYPE_CHECKING:
    from sluice.agents.deps import Deps
from sluice.errors import FileFormatError, SluiceError
from sluice.schemas.runs import Run, RunStatus
from sluice.service import failed_rows_csv

EXIT_ERROR = 1
EXIT_STATUS = {
    RunStatus.COMPLETED: 0,
    RunStatus.COMPLETED_WITH_ERRORS: 3,
    RunStatus.FAILED: 4,
    RunStatus.CANCELLED: 5,
}


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_settings(*, require_stack: bool = True) -> Settings:
    """The settings (sluice.env.load_settings); a problem with them ends the command with its
    message."""
    from sluice.env import load_settings as load

    try:
        return load(require_stack=require_stack)
    except SluiceError as exc:
        fail(str(exc))


async def command_deps(settings: Settings) -> Deps:
    """The pool and repositories for one command (two connections, the bundled and configured
    importers); close them when done."""
    from sluice.agents.deps import build_deps
    from sluice.importers.registry import build_registry

    return await build_deps(
        settings, registry=build_registry(settings.pipeline.importers), pool_size=(1, 2)
    )


def run_async(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (SluiceError, FileFormatError) as exc:
        fail(str(exc))
    except (OSError, ConnectionError) as exc:
        fail(f"cannot reach the broker or database ({exc}); is the stack running? try `sluice env`")


def run_json(run: Run) -> str:
    return orjson.dumps(
        run.model_dump(mode="json", exclude={"options"}), option=orjson.OPT_INDENT_2
    ).decode()


def summary(run: Run) -> str:
    lines = [
        f"run {run.id}  {run.importer}  {run.status.value}",
        f"  rows: {run.processed_rows:,} of "
        f"{f'{run.total_rows:,}' if run.total_rows is not None else '?'}"
        f"  created {run.created_rows:,}  updated {run.updated_rows:,}"
        f"  unchanged {run.unchanged_rows:,}  skipped {run.skipped_rows:,}"
        f"  failed {run.failed_rows:,}",
    ]
    if run.started_at and run.completed_at:
        secs = (run.completed_at - run.started_at).total_seconds()
        rate = run.processed_rows / secs if secs > 0 else 0
        lines.append(f"  took {secs:.1f}s ({rate:,.0f} rows/s)")
    if run.provenance:
        p = run.provenance
        f = p.get("file") or {}
        how = [
            str(p.get("format")),
            *([f"delimiter {p['delimiter']!r}"] if p.get("delimiter") else []),
            *([f"sheet {p['sheet']!r}"] if p.get("sheet") else []),
            *([p["encoding"]] if p.get("encoding") else []),
        ]
        lines.append(
            f"  read: {f.get('name')} ({f.get('size', 0):,} bytes, {', '.join(how)}),"
            f" sha256 {str(p.get('sha256'))[:12]}"
        )
        if p.get("aliases"):
            matched = ", ".join(f"{h!r} -> {field}" for field, h in p["aliases"].items())
            lines.append(f"  aliases: {matched}")
        if p.get("ignored"):
            lines.append(f"  ignored columns: {', '.join(p['ignored'])}")
        if p.get("duplicate_of"):
            lines.append(f"  the same file as run {p['duplicate_of']}")
        from sluice.agents.split.evolve import SchemaChange

        for change in p.get("schema_changes") or []:
            lines.append(f"  schema: {SchemaChange(**change).describe()}")
    if run.deleted_rows:
        lines.append(f"  full refresh: {run.deleted_rows:,} rows absent from the import removed")
    if run.source_location:
        lines.append(f"  source: {run.source} {run.source_location}")
    if run.source == "api":
        lines.append(
            f"  items: {run.items_discovered:,} discovered  {run.items_completed:,} completed"
            f"  {run.items_failed:,} failed"
        )
    if run.rate_limit_hits or run.rate_limit_sleeps:
        lines.append(
            f"  rate limit: {run.rate_limit_hits:,} answers 429  {run.rate_limit_sleeps:,} waits"
            f"  {run.total_sleep_seconds:.1f}s waited"
        )
    if run.dry_run:
        lines.append("  dry run: nothing was written to the target table")
    if run.error:
        lines.append(f"  error: {run.error}")
    if run.failed_rows:
        lines.append(f"  rejected rows: `sluice failed-rows {run.id}`")
    return "\n".join(lines)


class ProgressBar:
    """One line on a terminal, redrawn in place: percent, rows and rate."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, run: Run) -> None:
        if not self.enabled:
            return
        width = 30
        pct = float(run.progress_percent)
        filled = int(width * pct / 100)
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = run.processed_rows / elapsed
        total = f"{run.total_rows:,}" if run.total_rows is not None else "?"
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}%  "
            f"{run.processed_rows:,}/{total} rows  {rate:,.0f} rows/s  {run.status.value}"
        )
        click.echo(line, nl=False, err=True)
        if run.status.terminal:
            click.echo("", err=True)


async def _submit_and_maybe_wait(
    importer: str,
    path: Path,
    *,
    dry_run: bool,
    wait: bool,
    as_json: bool,
    options: dict[str, Any] | None = None,
) -> int:
    from sluice.service import Client

    settings = load_settings()
    async with Client(settings) as client:
        run = await client.submit_file(
            importer, path, dry_run=dry_run, options=options, requested_by=_user()
        )
        if wait:
            bar = ProgressBar(sys.stderr.isatty() and not as_json)
            run = await client.wait(run.id, on_update=bar)
        click.echo(run_json(run) if as_json else summary(run))
        return EXIT_STATUS.get(run.status, 0) if wait else 0


def _user() -> str:
    return os.environ.get("USER") or "cli"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="sluice", package_name="sluice-ingest"
)
@click.option("-v", "--verbose", is_flag=True, help="log at debug level")
def cli(verbose: bool) -> None:
    """Sluice: import files, triggers and firehoses into PostgreSQL, through Kafka.

    Commands find the running stack through SLUICE_HOME (default ./.sluice), or use
    SLUICE_KAFKA_BOOTSTRAP and SLUICE_DATABASE_URL when they are set.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.option("--detach", is_flag=True, help="run in the background; stop it with `sluice down`")
def up(detach: bool) -> None:
    """Start the embedded stack: broker, PostgreSQL, a worker and the HTTP API.

    Runs in the foreground until Ctrl-C unless --detach is given. Needs the `embedded` extra.
    """
    from sluice.errors import EmbeddedStackMissing
    from sluice.stack import require_embedded
    from sluice.supervisor import start_detached, supervise

    try:
        require_embedded()
    except EmbeddedStackMissing as exc:
        fail(str(exc))
    pipeline = PipelineSettings()
    if detach:
        sys.exit(start_detached(pipeline.home))
    sys.exit(supervise(pipeline.home, PipelineSettings(), KafkaSettings(), ApiSettings()))


@cli.command()
def down() -> None:
    """Stop the embedded stack started with `sluice up --detach`."""
    from sluice.supervisor import stop_detached

    sys.exit(stop_detached(PipelineSettings().home))


@cli.command()
@click.option(
    "--stack",
    "with_stack",
    is_flag=True,
    help="then, as shell comments, the processes of the embedded stack (as `sluice stack`)",
)
def env(with_stack: bool) -> None:
    """Print the connection settings of the running stack, as shell assignments."""
    settings = load_settings()
    click.echo(f"SLUICE_KAFKA_BOOTSTRAP={settings.kafka.bootstrap}")
    click.echo(f"SLUICE_DATABASE_URL={settings.database_url}")
    if settings.api.url:
        click.echo(f"SLUICE_API_URL={settings.api.url}")
    if settings.api.all_tokens():
        click.echo(f"SLUICE_API_TOKEN={settings.api.all_tokens()[0]}")
    if with_stack:
        from sluice.stack import read_state
        from sluice.supervisor import describe_stack

        home = settings.pipeline.home
        state = read_state(home)
        lines = describe_stack(home, state) if state else [f"no stack runs under {home}"]
        for line in lines:
            click.echo(f"# {line}")


@cli.command("stack")
@click.option("--json", "as_json", is_flag=True, help="the state file (stack.json) as it is")
def stack_cmd(as_json: bool) -> None:
    """Show the embedded stack started by `sluice up`: each process with its pid, status,
    restarts and how it last ended. Exit code 1 when no stack runs under SLUICE_HOME."""
    from sluice.stack import read_state
    from sluice.supervisor import describe_stack

    home = PipelineSettings().home
    state = read_state(home)
    if state is None:
        fail(f"no stack is running under {home.resolve()}: start one with `sluice up --detach`")
    if as_json:
        click.echo(state.model_dump_json(indent=2))
        return
    for line in describe_stack(home, state):
        click.echo(line)


@cli.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """Run one worker (split, upsert, outbox relay) against the configured broker and database."""
    from sluice.worker import run_worker

    logging.getLogger().setLevel(loglevel.upper())
    run_worker(load_settings(), loglevel=loglevel)


@cli.command()
@click.option("--host", default=None, help="bind address (default SLUICE_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default SLUICE_API_PORT)")
def api(host: str | None, port: int | None) -> None:
    """Serve the HTTP API."""
    from sluice.api.server import serve

    serve(load_settings(), host=host, port=port)


FRESH_HELP = (
    "full refresh: once the run completed, delete the table's rows it did not contain "
    "(nothing is deleted when it failed, was cancelled or rejected rows)"
)


@cli.command("run")
@click.argument("slug")
@click.option(
    "--file", "path", required=True, type=click.Path(path_type=Path), help="file to import"
)
@click.option("--dry-run", is_flag=True, help="validate and count; write nothing to the table")
@click.option("--fresh", is_flag=True, help=FRESH_HELP)
@click.option("--wait", is_flag=True, help="wait for the run to finish, with a progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the run object as JSON")
def run_cmd(slug: str, path: Path, dry_run: bool, fresh: bool, wait: bool, as_json: bool) -> None:
    """Import PATH with the importer SLUG."""
    options = {"fresh": True} if fresh else None
    sys.exit(
        run_async(
            _submit_and_maybe_wait(
                slug, path, dry_run=dry_run, wait=wait, as_json=as_json, options=options
            )
        )
    )


@cli.command("trigger")
@click.argument("slug")
@click.option("--url", help="URL sources: the file to fetch")
@click.option("--path", help="filesystem sources: a path under SLUICE_FILE_ROOTS")
@click.option("--remote-file", "remote_file", help="FTP/SFTP: a file name in the folder")
@click.option("--pattern", help="FTP/SFTP: a glob; the newest matching file is imported")
@click.option("--param", "extra", multiple=True, metavar="KEY=VALUE", help="more source parameters")
@click.option("--dry-run", is_flag=True, help="validate and count; write nothing to the table")
@click.option("--fresh", is_flag=True, help=FRESH_HELP)
@click.option("--wait", is_flag=True, help="wait for the run to finish, with a progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the run object as JSON")
def trigger_cmd(
    slug: str,
    url: str | None,
    path: str | None,
    remote_file: str | None,
    pattern: str | None,
    extra: tuple[str, ...],
    dry_run: bool,
    fresh: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Start a run of SLUG that pulls its data (URL, FTP/SFTP, filesystem, paginated API)."""
    from sluice.service import Client

    params: dict[str, Any] = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param {item!r}: write KEY=VALUE", 2)
        params[key] = value
    given = {"url": url, "path": path, "file": remote_file, "pattern": pattern}
    params.update({k: v for k, v in given.items() if v is not None})

    async def go() -> int:
        async with Client(load_settings()) as client:
            run = await client.trigger(
                slug,
                params,
                dry_run=dry_run,
                requested_by=_user(),
                options={"fresh": True} if fresh else None,
            )
            if wait:
                bar = ProgressBar(sys.stderr.isatty() and not as_json)
                run = await client.wait(run.id, on_update=bar)
        click.echo(run_json(run) if as_json else summary(run))
        return EXIT_STATUS.get(run.status, 0) if wait else 0

    sys.exit(run_async(go()))


@cli.command()
@click.option("--url", help="Jetstream WebSocket URL (default SLUICE_FIREHOSE_URL)")
@click.option("--collection", "collections", multiple=True, help="only this NSID (repeatable)")
@click.option("--did", "dids", multiple=True, help="only this repository (repeatable)")
def firehose(url: str | None, collections: tuple[str, ...], dids: tuple[str, ...]) -> None:
    """Consume a Jetstream firehose into the firehose topic until Ctrl-C.

    The cursor (time_us) is kept in PostgreSQL at least every second; a restart resumes a few
    seconds (SLUICE_FIREHOSE_REWIND) before it. The workers apply the events to
    atproto.records. Metrics (the cursor lag, malformed events) are served like a worker's, on
    SLUICE_METRICS_PORT.
    """
    import signal

    from sluice.agents.firehose.leader import build_consumer, run_consumer
    from sluice.errors import InvalidConfig
    from sluice.metrics import WorkerMetrics, serve
    from sluice.schemas.events import DeadLetter
    from sluice.storage.db import create_pool
    from sluice.streams import kafka as clients
    from sluice.streams.admin import ensure_topics
    from sluice.streams.topics import Topics

    settings = load_settings()
    metrics = WorkerMetrics()
    metrics.dead_letters_from("jetstream")
    try:
        serve(metrics.registry, settings.metrics)
    except InvalidConfig as exc:
        fail(str(exc))

    async def go() -> int:
        kafka = settings.kafka
        names = Topics.of(kafka)
        await ensure_topics(kafka)
        pool = await create_pool(
            settings.database_url, schemas=settings.database.schemas, min_size=1, max_size=3
        )
        producer = clients.producer(
            kafka,
            linger_ms=5,
            max_batch_size=262144,  # small events: bigger batches, a third less CPU per event
        )
        await producer.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def publish(did: str, raw: bytes) -> None:
            await producer.send(names.firehose, raw, key=did.encode())

        async def dead_letter(raw: bytes, reason: str) -> None:
            letter = DeadLetter.of("jetstream", -1, -1, reason, raw)
            await producer.send(names.deadletter, letter.model_dump_json().encode())
            metrics.dead_letter("jetstream")
            metrics.firehose_malformed()

        consumer = build_consumer(
            pool,
            settings.firehose,
            publish,
            producer.flush,
            dead_letter,
            url=url,
            collections=collections or None,
            dids=dids or None,
        )
        metrics.watch_cursor(consumer.name, consumer.saved_cursor)
        click.echo(f"firehose {consumer.name}: {consumer.url} (Ctrl-C stops)", err=True)
        try:
            stats = await run_consumer(pool, consumer, stop)
        finally:
            await producer.stop()
            await pool.close()
        click.echo(
            f"firehose {consumer.name}: {stats.published:,} events published, "
            f"{stats.malformed:,} malformed, {stats.reconnects:,} reconnects",
            err=True,
        )
        return 0

    sys.exit(run_async(go()))


def _dids_from(dids: tuple[str, ...], file: Path | None) -> list[str]:
    found = list(dids)
    if file is not None:
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line)
    return list(dict.fromkeys(found))


@cli.command()
@click.argument("dids", nargs=-1)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="a file of DIDs, one per line",
)
@click.option("--collection", "collections", multiple=True, help="only this NSID (repeatable)")
@click.option("--resume", is_flag=True, help="also every repository whose backfill did not finish")
@click.option("--reset", is_flag=True, help="forget stored cursors and start these over")
@click.option("--queue", is_flag=True, help="hand the backfills to the workers and return")
@click.option("--json", "as_json", is_flag=True, help="print each repository's run as JSON")
def backfill(
    dids: tuple[str, ...],
    file: Path | None,
    collections: tuple[str, ...],
    resume: bool,
    reset: bool,
    queue: bool,
    as_json: bool,
) -> None:
    """Import repositories' history from their PDS (listRecords), combined with the firehose.

    A backfill continues from its stored cursor; completed collections are skipped unless
    --reset. Without --queue it runs here and prints each repository's outcome.
    """
    from sluice.agents.firehose.backfill import Backfiller
    from sluice.agents.firehose.project import projections_for
    from sluice.service import Client

    settings = load_settings()
    wanted = _dids_from(dids, file)

    async def go() -> int:
        async with Client(settings) as client:
            deps = await client.deps()
            backfiller = Backfiller(
                deps.pool,
                settings.firehose,
                settings.url,
                projections_for(deps.registry.all(), deps.applier),
            )
            try:
                todo = wanted + [d for d in await backfiller.unfinished_dids() if resume]
                todo = list(dict.fromkeys(todo))
                if not todo:
                    fail("name at least one DID (or --file, or --resume)", 2)
                if queue:
                    queued = await client.backfill(
                        todo, collections=list(collections), reset=reset, requested_by=_user()
                    )
                    click.echo(f"queued {len(queued)} backfills")
                    return 0
                from sluice.schemas.firehose import BackfillRequested

                worst = 0
                for did in todo:
                    try:
                        request = BackfillRequested(
                            did=did,
                            collections=list(collections),
                            reset=reset,
                            requested_by=_user(),
                        )
                    except ValueError:
                        fail(f"{did!r} is not a DID; write did:plc:... or did:web:...", 2)
                    run = await backfiller.backfill(request)
                    click.echo(run_json(run) if as_json else f"{did}: " + summary(run))
                    worst = max(worst, EXIT_STATUS.get(run.status, 0))
                return worst
            finally:
                await backfiller.close()

    sys.exit(run_async(go()))


@cli.command("backfill-status")
@click.argument("did", required=False)
@click.option("--pending", is_flag=True, help="only repositories not finished")
@click.option("--failed", is_flag=True, help="only failed ones")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def backfill_status(did: str | None, pending: bool, failed: bool, as_json: bool) -> None:
    """Backfill state per repository and collection."""
    from sluice.agents.firehose.backfill import Backfiller
    from sluice.storage.db import create_pool

    settings = load_settings()

    async def show() -> int:
        pool = await create_pool(
            settings.database_url, schemas=settings.database.schemas, min_size=1, max_size=2
        )
        try:
            states = await Backfiller(pool, settings.firehose, settings.url).states(
                did, "failed" if failed else None
            )
        finally:
            await pool.close()
        if pending:
            states = [s for s in states if s.status != "completed"]
        for s in states:
            if as_json:
                click.echo(s.model_dump_json())
            else:
                error = f"  {s.error}" if s.error else ""
                click.echo(
                    f"{s.did:40} {s.collection:28} {s.status:11} synced {s.records_synced:,}"
                    f"  skipped {s.records_skipped:,}  failed {s.records_failed:,}"
                    f"  pages {s.pages}{error}"
                )
        if not states and not as_json:
            click.echo("no backfill state")
        return 0

    sys.exit(run_async(show()))


@cli.command()
@click.option("--topic", help="only letters from this topic (sluice.requests, sluice.batches, ...)")
@click.option("--limit", type=int, help="the newest N letters")
@click.option("--replay", is_flag=True, help="send them back to their topics (once each)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dlq(topic: str | None, limit: int | None, replay: bool, as_json: bool) -> None:
    """Show the dead-letter topic: where each letter came from and why; --replay sends the
    messages back once their cause is fixed (every stage is idempotent)."""
    from sluice.dlq import read_letters
    from sluice.dlq import replay as replay_letters
    from sluice.storage.db import create_pool

    settings = load_settings()

    async def go() -> int:
        letters = await read_letters(settings.kafka, topic=topic, limit=limit)
        for item in letters:
            d = item.letter
            if as_json:
                click.echo(
                    orjson.dumps(
                        {
                            "dlq_partition": item.partition,
                            "dlq_offset": item.offset,
                            **d.model_dump(mode="json"),
                        }
                    ).decode()
                )
            else:
                click.echo(
                    f"{d.time:%Y-%m-%d %H:%M:%S} {d.topic}[{d.partition}]@{d.offset}: {d.reason}"
                )
        if not letters and not as_json:
            click.echo("no dead letters")
        if replay and letters:
            pool = await create_pool(
                settings.database_url, schemas=settings.database.schemas, min_size=1, max_size=2
            )
            try:
                done, skipped = await replay_letters(settings.kafka, pool, letters)
            finally:
                await pool.close()
            click.echo(f"replayed {len(done)} letters, skipped {len(skipped)}", err=True)
            for item, why in skipped[:20]:
                click.echo(f"  skipped {item.letter.topic}@{item.letter.offset}: {why}", err=True)
        return 0

    sys.exit(run_async(go()))


@cli.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--into", "table", required=True, help="target table (created when missing)")
@click.option("--key", required=True, help="key column(s), comma-separated")
@click.option("--schema", default="public", show_default=True, help="schema of the table")
@click.option("--dry-run", is_flag=True, help="validate and count; write nothing to the table")
@click.option("--fresh", is_flag=True, help=FRESH_HELP)
@click.option(
    "--null-marker",
    "null_markers",
    multiple=True,
    help="a cell value read as null (repeat for several; replaces the defaults "
    "NA, N/A, NULL, null, None, -); a blank cell is always null",
)
@click.option("--sheet", help="XLSX: the sheet to read (default: the first visible one)")
@click.option(
    "--no-evolve",
    is_flag=True,
    help="leave an existing table as it is: no new columns, no widened types (values that "
    "do not fit reject their rows)",
)
@click.option("--wait", is_flag=True, help="wait for the run to finish, with a progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the run object as JSON")
def import_cmd(
    path: Path,
    table: str,
    key: str,
    schema: str,
    dry_run: bool,
    fresh: bool,
    null_markers: tuple[str, ...],
    sheet: str | None,
    no_evolve: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Import PATH into TABLE without an importer: columns and types come from the file.

    A later file for the same table may add columns (they are added) or hold values that no
    longer fit a column's type (it is widened: integer to bigint to numeric, anything to text).
    """
    from sluice.schemas.importers import ADHOC

    keys = [k.strip() for k in key.split(",") if k.strip()]
    if not keys:
        fail("--key needs at least one column name", 2)
    options: dict[str, Any] = {"table": table, "key": keys, "schema": schema}
    if fresh:
        options["fresh"] = True
    if null_markers:
        options["null_markers"] = list(null_markers)
    if no_evolve:
        options["evolve"] = False
    if sheet:
        options["sheet"] = sheet
    sys.exit(
        run_async(
            _submit_and_maybe_wait(
                ADHOC, path, dry_run=dry_run, wait=wait, as_json=as_json, options=options
            )
        )
    )


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the run object as JSON")
def status(run_id: str, as_json: bool) -> None:
    """Show a run's status and counters."""
    from sluice.service import Client

    rid = _parse_run_id(run_id)

    async def show() -> int:
        async with Client(load_settings()) as client:
            run = await client.get_run(rid)
        click.echo(run_json(run) if as_json else summary(run))
        return 0

    sys.exit(run_async(show()))


def _parse_run_id(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        fail(f"{run_id!r} is not a run id (a UUID as printed by `sluice run`)", 2)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the cancelled run as JSON")
def cancel(run_id: str, as_json: bool) -> None:
    """Stop a queued or running run. Rows already applied stay; no batch is applied after."""
    from sluice.service import Client

    rid = _parse_run_id(run_id)

    async def go() -> int:
        async with Client(load_settings()) as client:
            run = await client.cancel(rid)
        click.echo(run_json(run) if as_json else summary(run))
        return 0

    sys.exit(run_async(go()))


@cli.command()
@click.argument("run_id")
@click.option("--dry-run", is_flag=True, help="validate and count; write nothing to the table")
@click.option("--wait", is_flag=True, help="wait for the child run to finish")
@click.option("--json", "as_json", is_flag=True, help="print the child run as JSON")
def retry(run_id: str, dry_run: bool, wait: bool, as_json: bool) -> None:
    """Import a run's rejected rows again, as a child run linked by parent_run_id."""
    from sluice.service import Client

    rid = _parse_run_id(run_id)

    async def go() -> int:
        async with Client(load_settings()) as client:
            run = await client.retry(rid, dry_run=dry_run, requested_by=_user())
            if wait:
                run = await client.wait(run.id, on_update=ProgressBar(sys.stderr.isatty()))
        click.echo(run_json(run) if as_json else summary(run))
        return EXIT_STATUS.get(run.status, 0) if wait else 0

    sys.exit(run_async(go()))


@cli.command()
@click.option("--status", type=click.Choice([s.value for s in RunStatus]), help="only this status")
@click.option("--importer", help="only runs of this importer")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="a JSON array of run objects")
def runs(status: str | None, importer: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    from sluice.service import Client

    async def go() -> int:
        async with Client(load_settings()) as client:
            found = await client.list_runs(status=status, importer=importer, limit=limit)
        if as_json:
            data = [r.model_dump(mode="json", exclude={"options"}) for r in found]
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return 0
        click.echo(f"{'run':36}  {'importer':16} {'status':22} {'rows':>10} {'failed':>8}  queued")
        for r in found:
            click.echo(
                f"{r.id}  {r.importer:16.16} {r.status.value:22} {r.processed_rows:>10,}"
                f" {r.failed_rows:>8,}  {r.queued_at:%Y-%m-%d %H:%M:%S}"
            )
        return 0

    sys.exit(run_async(go()))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the full definitions as JSON")
def importers(as_json: bool) -> None:
    """List the registered importers: sources, key and duplicate policy."""
    from sluice.importers.registry import build_registry

    registry = build_registry(PipelineSettings().importers)
    found = [i.describe() for i in registry.all()]
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    for d in found:
        key = d["key_template"] or ", ".join(d["key"])
        click.echo(
            f"{d['slug']:20} -> {d['table']:28} key ({key})  policy {d['policy']}"
            f"  sources {', '.join(d['sources'])}"
        )
        if d["schedule"]:
            click.echo(f"{'':20}    schedule {d['schedule']} (`sluice schedules` for its state)")
        if d["description"]:
            click.echo(f"{'':20}    {d['description']}")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the schedules as JSON")
@click.pass_context
def schedules(ctx: click.Context, as_json: bool) -> None:
    """List the importers' schedules: cron, paused or not, next and last time."""
    if ctx.invoked_subcommand is not None:
        return
    from sluice.agents.schedule import schedules as list_schedules

    async def show() -> int:
        deps = await command_deps(load_settings())
        try:
            found = await list_schedules(deps)
        finally:
            await deps.close()
        if as_json:
            data = [f.model_dump(mode="json") for f in found]
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return 0
        if not found:
            click.echo("no importer has a schedule")
        for f in found:
            state = "paused" if f.paused else f"next {f.next_fire:%Y-%m-%d %H:%M:%S}Z"
            last = f"last {f.last_fire:%Y-%m-%d %H:%M:%S}Z {f.last_outcome}" if f.last_fire else ""
            click.echo(f"{f.importer:20} {f.cron:20} {state}  {last}".rstrip())
        return 0

    sys.exit(run_async(show()))


def _set_paused(slug: str, paused: bool) -> None:
    from sluice.agents.schedule import set_paused

    async def go() -> int:
        deps = await command_deps(load_settings())
        try:
            await set_paused(deps, slug, paused)
        finally:
            await deps.close()
        click.echo(f"schedule of {slug} {'paused' if paused else 'resumed'}")
        return 0

    sys.exit(run_async(go()))


@schedules.command("pause")
@click.argument("slug")
def schedules_pause(slug: str) -> None:
    """Stop starting scheduled runs of SLUG (runs going on are not touched)."""
    _set_paused(slug, True)


@schedules.command("resume")
@click.argument("slug")
def schedules_resume(slug: str) -> None:
    """Start scheduled runs of SLUG again, from its next scheduled time."""
    _set_paused(slug, False)


@cli.command()
@click.argument("run_id")
@click.option(
    "--status",
    type=click.Choice(["pending", "processing", "completed", "failed"]),
    help="only items in this state",
)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def items(run_id: str, status: str | None, limit: int, as_json: bool) -> None:
    """The items of a paginated API run: state, failures and the last error of each."""
    from sluice.service import Client

    rid = _parse_run_id(run_id)

    async def show() -> int:
        async with Client(load_settings()) as client:
            await client.get_run(rid)
            repo = (await client.deps()).items
            counts = await repo.counts(rid)
            found = await repo.list(rid, status=status, limit=limit)
        if as_json:
            for item in found:
                click.echo(orjson.dumps(item, default=str).decode())
            return 0
        click.echo("  ".join(f"{k} {v:,}" for k, v in counts.items()))
        for item in found:
            error = f"  {item['last_error']}" if item["last_error"] else ""
            click.echo(
                f"{item['external_id']:24} {item['status']:10} "
                f"failures {item['failure_count']}{error}"
            )
        return 0

    sys.exit(run_async(show()))


@cli.command()
@click.option("--run", "run_id", metavar="RUN_ID", default=None, help="only this run's events")
@click.option(
    "--importer", "importers", metavar="SLUG", multiple=True, help="only runs of this importer"
)
@click.option(
    "--type",
    "types",
    multiple=True,
    metavar="TYPE",
    help="only this event type, e.g. run.failed (repeatable)",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines, the events as on the topic")
def tail(
    run_id: str | None, importers: tuple[str, ...], types: tuple[str, ...], as_json: bool
) -> None:
    """Follow lifecycle events live, one line per event, until Ctrl-C.

    Starts at the newest event: runs started after the command are shown from their first event.
    """
    from sluice.schemas.events import LifecycleEvent
    from sluice.sdk import subscribe

    rid = _parse_run_id(run_id) if run_id else None
    settings = load_settings()

    def line(event: LifecycleEvent) -> str:
        c = event.counters
        total = f"{c.total_rows:,}" if c.total_rows is not None else "?"
        text = (
            f"{event.time.astimezone():%Y-%m-%d %H:%M:%S}  {event.type:14} {event.run_id}"
            f"  {event.importer:16.16} {event.status.value:22} {c.processed_rows:,}/{total} rows"
            f"  failed {c.failed_rows:,}"
        )
        return f"{text}  error: {event.error}" if event.error else text

    async def follow() -> int:
        async with subscribe(
            run_id=rid, importers=importers or None, types=types or None, settings=settings
        ) as events:
            click.echo("following lifecycle events; Ctrl-C to stop", err=True)
            async for event in events:
                click.echo(event.model_dump_json() if as_json else line(event))
        return 0

    try:
        sys.exit(run_async(follow()))
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
@click.option("--failed", is_flag=True, help="only deliveries that failed for good")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="a JSON array of delivery log rows")
def webhooks(failed: bool, limit: int, as_json: bool) -> None:
    """List webhook deliveries, newest first: status, attempts and the last answer."""
    from sluice.schemas.webhooks import DeliveryStatus
    from sluice.service import Client
    from sluice.storage.webhooks import DeliveryLog

    async def show() -> int:
        async with Client(load_settings()) as client:
            found = await DeliveryLog((await client.deps()).pool).list(
                status=DeliveryStatus.FAILED if failed else None, limit=limit
            )
        if as_json:
            data = [d.model_dump(mode="json") for d in found]
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return 0
        click.echo(
            f"{'id':>6}  {'status':9} {'tries':>5} {'code':>4}  {'event':13} {'run':36}"
            f"  {'created':19}  url"
        )
        for d in found:
            code = str(d.last_status_code) if d.last_status_code is not None else "-"
            click.echo(
                f"{d.id:>6}  {d.status.value:9} {d.attempts:>5} {code:>4}  {d.event_type:13}"
                f" {d.run_id!s:36}  {d.created_at.astimezone():%Y-%m-%d %H:%M:%S}  {d.url}"
            )
            if d.last_error and d.status is not DeliveryStatus.DELIVERED:
                when = d.next_attempt_at
                retry = f"; next attempt {when.astimezone():%H:%M:%S}" if when else ""
                click.echo(f"{'':8}last error: {d.last_error}{retry}")
        return 0

    sys.exit(run_async(show()))


@cli.command("prune-files")
@click.option(
    "--hours",
    type=click.FloatRange(min=0),
    default=None,
    help="keep files of runs finished within this many hours [SLUICE_FILE_RETENTION_HOURS, 24]",
)
def prune_files_cmd(hours: float | None) -> None:
    """Delete stored files of runs that finished more than HOURS ago."""
    from sluice.storage.filestore import prune_files

    settings = load_settings()
    keep = settings.pipeline.file_retention_hours if hours is None else hours

    async def go() -> int:
        deps = await command_deps(settings)
        try:
            n, size = await prune_files(deps.files, keep)
        finally:
            await deps.close()
        click.echo(f"deleted {n} stored file(s), {size:,} bytes, older than {keep:g} hours")
        return 0

    sys.exit(run_async(go()))


@cli.command("prune-rows")
@click.option(
    "--days",
    type=click.FloatRange(min=0),
    default=None,
    help="keep runs finished within this many days [SLUICE_RUN_RETENTION_DAYS, 30]",
)
def prune_rows_cmd(days: float | None) -> None:
    """Delete finished runs older than DAYS with their rejected rows and events."""
    settings = load_settings()
    keep = settings.pipeline.run_retention_days if days is None else days

    async def go() -> int:
        deps = await command_deps(settings)
        try:
            runs, rows = await deps.runs.prune(keep)
        finally:
            await deps.close()
        click.echo(
            f"deleted {runs} finished run(s) and {rows} rejected row(s), older than {keep:g} days"
        )
        return 0

    sys.exit(run_async(go()))


@cli.command("failed-rows")
@click.argument("run_id")
@click.option(
    "--csv", "as_csv", is_flag=True, help="CSV with one column per field, to fix and retry"
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines: row_number, sub, raw, reason")
@click.option("--limit", type=int, default=None, help="at most this many rows")
def failed_rows(run_id: str, as_csv: bool, as_json: bool, limit: int | None) -> None:
    """Print the rows a run rejected, with their reasons."""
    from sluice.service import Client

    rid = _parse_run_id(run_id)

    async def show() -> int:
        async with Client(load_settings()) as client:
            await client.get_run(rid)  # a clear error for an unknown run
            rows = await (await client.deps()).runs.failed_rows(rid, limit=limit)
        if as_csv:
            failed_rows_csv(rows, sys.stdout)
        elif as_json:
            for f in rows:
                line = {"row_number": f.row_number, "sub": f.sub, "raw": f.raw, "reason": f.reason}
                click.echo(orjson.dumps(line, default=str).decode())
        else:
            for f in rows:
                click.echo(f"row {f.row_number}: {f.reason}")
        return 0

    sys.exit(run_async(show()))


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per setting")
@click.option("--all", "show_all", is_flag=True, help="also the settings left at their default")
@click.option("--markdown", is_flag=True, help="the table of every setting and its default")
def config_cmd(as_json: bool, show_all: bool, markdown: bool) -> None:
    """Print the effective settings (environment, .env file, the running stack), secrets masked.

    Example: `sluice config --all` lists every setting with its default.
    """
    from sluice.config import setting_rows, settings_markdown

    if markdown:
        click.echo(settings_markdown(), nl=False)
        return
    settings = load_settings(require_stack=False)
    for row in setting_rows(settings):
        if not show_all and row.value == row.default:
            continue
        if as_json:
            click.echo(
                orjson.dumps(
                    {
                        "name": row.env,
                        "value": row.value,
                        "default": row.default,
                        "secret": row.secret,
                        "description": row.description,
                    }
                ).decode()
            )
        else:
            click.echo(f"{row.env}={row.value}")


def main() -> None:
    from sluice.env import load_env_file

    try:
        load_env_file()
    except SluiceError as exc:
        fail(str(exc))
    cli(prog_name="sluice")
