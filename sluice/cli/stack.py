"""Running Sluice: the embedded stack (``up``, ``down``, ``stack``), its settings (``env``,
``config``), and the processes of a deployment (``worker``, ``api``)."""

from __future__ import annotations

import logging
import sys

import click

from sluice.cli.common import echo_json_line, fail, load_settings
from sluice.config import ApiSettings, KafkaSettings, PipelineSettings


@click.command()
@click.option("--detach", is_flag=True, help="run in the background; stop it with `sluice down`")
def up(detach: bool) -> None:
    """Start the embedded stack: broker, PostgreSQL, a worker and the HTTP API.

    Runs in the foreground until Ctrl-C unless --detach is given. Needs the `embedded` extra.

    \b
    Example:
      sluice up --detach
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


@click.command()
def down() -> None:
    """Stop the embedded stack started with `sluice up --detach`.

    \b
    Example:
      sluice down
    """
    from sluice.supervisor import stop_detached

    sys.exit(stop_detached(PipelineSettings().home))


@click.command()
@click.option(
    "--stack",
    "with_stack",
    is_flag=True,
    help="then, as shell comments, the processes of the embedded stack (as `sluice stack`)",
)
def env(with_stack: bool) -> None:
    """Print the connection settings of the running stack, as shell assignments.

    \b
    Example:
      eval "$(sluice env)"
    """
    settings = load_settings()
    click.echo(f"SLUICE_KAFKA_BOOTSTRAP={settings.kafka.bootstrap}")
    click.echo(f"SLUICE_DATABASE_URL={settings.database_url}")
    if settings.api.url:
        click.echo(f"SLUICE_API_URL={settings.api.url}")
    if settings.api.all_tokens():
        click.echo(f"SLUICE_API_TOKEN={settings.api.all_tokens()[0]}")
    if settings.pipeline.importers:
        click.echo(f"SLUICE_IMPORTERS={settings.pipeline.importers}")
    if settings.files.store:
        click.echo(f"SLUICE_FILE_STORE={settings.files.store}")
    if with_stack:
        from sluice.stack import read_state
        from sluice.supervisor import describe_stack

        home = settings.pipeline.home
        state = read_state(home)
        lines = describe_stack(home, state) if state else [f"no stack runs under {home}"]
        for line in lines:
            click.echo(f"# {line}")


@click.command("stack")
@click.option("--json", "as_json", is_flag=True, help="the state file (stack.json) as it is")
def stack_cmd(as_json: bool) -> None:
    """Show the embedded stack started by `sluice up`: each process with its pid, status,
    restarts and how it last ended. Exit code 1 when no stack runs under SLUICE_HOME.

    \b
    Example:
      sluice stack --json
    """
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


@click.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """Run one worker (split, upsert, outbox relay) against the configured broker and database.

    \b
    Example:
      sluice worker --loglevel debug
    """
    from sluice.worker import run_worker

    logging.getLogger().setLevel(loglevel.upper())
    run_worker(load_settings(), loglevel=loglevel)


@click.command()
@click.option("--host", default=None, help="bind address (default SLUICE_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default SLUICE_API_PORT)")
def api(host: str | None, port: int | None) -> None:
    """Serve the HTTP API.

    \b
    Example:
      sluice api --host 127.0.0.1 --port 8000
    """
    # The one way into the API package from here: its entry point (sluice.api never imports
    # the command line).
    from sluice.api.server import serve

    serve(load_settings(), host=host, port=port)


@click.command("config")
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
            echo_json_line(
                {
                    "name": row.env,
                    "value": row.value,
                    "default": row.default,
                    "secret": row.secret,
                    "description": row.description,
                }
            )
        else:
            click.echo(f"{row.env}={row.value}")


COMMANDS = (up, down, env, stack_cmd, config_cmd, worker, api)
