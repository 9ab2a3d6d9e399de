"""Imports and runs: start one (``run``, ``import``, ``trigger``), follow and manage it
(``status``, ``runs``, ``cancel``, ``retry``), what it rejected (``failed-rows``) and, for a
paginated API run, its items; the registered importers."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from sluice.cli.common import (
    EXIT_USAGE,
    ProgressBar,
    cancel_on_interrupt_option,
    echo_json,
    echo_json_line,
    exit_with,
    fail,
    load_settings,
    parse_run_id,
    report,
    user,
)
from sluice.errors import InvalidRequest
from sluice.schemas.runs import ItemStatus, Run, RunStatus
from sluice.service import Client, adhoc_options, failed_rows_csv, run_options

FRESH_HELP = (
    "full refresh: once the run completed, delete the table's rows it did not contain "
    "(nothing is deleted when it failed, was cancelled or rejected rows)"
)
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="validate and count; write nothing to the table"
)
fresh_option = click.option("--fresh", is_flag=True, help=FRESH_HELP)


def reading_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--date-format`` (repeatable) and ``--decimal-comma``: how the file writes dates and
    numbers, for the fields that do not say themselves."""
    command = click.option(
        "--decimal-comma",
        is_flag=True,
        help="numbers are written 1.234,5 (decimal comma, '.' between thousands)",
    )(command)
    return click.option(
        "--date-format",
        "date_formats",
        multiple=True,
        metavar="FORMAT",
        help="how dates are written, as for strptime: %d/%m/%Y, %d.%m.%Y (repeat to try "
        "several in order; ISO 8601 is always read)",
    )(command)


def _options(build: Callable[..., dict[str, Any] | None], **given: Any) -> dict[str, Any] | None:
    """A run's options from a command's (``run_options``, ``adhoc_options``); one that cannot
    be used (a date format without a day, say) is a usage error."""
    try:
        return build(**given)
    except InvalidRequest as exc:
        fail(str(exc), EXIT_USAGE)


_wait_flag = click.option(
    "--wait", is_flag=True, help="wait for the run to finish, with a progress bar"
)


def wait_option(command: Callable[..., None]) -> Callable[..., None]:
    """``--wait`` and ``--cancel-on-interrupt``; the latter is read by ``report`` from the
    command's context, so the commands' own parameters stay the run's."""
    return _wait_flag(cancel_on_interrupt_option(command))


json_option = click.option("--json", "as_json", is_flag=True, help="print the run object as JSON")


async def _submit(
    importer: str,
    path: Path,
    *,
    dry_run: bool,
    wait: bool,
    as_json: bool,
    options: dict[str, Any] | None = None,
) -> int:
    async with Client(load_settings()) as client:
        run = await client.submit_file(
            importer, path, dry_run=dry_run, options=options, requested_by=user()
        )
        return await report(client, run, wait=wait, as_json=as_json)


