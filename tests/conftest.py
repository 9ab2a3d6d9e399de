"""A real embedded stack for the pipeline tests: the Tansu broker, PostgreSQL and two Faust
workers as separate processes, started once per test session. Nothing is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

from sluice.client import Client
from sluice.config import (
    DatabaseSettings,
    KafkaSettings,
    PipelineSettings,
    Settings,
    UrlSettings,
)
from sluice.runtime import Runtime
from sluice.schemas.runs import Run
from sluice.stack import EmbeddedBroker, EmbeddedPostgres, free_port, terminate
from sluice.streams.topics import Topics
from sluice.worker import prepare

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
TOPICS = Topics()
"""The topic names of the test stack (the default prefix)."""
WEBHOOK_SECRET = "test-webhook-secret"
FTP_PASSWORD = "s3cret-ftp"


class Worker:
    """One ``sluice worker`` process, its output in a log file the tests can show."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, cwd: Path = ROOT) -> None:
        self.name = name
        self.env = env
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

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.broker = EmbeddedBroker(free_port(), root / "broker.log")
        self.postgres = EmbeddedPostgres(root / "pg", free_port(), root / "pg.log")
        self.webhook_port = free_port()  # tests/test_webhooks.py serves the hook here
        # Pull-source tests serve here; the test importers read these from the environment.
        self.api_port = free_port()
        self.http_port = free_port()
        self.ftp_port = free_port()
        self.sftp_port = free_port()
        self.pds_port = free_port()  # tests/test_firehose.py: the fake PDS and PLC directory
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
            SLUICE_IMPORTERS="tests.importers",
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
            # Stalled runs are resumed after 15 s without a change (tests/test_recovery.py).
            SLUICE_STALL_TIMEOUT="15",
            SLUICE_RECOVERY_INTERVAL="2",
            SLUICE_FILE_ROOTS=str(self.files),
            SLUICE_TEST_API_URL=f"http://127.0.0.1:{self.api_port}",
            SLUICE_TEST_HTTP_URL=f"http://127.0.0.1:{self.http_port}",
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
        )
        return env

    def settings(self) -> Settings:
        return Settings(
            kafka=KafkaSettings(
                bootstrap=self.broker.bootstrap, partitions=PARTITIONS, session_timeout=6
            ),
            database=DatabaseSettings(url=self.postgres.url),
            pipeline=PipelineSettings(importers="tests.importers", home=self.root / "home"),
            url=UrlSettings(allow_hosts="127.0.0.1"),
        )

    def start(self) -> None:
        # The test importers read their servers' addresses from the environment at import.
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("SLUICE_TEST_")})
        self.broker.start()
        self.postgres.start()
        import asyncio

        rt = Runtime(self.settings())
        asyncio.run(prepare(rt))
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
