"""Reading the environment, once, in an entry point: ``.env`` files, the settings, and what the
embedded stack running under ``SLUICE_HOME`` fills in.

The command line, ``sluice worker``, ``sluice api`` and the Python API all start here; library
code receives the :class:`~sluice.config.Settings` this builds and never reads ``os.environ``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from pydantic import SecretStr, ValidationError

from sluice.config import (
    ApiSettings,
    DatabaseSettings,
    FirehoseSettings,
    KafkaSettings,
    PipelineSettings,
    Settings,
    UrlSettings,
    WebhookSettings,
    env_name,
)
from sluice.errors import InvalidConfig, StackNotFound

ENV_FILE = "SLUICE_ENV_FILE"
"""Names the ``.env`` file to read instead of ``./.env``."""


def load_env_file(
    environ: MutableMapping[str, str] | None = None, *, cwd: Path | None = None
) -> Path | None:
    """Add the variables of ``$SLUICE_ENV_FILE`` (or ``./.env`` when there is one) to
    ``environ`` (``os.environ``); variables already set win. Returns the file read."""
    from dotenv import dotenv_values

    environ = os.environ if environ is None else environ
    named = environ.get(ENV_FILE)
    path = Path(named) if named else (cwd or Path.cwd()) / ".env"
    if not path.is_file():
        if named:
            raise InvalidConfig(f"{ENV_FILE}={named}: no such file")
        return None
    for key, value in dotenv_values(path).items():
        if value is not None:
            environ.setdefault(key, value)
    return path


def read_settings() -> Settings:
    """Every settings class from the environment; a value that does not validate is reported
    by its variable's name and the reason, never with the value itself (it may be a secret)."""
    try:
        return Settings(
            kafka=KafkaSettings(),
            database=DatabaseSettings(),
            api=ApiSettings(),
            pipeline=PipelineSettings(),
            webhooks=WebhookSettings(),
            url=UrlSettings(),
            firehose=FirehoseSettings(),
        )
    except ValidationError as exc:
        raise InvalidConfig(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    model = exc.title
    owner = next((c for c in Settings.parts() if c.__name__ == model), None)
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in error["loc"])
        field = str(error["loc"][0]) if error["loc"] else ""
        if owner is not None and field in owner.model_fields:
            where = env_name(owner, field)
        else:
            where = field or model  # read through its alias: the variable's own name
        if loc and loc != field:
            where = f"{where} ({loc})"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)


def load_settings(*, require_stack: bool = True) -> Settings:
    """Environment first; what it leaves empty (brokers, database, API address and token)
    comes from the embedded stack running under ``SLUICE_HOME``."""
    from sluice.stack import read_api_token, read_state

    settings = read_settings()
    kafka, database, api, pipeline = (
        settings.kafka,
        settings.database,
        settings.api,
        settings.pipeline,
    )
    if kafka.bootstrap and database.url.get_secret_value():
        return settings
    state = read_state(pipeline.home)
    if state is None:
        if require_stack:
            raise StackNotFound(
                f"no Sluice stack is running under {pipeline.home.resolve()}: start one with "
                "`sluice up --detach`, or set SLUICE_KAFKA_BOOTSTRAP and SLUICE_DATABASE_URL"
            )
        return settings
    if not kafka.bootstrap:
        settings.kafka = kafka.model_copy(update={"bootstrap": state.kafka_bootstrap})
    if not database.url.get_secret_value():
        settings.database = database.model_copy(update={"url": SecretStr(state.database_url)})
    if not api.url and state.api_url:
        api = api.model_copy(update={"url": state.api_url})
    if not api.all_tokens() and (token := read_api_token(pipeline.home)):
        api = api.model_copy(update={"token": SecretStr(token)})
    settings.api = api
    if not settings.files.store and state.file_store:
        settings.files = settings.files.model_copy(update={"store": state.file_store})
    if not pipeline.importers and state.importers:
        # The stack's own importers, found where its workers find them.
        settings.pipeline = pipeline.model_copy(update={"importers": state.importers})
        if state.workdir and state.workdir not in sys.path:
            sys.path.append(state.workdir)
    return settings
