"""The ``sluice`` command line.

Exit codes scripts can rely on: 0 success (a waited-for run completed), 1 an error (message on
stderr), 2 wrong usage, 3 the run completed with rejected rows, 4 the run failed, 5 cancelled.

One module per group of commands: ``stack`` (up, down, env, stack, config, worker, api),
``runs`` (run, import, trigger, status, runs, cancel, retry, failed-rows, items, importers),
``firehose`` (firehose, backfill, backfill-status), ``ops`` (prune-files, prune-rows, dlq,
webhooks, schedules, tail); ``common`` holds what they share.
"""

from __future__ import annotations

import logging

import click

from sluice import __version__
from sluice.cli import firehose, ops, runs, stack
from sluice.cli.common import fail
from sluice.errors import SluiceError


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


for group in (stack, runs, firehose, ops):
    for command in group.COMMANDS:
        cli.add_command(command)


def main() -> None:
    from sluice.env import load_env_file

    try:
        load_env_file()
    except SluiceError as exc:
        fail(str(exc))
    cli(prog_name="sluice")


__all__ = ["cli", "main"]
