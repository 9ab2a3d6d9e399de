"""A real stack for the pipeline tests: a broker, PostgreSQL and two Faust workers as separate
processes, started once per test session. Nothing is mocked.

The broker and the database come from ``SLUICE_TEST_BACKEND`` (tests/backends.py): the embedded
Tansu and PostgreSQL by default, Apache Kafka and PostgreSQL 17 in Docker with ``containers``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.config import (
    S3_MIN_PART_BYTES,
    DatabaseSettings,
    FileStoreSettings,
    KafkaSettings,
    PipelineSettings,
    Settings,
    UrlSettings,
)
from sluice.importers.registry import build_registry
from sluice.schemas.runs import Run
from sluice.service import Client
from sluice.stack import terminate
from sluice.streams.topics import Topics
from sluice.worker import prepare
from tests.support import backends
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
TOPICS = Topics()
"""The topic names of the test stack (the default prefix)."""
WEBHOOK_SECRET = "test-webhook-secret"
TRAP_HOST = "127.0.0.2"
"""Loopback, so a test can serve there (Linux routes 127/8 to lo), and not on the allow list."""
FTP_PASSWORD = "s3cret-ftp"
S3_ACCESS_KEY = "sluice-test-key"
S3_SECRET_KEY = "sluice-test-secret"
S3_REGION = "us-east-1"


def pytest_configure(config: pytest.Config) -> None:
    try:
        backends.backend_name()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    # The chaos suite's seed (tests/chaos/conftest.py), chosen once per run: `make test`'s pytest
    # processes (pytest-xdist) are started after this and inherit it.
    os.environ.setdefault("CHAOS_SEED", str(random.SystemRandom().randrange(1, 2**31)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    if backends.backend_name() == "containers":
        backend = (
            f"backend: containers ({backends.KAFKA_IMAGE}, {backends.POSTGRES_IMAGE}; "
            "SLUICE_TEST_BACKEND)"
        )
    else:
        backend = (
            "backend: embedded (Tansu, PostgreSQL 18; SLUICE_TEST_BACKEND=containers for Docker)"
        )
    seed = os.environ["CHAOS_SEED"]
    return [backend, f"chaos: seed {seed} (CHAOS_SEED={seed} repeats its random moments)"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backends.backend_name() != "containers":
        return
    missing = backends.docker_unavailable()
    if missing is not None:
        everything = pytest.mark.skip(
            reason=f"SLUICE_TEST_BACKEND=containers needs a Docker engine: {missing}"
        )
        for item in items:
            item.add_marker(everything)
        return
    embedded_only = pytest.mark.skip(
        reason="starts, kills or restarts embedded broker or PostgreSQL processes: runs on "
        "SLUICE_TEST_BACKEND=embedded"
    )
    for item in items:
        if item.get_closest_marker("embedded") is not None:
            item.add_marker(embedded_only)


class Worker:
    """One ``sluice worker`` process, its output in a log file the tests can show. Each has a
    metrics port of its own (kept across restarts) unless ``env`` names one other than 0."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, cwd: Path = ROOT) -> None:
        self.name = name
        self.metrics_port = int(env.get("SLUICE_METRICS_PORT") or 0) or free_port()
        self.env = {**env, "SLUICE_METRICS_PORT": str(self.metrics_port)}
        self.log_path = log_dir / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        log.write(f"\n===== start {time.strftime('%H:%M:%S')}\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "worker", "--loglevel", "info"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no commit, no goodbye to the group."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=20, name=self.name)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        # EmbeddedBroker and EmbeddedPostgres on the embedded backend (tests marked `embedded`
        # kill and restart them), containers on the other.
        self.broker: Any = backends.make_broker(root)
        self.postgres: Any = backends.make_database(root)
        self.webhook_port = free_port()  # tests/agents/test_webhooks.py serves the hook here
        # Pull-source tests serve here; the test importers read these from the environment.
        self.api_port = free_port()
        self.http_port = free_port()
        self.ftp_port = free_port()
        self.sftp_port = free_port()
        # tests/agents/firehose/test_firehose.py: the fake PDS and PLC directory
        self.pds_port = free_port()
        # tests/agents/test_security.py: an API on 127.0.0.1 (allowed) that redirects to the trap, a
        # loopback address the workers' host policy refuses.
        self.guard_port = free_port()
        self.trap_port = free_port()
        # tests/storage: the S3 server (moto) serves here, started by the tests that use it.
        # The workers store in PostgreSQL; with these settings they read files stored in S3.
        self.s3_port = free_port()
        self.files = root / "files"
        self.files.mkdir()
        self.workers: list[Worker] = []

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env.update(
            SLUICE_KAFKA_BOOTSTRAP=self.broker.bootstrap,
            SLUICE_DATABASE_URL=self.postgres.url,
            SLUICE_KAFKA_PARTITIONS=str(PARTITIONS),
            SLUICE_KAFKA_SESSION_TIMEOUT="6",
            # Processes a test starts serve no metrics unless it names a port: the default one
            # is one per host, and two test processes run at once (make test). Workers take one
            # of their own.
            SLUICE_METRICS_PORT="0",
            # Delimited files over 64 KiB are read by byte ranges in the workers' pools, so the
            # exactness and chaos tests run on that path too (agents/split/ranges.py).
            SLUICE_SPLIT_RANGE_BYTES=str(32 << 10),
            SLUICE_IMPORTERS="tests.support.importers",
            SLUICE_HOME=str(self.root / "home"),
            PYTHONPATH=str(ROOT),
            SLUICE_WEBHOOKS=json.dumps(
                [
                    {
                        "url": f"http://127.0.0.1:{self.webhook_port}/hook",
                        "events": ["run.completed"],
                        "importers": ["t_hook"],
                    }
                ]
            ),
            SLUICE_WEBHOOK_SECRET=WEBHOOK_SECRET,
            SLUICE_URL_ALLOW_HOSTS="127.0.0.1",
            # Stalled runs are resumed after 8 s without a change (tests/agents/test_recover.py).
            SLUICE_STALL_TIMEOUT="8",
            SLUICE_RECOVERY_INTERVAL="2",
            SLUICE_FILE_ROOTS=str(self.files),
            SLUICE_TEST_API_URL=f"http://127.0.0.1:{self.api_port}",
            SLUICE_TEST_HTTP_URL=f"http://127.0.0.1:{self.http_port}",
            SLUICE_TEST_GUARD_URL=f"http://127.0.0.1:{self.guard_port}",
            SLUICE_TEST_TRAP_URL=f"http://{TRAP_HOST}:{self.trap_port}",
            SLUICE_TEST_FTP_PORT=str(self.ftp_port),
            SLUICE_TEST_SFTP_PORT=str(self.sftp_port),
            SLUICE_TEST_SFTP_KNOWN_HOSTS=str(self.root / "known_hosts"),
            SLUICE_TEST_FTP_USER="loader",
            SLUICE_TEST_FTP_PASSWORD=FTP_PASSWORD,
            SLUICE_TEST_FTP_WRONG="not-the-password",
            SLUICE_FIREHOSE_PLC_URL=f"http://127.0.0.1:{self.pds_port}/plc",
            SLUICE_FIREHOSE_DID_WEB_URL=f"http://127.0.0.1:{self.pds_port}/.well-known/did.json",
            SLUICE_WEBHOOK_BACKOFF="0.5",
            SLUICE_WEBHOOK_RETRY_INTERVAL="0.2",
            SLUICE_S3_ENDPOINT_URL=self.s3_url,
            SLUICE_S3_REGION=S3_REGION,
            SLUICE_S3_ACCESS_KEY_ID=S3_ACCESS_KEY,
            SLUICE_S3_SECRET_ACCESS_KEY=S3_SECRET_KEY,
            SLUICE_S3_ADDRESSING_STYLE="path",
        )
        return env

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def file_store(
        self, store: str = "", *, part_bytes: int = S3_MIN_PART_BYTES
    ) -> FileStoreSettings:
        """The stack's object store connection; ``store`` selects where new files go (empty:
        PostgreSQL, the default of the whole session)."""
        return FileStoreSettings(
            store=store,
            endpoint_url=self.s3_url,
            region=S3_REGION,
            access_key_id=S3_ACCESS_KEY,
            secret_access_key=S3_SECRET_KEY,
            addressing_style="path",
            part_bytes=part_bytes,
        )

    def settings(self, files: FileStoreSettings | None = None) -> Settings:
        return Settings(
            kafka=KafkaSettings(
                bootstrap=self.broker.bootstrap, partitions=PARTITIONS, session_timeout=6
            ),
            database=DatabaseSettings(url=self.postgres.url),
            pipeline=PipelineSettings(importers="tests.support.importers", home=self.root / "home"),
            url=UrlSettings(allow_hosts="127.0.0.1"),
            files=files or self.file_store(),
        )

    def start(self) -> None:
        backends.start_first(self.broker)
        backends.start_first(self.postgres)
        # The test importers read their servers' addresses from the environment at import.
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("SLUICE_TEST_")})
        import asyncio

        settings = self.settings()
        asyncio.run(prepare(settings, build_registry(settings.pipeline.importers)))
        for i in range(2):
            worker = Worker(f"worker{i}", self.env, self.root)
            worker.start()
            self.workers.append(worker)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.postgres.stop()
        self.broker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.tail()}" for w in self.workers)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    s = Stack(root)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
async def client(stack: Stack) -> AsyncIterator[Client]:
    c = Client(stack.settings())
    # The workers are ready when they have joined the group and applied a first import.
    warm = stack.root / "warmup.csv"
    warm.write_text("id,name\n1,warm-up\n")
    run = await c.submit_file("t_exact", warm, dry_run=True)
    done = await c.wait(run.id, timeout=120)
    assert done.status.terminal, f"workers never picked up the warm-up run:\n{stack.logs()}"
    yield c
    await c.close()


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.postgres.url)
    yield conn
    await conn.close()


async def finish(client: Client, run: Run, stack: Stack, timeout: float = 180) -> Run:
    """Wait for ``run`` to finish; on timeout, fail with the workers' logs."""
    done = await client.wait(run.id, timeout=timeout)
    assert done.status.terminal, (
        f"run {run.id} still {done.status} after {timeout}s:\n{stack.logs()}"
    )
    return done


@contextmanager
def api_process(stack: Stack, log_path: Path, **env: str) -> Iterator[str]:
    """A real `sluice api` process against the stack, on a free port; yields its base URL."""
    from sluice.stack import wait_for_port

    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "api", "--port", str(port)],
            cwd=ROOT,
            env={**stack.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
