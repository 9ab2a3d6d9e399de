"""Where the test stack's broker and database come from: ``SLUICE_TEST_BACKEND``.

- ``embedded`` (default): the Tansu broker and PostgreSQL 18 of the ``embedded`` extra, as child
  processes (``sluice.stack``), on free local ports.
- ``containers``: Apache Kafka 3.9 (KRaft, one node; Confluent's ``cp-kafka`` 7.9 image, which
  testcontainers' ``KafkaContainer`` drives) and PostgreSQL 17, in Docker, started with
  testcontainers. Images: ``SLUICE_TEST_KAFKA_IMAGE``, ``SLUICE_TEST_POSTGRES_IMAGE``.

The workers are local processes on both. A broker offers ``bootstrap`` and a database ``url``
once started; both ``start()`` and ``stop()``. Tests that kill or restart the embedded processes
themselves are marked ``embedded`` and skip on the containers backend; without a Docker engine
the whole containers run skips, with the reason.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Protocol

from sluice.stack import EmbeddedBroker, EmbeddedPostgres, start_on_a_free_port
from tests.support.ports import free_port

NAMES = ("embedded", "containers")
KAFKA_IMAGE = os.environ.get("SLUICE_TEST_KAFKA_IMAGE") or "confluentinc/cp-kafka:7.9.0"
POSTGRES_IMAGE = os.environ.get("SLUICE_TEST_POSTGRES_IMAGE") or "postgres:17"
START_TIMEOUT = 180  # seconds; a first run pulls the images
DATABASE = "sluice"


class Broker(Protocol):
    @property
    def bootstrap(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Database(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def backend_name() -> str:
    name = os.environ.get("SLUICE_TEST_BACKEND") or "embedded"
    if name not in NAMES:
        raise ValueError(f"SLUICE_TEST_BACKEND={name!r}: use one of {', '.join(NAMES)}")
    return name


def make_broker(root: Path) -> Broker:
    if backend_name() == "containers":
        return KafkaInDocker()
    return EmbeddedBroker(free_port(), root / "broker.log")


def make_database(root: Path) -> Database:
    if backend_name() == "containers":
        return PostgresInDocker()
    return EmbeddedPostgres(root / "pg", free_port(), root / "pg.log")


def start_first(service: Broker | Database) -> None:
    """Start a broker or database for the first time: an embedded one whose port another
    session took meanwhile starts on another (its address is read after this)."""
    if isinstance(service, EmbeddedBroker | EmbeddedPostgres):
        start_on_a_free_port(service)
    else:
        service.start()


def log_tail(service: Broker | Database, lines: int = 40) -> str:
    """The last lines of a broker's or database's log, whichever backend runs it."""
    path = getattr(service, "log_path", None)
    if isinstance(path, Path):
        text = path.read_text(errors="replace") if path.exists() else ""
    elif isinstance(service, _InDocker):
        text = service.logs()
    else:
        text = ""
    return "\n".join(text.splitlines()[-lines:])


def docker_unavailable() -> str | None:
    """Why the containers backend cannot run here, or None when a Docker engine answers."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError as exc:
        return f"testcontainers is not installed ({exc}); it is in the dev extra"
    try:
        DockerClient().client.ping()
    except Exception as exc:  # whatever the client raises: no socket, refused, wrong API
        return f"{type(exc).__name__}: {exc}"
    return None


class _InDocker:
    """One testcontainers container, started and stopped with the stack."""

    def __init__(self) -> None:
        self._container: Any = None

    @property
    def container(self) -> Any:
        if self._container is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._container

    def _build(self) -> Any:
        raise NotImplementedError

    def _started(self, container: Any) -> Any:
        container.start()
        return container

    def start(self) -> None:
        if self._container is not None:
            return
        container = self._build()
        try:
            self._container = self._started(container)
        except BaseException:
            # A container that failed its wait strategy still exists: remove it.
            with contextlib.suppress(Exception):
                container.stop()
            raise

    def stop(self) -> None:
        if self._container is not None:
            self._container.stop()
            self._container = None

    def logs(self) -> str:
        if self._container is None:
            return ""
        out, err = self._container.get_logs()
        return (out + err).decode(errors="replace")


class KafkaInDocker(_InDocker):
    """Apache Kafka in KRaft mode (no ZooKeeper), one node, through testcontainers'
    ``KafkaContainer(...).with_kraft()``: it advertises the host and mapped port the local
    workers connect to."""

    _bootstrap = ""

    def _build(self) -> Any:
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers before the community namespace
            from testcontainers.kafka import KafkaContainer

        return (
            KafkaContainer(KAFKA_IMAGE)
            .with_kraft()
            # As on the embedded broker and in docker-compose.yml: Sluice creates its topics.
            .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        )

    def _started(self, container: Any) -> Any:
        container.start(timeout=START_TIMEOUT)
        self._bootstrap = str(container.get_bootstrap_server())
        return container

    @property
    def bootstrap(self) -> str:
        self.container  # noqa: B018 - raises when not started
        return self._bootstrap


class PostgresInDocker(_InDocker):
    """PostgreSQL 17 with trust authentication, like the embedded server: the superuser
    ``postgres`` and roles the tests create log in without a password."""

    _url = ""

    def _build(self) -> Any:
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the community namespace
            from testcontainers.postgres import PostgresContainer

        return (
            PostgresContainer(
                POSTGRES_IMAGE,
                username="postgres",
                password="postgres",
                dbname=DATABASE,
                driver=None,
            )
            .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
            # As the embedded server: room for two workers' pools, API processes and the tests.
            .with_command("postgres -c max_connections=200 -c fsync=off")
            .with_kwargs(shm_size="256m")
        )

    def _started(self, container: Any) -> Any:
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5432)
        self._url = f"postgresql://postgres@{host}:{port}/{DATABASE}"
        return container

    @property
    def url(self) -> str:
        self.container  # noqa: B018 - raises when not started
        return self._url