@click.command("run")
@click.argument("slug")
@click.argument("stray", nargs=-1, metavar="")
@click.option("--file", "path", type=click.Path(path_type=Path), help="file to import")
@dry_run_option
@fresh_option
@click.option(
    "--sheet", help="XLSX: the sheet to read (default: the importer's, else the first visible one)"
)
@reading_options
@wait_option
@json_option
def run_cmd(
    slug: str,
    stray: tuple[str, ...],
    path: Path | None,
    dry_run: bool,
    fresh: bool,
    sheet: str | None,
    date_formats: tuple[str, ...],
    decimal_comma: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Import a file with the importer SLUG.

    \b
    Examples:
      sluice run products --file products.csv --wait
      sluice run prices --file preise.csv --date-format %d.%m.%Y --decimal-comma
    """
    if stray or path is None:
        given = stray[0] if stray else "FILE"
        fail(f"the file goes in --file: sluice run {slug} --file {given}", EXIT_USAGE)
    options = _options(
        run_options,
        fresh=fresh,
        date_formats=date_formats,
        decimal_comma=decimal_comma,
        sheet=sheet,
    )
    exit_with(_submit(slug, path, dry_run=dry_run, wait=wait, as_json=as_json, options=options))


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--into", "table", required=True, help="target table (created when missing)")
@click.option("--key", required=True, help="key column(s), comma-separated")
@click.option("--schema", default="public", show_default=True, help="schema of the table")
@dry_run_option
@fresh_option
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
@reading_options
@wait_option
@json_option
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
    date_formats: tuple[str, ...],
    decimal_comma: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Import PATH into TABLE without an importer: columns and types come from the file.

    A later file for the same table may add columns (they are added) or hold values that no
    longer fit a column's type (it is widened: integer to bigint to numeric, anything to text).
    Decimal commas (24,32) and day- or month-first dates (25.03.2024, 03/25/2024) are read as
    numbers and dates when the sample shows them; --decimal-comma and --date-format say so
    where it cannot (a column whose dates all have a day of 12 or less stays text otherwise).

    \b
    Examples:
      sluice import products.csv --into products --key sku --wait
      sluice import preise.csv --into preise --key artikel --decimal-comma
    """
    from sluice.schemas.importers import ADHOC

    if not [k for k in key.split(",") if k.strip()]:
        fail("--key needs at least one column name", EXIT_USAGE)
    options = _options(
        adhoc_options,
        table=table,
        key=key,
        schema=schema,
        null_markers=null_markers,
        evolve=not no_evolve,
        sheet=sheet,
        fresh=fresh,
        date_formats=date_formats,
        decimal_comma=decimal_comma,
    )
    exit_with(_submit(ADHOC, path, dry_run=dry_run, wait=wait, as_json=as_json, options=options))


def _trigger_params(extra: tuple[str, ...], given: dict[str, str | None]) -> dict[str, Any]:
    """The source's parameters: ``--param KEY=VALUE`` pairs, then the named options given."""
    params: dict[str, Any] = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param {item!r}: write KEY=VALUE", EXIT_USAGE)
        params[key] = value
    params.update({k: v for k, v in given.items() if v is not None})
    return params


@click.command("trigger")
@click.argument("slug")
@click.option("--url", help="URL sources: the file to fetch")
@click.option("--path", help="filesystem sources: a path under SLUICE_FILE_ROOTS")
@click.option("--remote-file", "remote_file", help="FTP/SFTP: a file name in the folder")
@click.option("--pattern", help="FTP/SFTP: a glob; the newest matching file is imported")
@click.option("--param", "extra", multiple=True, metavar="KEY=VALUE", help="more source parameters")
@dry_run_option
@fresh_option
@click.option(
    "--full",
    is_flag=True,
    help="an incremental API source: list everything, not only what changed since the last"
    " completed run",
)
@wait_option
@json_option
def trigger_cmd(
    slug: str,
    url: str | None,
    path: str | None,
    remote_file: str | None,
    pattern: str | None,
    extra: tuple[str, ...],
    dry_run: bool,
    fresh: bool,
    full: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Start a run of SLUG that pulls its data (URL, FTP/SFTP, filesystem, paginated API).

    \b
    Examples:
      sluice trigger prices --url https://example.com/prices.csv --wait
      sluice trigger orders --param since=2026-01-01
    """
    params = _trigger_params(
        extra, {"url": url, "path": path, "file": remote_file, "pattern": pattern}
    )

    async def go() -> int:
        async with Client(load_settings()) as client:
            run = await client.trigger(
                slug,
                params,
                dry_run=dry_run,
                requested_by=user(),
                options=run_options(fresh=fresh, full=full),
            )
            return await report(client, run, wait=wait, as_json=as_json)

    exit_with(go())


def _on_run(
    run_id: str, as_json: bool, action: Callable[[Client, uuid.UUID], Awaitable[Run]]
) -> None:
    """Do ``action`` to the run and print the run it answers."""
    rid = parse_run_id(run_id)

    async def go() -> int:
        async with Client(load_settings()) as client:
            return await report(client, await action(client, rid), wait=False, as_json=as_json)

    exit_with(go())


@click.command()
@click.argument("run_id")
@json_option
def status(run_id: str, as_json: bool) -> None:
    """Show a run's status and counters.

    \b
    Example:
      sluice status 5f0c...e2 --json
    """
    _on_run(run_id, as_json, Client.get_run)


def parse_statuses(value: str | None) -> list[str] | None:
    if value is None:
        return None
    try:
        return [s.value for s in RunStatus.parse_many(value)]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option(
    "--status",
    callback=lambda _ctx, _param, value: parse_statuses(value),
    metavar="STATUS[,STATUS]",
    help="only these statuses: one, or several separated by commas (failed,cancelled)",
)
@click.option("--importer", help="only runs of this importer")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="a JSON array of run objects")
def runs(status: list[str] | None, importer: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first.

    \b
    Example:
      sluice runs --status failed,cancelled --importer products
    """

    async def go() -> int:
        async with Client(load_settings()) as client:
            found = await client.list_runs(status=status, importer=importer, limit=limit)
        if as_json:
            echo_json([r.model_dump(mode="json", exclude={"options"}) for r in found])
            return 0
        click.echo(f"{'run':36}  {'importer':24} {'status':22} {'rows':>10} {'failed':>8}  queued")
        for r in found:
            click.echo(
                f"{r.id}  {r.label:24.24} {r.status.value:22} {r.processed_rows:>10,}"
                f" {r.failed_rows:>8,}  {r.queued_at:%Y-%m-%d %H:%M:%S}"
            )
        return 0

    exit_with(go())


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the cancelled run as JSON")
def cancel(run_id: str, as_json: bool) -> None:
    """Stop a queued or running run. Rows already applied stay; no batch is applied after.

    \b
    Example:
      sluice cancel 8c1d2f0a-1b2c-4d5e-8f90-123456789abc
    """
    _on_run(run_id, as_json, Client.cancel)


@click.command()
@click.argument("run_id")
@dry_run_option
@click.option("--wait", is_flag=True, help="wait for the child run to finish")
@cancel_on_interrupt_option
@click.option("--json", "as_json", is_flag=True, help="print the child run as JSON")
def retry(run_id: str, dry_run: bool, wait: bool, as_json: bool) -> None:
    """Import a run's rejected rows again, as a child run linked by parent_run_id.

    \b
    Example:
      sluice retry RUN_ID --wait
    """
    rid = parse_run_id(run_id)

    async def go() -> int:
        async with Client(load_settings()) as client:
            run = await client.retry(rid, dry_run=dry_run, requested_by=user())
            # On a terminal the bar shows even with --json (it goes to stderr).
            bar = ProgressBar(sys.stderr.isatty())
            return await report(client, run, wait=wait, as_json=as_json, progress=bar)

    exit_with(go())


@click.command("failed-rows")
@click.argument("run_id")
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="CSV of the rows in their file's columns (a wide meter row stays one line): fix it and"
    " import it again with `sluice run IMPORTER --file FIXED.csv`",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines: row_number, sub, raw, reason")
@click.option("--limit", type=int, default=None, help="at most this many rows")
def failed_rows(run_id: str, as_csv: bool, as_json: bool, limit: int | None) -> None:
    """Print the rows a run rejected, with their reasons.

    \b
    Example (fix the rows, import them again):
      sluice failed-rows RUN_ID --csv > fix.csv
      sluice run IMPORTER --file fix.csv
    """
    rid = parse_run_id(run_id)

    async def show() -> int:
        async with Client(load_settings()) as client:
            rows = await client.failed_rows(rid, limit=limit)
            run = await client.get_run(rid) if not rows else None
        if run is not None:
            # Said on stderr: stdout stays an empty CSV or JSON stream for scripts.
            what = "is still going" if not run.status.terminal else f"ended {run.status.value}"
            click.echo(
                f"run {rid} rejected no rows ({run.processed_rows:,} processed; it {what})",
                err=True,
            )
        if as_csv:
            failed_rows_csv(rows, sys.stdout)
        elif as_json:
            for f in rows:
                echo_json_line(
                    {"row_number": f.row_number, "sub": f.sub, "raw": f.raw, "reason": f.reason}
                )
        else:
            for f in rows:
                click.echo(f"row {f.row_number}: {f.reason}")
        return 0

    exit_with(show())


@click.command()
@click.argument("run_id")
@click.option(
    "--status",
    type=click.Choice([s.value for s in ItemStatus]),
    help="only items in this state",
)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def items(run_id: str, status: str | None, limit: int, as_json: bool) -> None:
    """The items of a paginated API run: state, failures and the last error of each.

    \b
    Example:
      sluice items 8c1d2f0a-1b2c-4d5e-8f90-123456789abc --status failed
    """
    rid = parse_run_id(run_id)
    state = ItemStatus(status) if status else None

    async def show() -> int:
        async with Client(load_settings()) as client:
            counts, found = await client.items(rid, status=state, limit=limit)
        if as_json:
            for item in found:
                echo_json_line(item)
            return 0
        click.echo("  ".join(f"{k} {v:,}" for k, v in counts.items()))
        for item in found:
            error = f"  {item['last_error']}" if item["last_error"] else ""
            click.echo(
                f"{item['external_id']:24} {item['status']:10} "
                f"failures {item['failure_count']}{error}"
            )
        return 0

    exit_with(show())


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the full definitions as JSON")
def importers(as_json: bool) -> None:
    """List the registered importers: sources, key and duplicate policy.

    \b
    Example:
      sluice importers --json
    """
    from sluice.importers.registry import build_registry

    # The environment's SLUICE_IMPORTERS, else those of the stack running under SLUICE_HOME.
    registry = build_registry(load_settings(require_stack=False).pipeline.importers)
    found = [i.describe() for i in registry.all()]
    if as_json:
        echo_json(found)
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


COMMANDS = (
    run_cmd,
    import_cmd,
    trigger_cmd,
    status,
    runs,
    cancel,
    retry,
    failed_rows,
    items,
    importers,
)
