"""What the commands share: settings, running a coroutine, printing runs, the exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

from sluice.config import Settings
from sluice.errors import DatabaseUnavailable, FileFormatError, SluiceError
from sluice.schemas.formats import delimiter_name, reading_text
from sluice.schemas.runs import Run, RunStatus

if TYPE_CHECKING:
    from sluice.agents.deps import Deps
    from sluice.service import Client

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C while waiting for a run that goes on in the background (128 + SIGINT, as shells)."""
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


@asynccontextmanager
async def command_deps(settings: Settings) -> AsyncIterator[Deps]:
    """The pool and repositories for one command (two connections, the bundled and configured
    importers), closed when the command is done."""
    from sluice.agents.deps import build_deps
    from sluice.importers.registry import build_registry

    deps = await build_deps(
        settings, registry=build_registry(settings.pipeline.importers), pool_size=(1, 2)
    )
    try:
        yield deps
    finally:
        await deps.close()


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except DatabaseUnavailable as exc:
        fail(f"{exc}; is the stack running? try `sluice env`")
    except (SluiceError, FileFormatError) as exc:
        fail(str(exc))
    except (OSError, ConnectionError) as exc:
        fail(f"cannot reach the broker or database ({exc}); is the stack running? try `sluice env`")


def exit_with(coro: Coroutine[Any, Any, int]) -> NoReturn:
    """Run the command's coroutine; its result is the exit code."""
    sys.exit(run_async(coro))


def user() -> str:
    """Who runs the command, as runs record it (``requested_by``)."""
    return os.environ.get("USER") or "cli"


def parse_run_id(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        fail(f"{run_id!r} is not a run id (a UUID as printed by `sluice run`)", EXIT_USAGE)


def echo_json(data: Any) -> None:
    """``data`` as indented JSON."""
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def echo_json_line(data: Any) -> None:
    """``data`` as one line of JSON (JSON Lines)."""
    click.echo(orjson.dumps(data, default=str).decode())


def run_json(run: Run) -> str:
    return orjson.dumps(
        run.model_dump(mode="json", exclude={"options"}), option=orjson.OPT_INDENT_2
    ).decode()


def summary(run: Run) -> str:
    lines = [
        f"run {run.id}  {run.label}  {run.status.value}",
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
        lines += _provenance(run.provenance)
    if run.gaps:
        lines.append(f"  gaps: {run.gaps:,} empty period cells (no record made for them)")
    if run.deleted_rows:
        lines.append(f"  full refresh: {run.deleted_rows:,} rows absent from the import removed")
    if run.source_location:
        lines.append(f"  source: {run.source} {run.source_location}")
    if run.source == "api":
        lines.append(
            f"  items: {run.items_discovered:,} discovered  {run.items_completed:,} completed"
            f"  {run.items_failed:,} failed"
        )
    if run.cursor_from is not None or run.cursor_reached is not None:
        start = "the start" if run.cursor_from is None else str(run.cursor_from)
        reached = "(listing)" if run.cursor_reached is None else str(run.cursor_reached)
        lines.append(f"  cursor: listed what changed from {start} to {reached}")
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


def _provenance(p: dict[str, Any]) -> list[str]:
    """What the run read, for its summary."""
    from sluice.schemas.runs import SchemaChange

    f = p.get("file") or {}
    how = [
        str(p.get("format")),
        *([f"{delimiter_name(p['delimiter'])}-separated"] if p.get("delimiter") else []),
        *([f"sheet {p['sheet']!r}"] if p.get("sheet") else []),
        *([p["encoding"]] if p.get("encoding") else []),
    ]
    lines = [
        f"  read: {f.get('name')} ({f.get('size', 0):,} bytes, {', '.join(how)}),"
        f" sha256 {str(p.get('sha256'))[:12]}"
    ]
    if p.get("aliases"):
        matched = ", ".join(f"{h!r} -> {field}" for field, h in p["aliases"].items())
        lines.append(f"  aliases: {matched}")
    if p.get("ignored"):
        lines.append(f"  ignored columns: {', '.join(p['ignored'])}")
    for r in p.get("readings") or ():
        lines.append(f"  read {r['column']}: {reading_text(r)}")
    if p.get("duplicate_of"):
        lines.append(f"  the same file as run {p['duplicate_of']}")
    for change in p.get("schema_changes") or []:
        lines.append(f"  schema: {SchemaChange(**change).describe()}")
    repeated = p.get("repeated_keys") or {}
    if repeated.get("keys"):
        lines.append(
            f"  repeated keys: {repeated['keys']:,} keys occur in more than one row"
            f" ({repeated['rows']:,} rows lost to another); the table keeps {repeated['won']}"
        )
    return lines


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


def _remember_cancel_on_interrupt(ctx: click.Context, _param: object, value: bool) -> None:
    ctx.meta["sluice.cancel_on_interrupt"] = value


cancel_on_interrupt_option = click.option(
    "--cancel-on-interrupt",
    is_flag=True,
    expose_value=False,
    callback=_remember_cancel_on_interrupt,
    help="with --wait: Ctrl-C cancels the run (by default the run goes on in the background)",
)


async def _wait_unless_interrupted(
    client: Client, run: Run, bar: Callable[[Run], None]
) -> Run | None:
    """The run once it finished, or None when Ctrl-C came first (the run goes on)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here: wait plainly
        return await client.wait(run.id, on_update=bar)
    waiting = asyncio.ensure_future(client.wait(run.id, on_update=bar))
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        stop.cancel()
    if waiting.done():
        return waiting.result()
    waiting.cancel()
    return None


async def _interrupted(client: Client, run: Run, *, as_json: bool) -> int:
    """Ctrl-C during ``--wait``: cancel the run when asked, else say how to follow it."""
    from sluice.errors import RunNotCancellable

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("sluice.cancel_on_interrupt"):
        try:
            run = await client.cancel(run.id)
        except RunNotCancellable:  # it ended meanwhile
            run = await client.get_run(run.id)
        click.echo("", err=True)
        click.echo(f"interrupted: run {run.id} is {run.status.value}", err=True)
        click.echo(run_json(run) if as_json else summary(run))
        return EXIT_STATUS.get(run.status, 0)
    click.echo("", err=True)
    click.echo(
        f"interrupted: run {run.id} goes on in the background.\n"
        f"  follow it:  sluice status {run.id}\n"
        f"  cancel it:  sluice cancel {run.id}\n"
        "  (--cancel-on-interrupt cancels it on Ctrl-C)",
        err=True,
    )
    return EXIT_INTERRUPTED


async def report(
    client: Client,
    run: Run,
    *,
    wait: bool,
    as_json: bool,
    progress: ProgressBar | None = None,
) -> int:
    """Print the run (with ``wait``: once it finished, following it on ``progress``, by default
    a bar on a terminal when not printing JSON); returns the command's exit code. Ctrl-C while
    waiting leaves the run going (exit code 130) or, with ``--cancel-on-interrupt``, cancels it."""
    if wait:
        bar = progress or ProgressBar(sys.stderr.isatty() and not as_json)
        finished = await _wait_unless_interrupted(client, run, bar)
        if finished is None:
            return await _interrupted(client, run, as_json=as_json)
        run = finished
    click.echo(run_json(run) if as_json else summary(run))
    return EXIT_STATUS.get(run.status, 0) if wait else 0
