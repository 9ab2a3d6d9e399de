"""The AT Protocol firehose and its backfill: consume a Jetstream (``firehose``), import
repositories' history (``backfill``) and show how far it got (``backfill-status``)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from sluice.cli.common import (
    EXIT_STATUS,
    EXIT_USAGE,
    exit_with,
    fail,
    load_settings,
    run_json,
    summary,
    user,
)
from sluice.config import Settings
from sluice.errors import InvalidRequest
from sluice.metrics import WorkerMetrics
from sluice.service import Client, backfill_request


@click.command()
@click.option("--url", help="Jetstream WebSocket URL (default SLUICE_FIREHOSE_URL)")
@click.option("--collection", "collections", multiple=True, help="only this NSID (repeatable)")
@click.option("--did", "dids", multiple=True, help="only this repository (repeatable)")
def firehose(url: str | None, collections: tuple[str, ...], dids: tuple[str, ...]) -> None:
    """Consume a Jetstream firehose into the firehose topic until Ctrl-C.

    The cursor (time_us) is kept in PostgreSQL at least every second; a restart resumes a few
    seconds (SLUICE_FIREHOSE_REWIND) before it. The workers apply the events to
    atproto.records. Metrics (the cursor lag, malformed events) are served like a worker's, on
    SLUICE_METRICS_PORT.

    \b
    Example:
      sluice firehose --collection app.bsky.feed.post
    """
    from sluice.errors import InvalidConfig
    from sluice.metrics import serve

    settings = load_settings()
    metrics = WorkerMetrics()
    metrics.dead_letters_from("jetstream")
    try:
        serve(metrics.registry, settings.metrics)
    except InvalidConfig as exc:
        fail(str(exc))
    exit_with(_consume(settings, metrics, url, collections or None, dids or None))


async def _consume(
    settings: Settings,
    metrics: WorkerMetrics,
    url: str | None,
    collections: tuple[str, ...] | None,
    dids: tuple[str, ...] | None,
) -> int:
    """Publish the Jetstream's events to the firehose topic until SIGINT or SIGTERM."""
    from sluice.agents.firehose.leader import build_consumer, run_consumer
    from sluice.schemas.events import DeadLetter
    from sluice.storage.db import create_pool
    from sluice.streams import kafka as clients
    from sluice.streams.admin import ensure_topics
    from sluice.streams.publish import KeyedBatches
    from sluice.streams.topics import Topics

    kafka = settings.kafka
    names = Topics.of(kafka)
    await ensure_topics(kafka)
    pool = await create_pool(
        settings.database_url, schemas=settings.database.schemas, min_size=1, max_size=3
    )
    producer = clients.event_producer(kafka)
    await producer.start()
    events = KeyedBatches(producer, names.firehose, linger=settings.firehose.linger_ms / 1000)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def publish(did: str, raw: bytes) -> None:
        await events.send(did.encode(), raw)

    async def dead_letter(raw: bytes, reason: str) -> None:
        letter = DeadLetter.of("jetstream", -1, -1, reason, raw)
        await producer.send(names.deadletter, letter.model_dump_json().encode())
        metrics.dead_letter("jetstream")
        metrics.firehose_malformed()

    consumer = build_consumer(
        pool,
        settings.firehose,
        publish,
        events.flush,
        dead_letter,
        url=url,
        collections=collections,
        dids=dids,
        max_event_bytes=clients.event_limit(kafka),
    )
    metrics.watch_cursor(consumer.name, consumer.saved_cursor)
    click.echo(f"firehose {consumer.name}: {consumer.url} (Ctrl-C stops)", err=True)
    try:
        async with events:
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


def _dids_from(dids: tuple[str, ...], file: Path | None) -> list[str]:
    found = list(dids)
    if file is not None:
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line)
    return list(dict.fromkeys(found))


@click.command()
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

    \b
    Examples:
      sluice backfill did:plc:z72i7hdynmk6r22z27h6tvur --collection app.bsky.feed.post
      sluice backfill --file dids.txt --queue
    """
    settings = load_settings()
    wanted = _dids_from(dids, file)
    exit_with(
        _backfill(
            settings,
            wanted,
            list(collections),
            resume=resume,
            reset=reset,
            queue=queue,
            as_json=as_json,
        )
    )


async def _backfill(
    settings: Settings,
    wanted: list[str],
    collections: list[str],
    *,
    resume: bool,
    reset: bool,
    queue: bool,
    as_json: bool,
) -> int:
    """Queue the backfills, or run them here one repository after the other; the exit code
    is the worst outcome's."""
    from sluice.agents.firehose.backfill import Backfiller
    from sluice.agents.firehose.project import projections_for

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
                fail("name at least one DID (or --file, or --resume)", EXIT_USAGE)
            if queue:
                queued = await client.backfill(
                    todo, collections=collections, reset=reset, requested_by=user()
                )
                click.echo(f"queued {len(queued)} backfills")
                return 0
            worst = 0
            for did in todo:
                try:
                    request = backfill_request(
                        did, collections=collections, reset=reset, requested_by=user()
                    )
                except InvalidRequest as exc:
                    fail(str(exc), EXIT_USAGE)
                run = await backfiller.backfill(request)
                click.echo(run_json(run) if as_json else f"{did}: " + summary(run))
                worst = max(worst, EXIT_STATUS.get(run.status, 0))
            return worst
        finally:
            await backfiller.close()


@click.command("backfill-status")
@click.argument("did", required=False)
@click.option("--pending", is_flag=True, help="only repositories not finished")
@click.option("--failed", is_flag=True, help="only failed ones")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def backfill_status(did: str | None, pending: bool, failed: bool, as_json: bool) -> None:
    """Backfill state per repository and collection.

    \b
    Example:
      sluice backfill-status --failed
    """
    settings = load_settings()

    async def show() -> int:
        async with Client(settings) as client:
            states = await client.backfill_states(did, "failed" if failed else None)
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

    exit_with(show())


COMMANDS = (firehose, backfill, backfill_status)
