"""Operating a deployment: retention (``prune-files``, ``prune-rows``), the dead-letter topic
(``dlq``), webhook deliveries, schedules, and the live lifecycle events (``tail``)."""

from __future__ import annotations

import sys

import click

from sluice.cli.common import (
    command_deps,
    echo_json,
    echo_json_line,
    exit_with,
    load_settings,
    parse_run_id,
    run_async,
)
from sluice.schemas.events import LifecycleEvent
from sluice.service import Client


@click.command("prune-files")
@click.option(
    "--hours",
    type=click.FloatRange(min=0),
    default=None,
    help="keep files of runs finished within this many hours [SLUICE_FILE_RETENTION_HOURS, 24]",
)
def prune_files_cmd(hours: float | None) -> None:
    """Delete stored files of runs that finished more than HOURS ago.

    \b
    Example:
      sluice prune-files --hours 48
    """
    from sluice.storage.filestore import prune_files

    settings = load_settings()
    keep = settings.pipeline.file_retention_hours if hours is None else hours

    async def go() -> int:
        async with command_deps(settings) as deps:
            n, size = await prune_files(deps.files, keep)
        click.echo(f"deleted {n} stored file(s), {size:,} bytes, older than {keep:g} hours")
        return 0

    exit_with(go())


@click.command("prune-rows")
@click.option(
    "--days",
    type=click.FloatRange(min=0),
    default=None,
    help="keep runs finished within this many days [SLUICE_RUN_RETENTION_DAYS, 30]",
)
def prune_rows_cmd(days: float | None) -> None:
    """Delete finished runs older than DAYS with their rejected rows and events.

    \b
    Example:
      sluice prune-rows --days 90
    """
    settings = load_settings()
    keep = settings.pipeline.run_retention_days if days is None else days

    async def go() -> int:
        async with command_deps(settings) as deps:
            runs, rows = await deps.runs.prune(keep)
        click.echo(
            f"deleted {runs} finished run(s) and {rows} rejected row(s), older than {keep:g} days"
        )
        return 0

    exit_with(go())


@click.command()
@click.option("--topic", help="only letters from this topic (sluice.requests, sluice.batches, ...)")
@click.option("--limit", type=int, help="the newest N letters")
@click.option("--replay", is_flag=True, help="send them back to their topics (once each)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dlq(topic: str | None, limit: int | None, replay: bool, as_json: bool) -> None:
    """Show the dead-letter topic: where each letter came from and why; --replay sends the
    messages back once their cause is fixed (every stage is idempotent).

    \b
    Examples:
      sluice dlq --topic sluice.batches
      sluice dlq --replay
    """
    from sluice.dlq import read_letters
    from sluice.dlq import replay as replay_letters
    from sluice.storage.db import create_pool

    settings = load_settings()

    async def go() -> int:
        letters = await read_letters(settings.kafka, topic=topic, limit=limit)
        for item in letters:
            d = item.letter
            if as_json:
                echo_json_line(
                    {
                        "dlq_partition": item.partition,
                        "dlq_offset": item.offset,
                        **d.model_dump(mode="json"),
                    }
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

    exit_with(go())


@click.command()
@click.option("--failed", is_flag=True, help="only deliveries that failed for good")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="a JSON array of delivery log rows")
def webhooks(failed: bool, limit: int, as_json: bool) -> None:
    """List webhook deliveries, newest first: status, attempts and the last answer.

    \b
    Example:
      sluice webhooks --failed
    """
    from sluice.schemas.webhooks import DeliveryStatus
    from sluice.storage.webhooks import DeliveryLog

    async def show() -> int:
        async with Client(load_settings()) as client:
            found = await DeliveryLog((await client.deps()).pool).list(
                status=DeliveryStatus.FAILED if failed else None, limit=limit
            )
        if as_json:
            echo_json([d.model_dump(mode="json") for d in found])
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

    exit_with(show())


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the schedules as JSON")
@click.pass_context
def schedules(ctx: click.Context, as_json: bool) -> None:
    """List the importers' schedules: cron, paused or not, next and last time.

    \b
    Example:
      sluice schedules --json
    """
    if ctx.invoked_subcommand is not None:
        return
    from sluice.agents.schedule import schedules as list_schedules

    async def show() -> int:
        async with command_deps(load_settings()) as deps:
            found = await list_schedules(deps)
        if as_json:
            echo_json([f.model_dump(mode="json") for f in found])
            return 0
        if not found:
            click.echo("no importer has a schedule")
        for f in found:
            state = "paused" if f.paused else f"next {f.next_fire:%Y-%m-%d %H:%M:%S}Z"
            last = f"last {f.last_fire:%Y-%m-%d %H:%M:%S}Z {f.last_outcome}" if f.last_fire else ""
            click.echo(f"{f.importer:20} {f.cron:20} {state}  {last}".rstrip())
        return 0

    exit_with(show())


def _set_paused(slug: str, paused: bool) -> None:
    from sluice.agents.schedule import set_paused

    async def go() -> int:
        async with command_deps(load_settings()) as deps:
            await set_paused(deps, slug, paused)
        click.echo(f"schedule of {slug} {'paused' if paused else 'resumed'}")
        return 0

    exit_with(go())


@schedules.command("pause")
@click.argument("slug")
def schedules_pause(slug: str) -> None:
    """Stop starting scheduled runs of SLUG (runs going on are not touched).

    \b
    Example:
      sluice schedules pause orders
    """
    _set_paused(slug, True)


@schedules.command("resume")
@click.argument("slug")
def schedules_resume(slug: str) -> None:
    """Start scheduled runs of SLUG again, from its next scheduled time.

    \b
    Example:
      sluice schedules resume orders
    """
    _set_paused(slug, False)


def event_line(event: LifecycleEvent) -> str:
    """One line of ``sluice tail``: time, type, run, importer, status and counters."""
    c = event.counters
    total = f"{c.total_rows:,}" if c.total_rows is not None else "?"
    text = (
        f"{event.time.astimezone():%Y-%m-%d %H:%M:%S}  {event.type:14} {event.run_id}"
        f"  {event.importer:16.16} {event.status.value:22} {c.processed_rows:,}/{total} rows"
        f"  failed {c.failed_rows:,}"
    )
    return f"{text}  error: {event.error}" if event.error else text


@click.command()
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

    \b
    Example:
      sluice tail --importer products --type run.failed
    """
    from sluice.sdk import subscribe

    rid = parse_run_id(run_id) if run_id else None
    settings = load_settings()

    async def follow() -> int:
        async with subscribe(
            run_id=rid, importers=importers or None, types=types or None, settings=settings
        ) as events:
            click.echo("following lifecycle events; Ctrl-C to stop", err=True)
            async for event in events:
                click.echo(event.model_dump_json() if as_json else event_line(event))
        return 0

    try:
        sys.exit(run_async(follow()))
    except KeyboardInterrupt:
        sys.exit(0)


COMMANDS = (prune_files_cmd, prune_rows_cmd, dlq, webhooks, schedules, tail)
