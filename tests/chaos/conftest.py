"""The chaos suite's own stack (broker, PostgreSQL, two workers), its seed, rounds and report.

``CHAOS_SEED`` repeats a run's random moments (the seed is in the report header, every failure's
message and every result), ``CHAOS_ROUNDS`` (default 1) repeats every case, ``CHAOS_REPORT`` is
the JSON Lines file of results (default ``tests/artifacts/chaos.jsonl``, rewritten by each
session).

The stack is separate from the session ``stack`` of the other tests: other ports, another root,
and it changes nothing in ``os.environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.config import PipelineSettings, Settings
from sluice.importers.registry import build_registry
from sluice.service import Client
from sluice.storage.db import connect
from sluice.worker import prepare
from tests.chaos import API_URL_ENV
from tests.conftest import ROOT, Stack, Worker
from tests.support.backends import log_tail, start_first

ROUNDS = int(os.environ.get("CHAOS_ROUNDS") or "1")
STALL_TIMEOUT = os.environ.get("CHAOS_STALL_TIMEOUT") or "15"
# Chosen by tests/conftest.py when the run starts, the same in all its processes.
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
REPORT = Path(os.environ.get("CHAOS_REPORT") or ROOT / "tests" / "artifacts" / "chaos.jsonl")
IMPORTERS = "tests.chaos"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chaos_round" in metafunc.fixturenames:
        metafunc.parametrize("chaos_round", range(ROUNDS), ids=lambda r: f"round{r}")


def case_rng(case: str, chaos_round: int) -> random.Random:
    """The random moments of one case in one round: the same for the same seed, whatever else
    ran before it."""
    return random.Random(f"{SEED}:{case}:{chaos_round}")


class ChaosStack(Stack):
    """A ``tests.conftest.Stack`` with the chaos importers, and workers that name themselves to
    PostgreSQL (``application_name``), so a test can see which worker is applying batches."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        for name in ("SLUICE_WEBHOOKS", "SLUICE_WEBHOOK_SECRET"):
            env.pop(name, None)
        env.update(
            SLUICE_IMPORTERS=IMPORTERS,
            **{API_URL_ENV: f"http://127.0.0.1:{self.api_port}"},
            # Backfills of a few hundred records take many pages: a kill lands mid-way.
            SLUICE_FIREHOSE_PAGE_LIMIT="25",
            # bench/reliability.py measures at the product's default (120 s): recovery must not
            # wait for a stall when a worker knows what was lost.
            SLUICE_STALL_TIMEOUT=STALL_TIMEOUT,
        )
        return env

    def settings(self) -> Settings:
        settings = super().settings()
        settings.pipeline = PipelineSettings(importers=IMPORTERS, home=self.root / "home")
        return settings

    def worker_env(self, name: str) -> dict[str, str]:
        env = self.env
        env["SLUICE_DATABASE_URL"] = f"{self.postgres.url}?application_name={name}"
        return env

    def start(self) -> None:
        # As Stack.start, without exporting SLUICE_TEST_* into this process's environment.
        start_first(self.broker)
        start_first(self.postgres)
        asyncio.run(prepare(self.settings(), build_registry(IMPORTERS)))
        for i in range(2):
            worker = Worker(f"chaos-worker{i}", self.worker_env(f"chaos-worker{i}"), self.root)
            worker.start()
            self.workers.append(worker)

    def logs(self, lines: int = 40) -> str:
        parts = [f"--- {w.name} (alive: {w.alive})\n{w.tail(lines)}" for w in self.workers]
        parts.append("--- broker\n" + log_tail(self.broker, lines))
        return "\n".join(parts)


@dataclass
class Supervisor:
    """Restarts a worker process that exited, as a process supervisor would; counts it."""

    stack: ChaosStack
    restarts: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            for worker in self.stack.workers:
                if worker.proc is not None and worker.proc.poll() is not None:
                    self.restarts.append(f"{worker.name} exited with {worker.proc.returncode}")
                    worker.start()
            await asyncio.sleep(0.5)

    def __enter__(self) -> Supervisor:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


class Report:
    """One JSON line per case and round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, **record: Any) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")


@pytest.fixture(scope="package")
def chaos_report() -> Report:
    return Report(REPORT)


@pytest.fixture(scope="package")
def chaos_stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ChaosStack]:
    # Printed past the output capture, so that even `pytest -q` shows the seed.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"chaos: seed {SEED}, {ROUNDS} round(s); CHAOS_SEED={SEED} repeats them;"
                f" results in {REPORT}"
            )
    stack = ChaosStack(tmp_path_factory.mktemp("chaos"))
    try:
        stack.start()
        asyncio.run(_warm_up(stack))
        yield stack
    finally:
        stack.stop()


async def _warm_up(stack: ChaosStack) -> None:
    """Until both workers are in the group and a first (dry) import went through."""
    warm = stack.root / "warmup.csv"
    warm.write_text("id,name\n1,warm-up\n")
    async with Client(stack.settings()) as client:
        run = await client.submit_file("chaos_kill", warm, dry_run=True)
        done = await client.wait(run.id, timeout=120)
    assert done.status.terminal, f"the chaos workers never picked up the warm-up:\n{stack.logs()}"


@pytest.fixture
async def chaos_client(chaos_stack: ChaosStack) -> AsyncIterator[Client]:
    """A client per case: a broker restart must not leave the next case a stale producer."""
    client = Client(chaos_stack.settings())
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 30)


class Db:
    """One connection to the chaos stack's database that comes back after PostgreSQL
    restarts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await connect(self.url)  # with the pool's json codecs
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 10)
            self.conn = None


@pytest.fixture
async def chaos_db(chaos_stack: ChaosStack) -> AsyncIterator[Db]:
    db = Db(chaos_stack.postgres.url)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def workers_up(chaos_stack: ChaosStack) -> None:
    """Every worker is alive and has joined the group since its latest start when a case
    begins (a case that left one dead says so itself)."""
    for worker in chaos_stack.workers:
        if not worker.alive:
            worker.start()
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        joined = [
            "Worker ready" in w.log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
            for w in chaos_stack.workers
        ]
        if all(joined):
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"a chaos worker did not join the group:\n{chaos_stack.logs()}"
        )
        await asyncio.sleep(0.2)
