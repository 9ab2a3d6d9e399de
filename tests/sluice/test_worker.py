"""`sluice worker` as a process: where Faust keeps its data, and how fast it stops.

A stack of its own (broker, PostgreSQL, no shared workers): one test stops PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from sluice.importers.registry import build_registry
from sluice.worker import prepare
from tests.conftest import ROOT, Stack, Worker

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def own_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("worker-stack"))
    try:
        await asyncio.to_thread(stack.broker.start)
        await asyncio.to_thread(stack.postgres.start)
        await prepare(stack.settings(), build_registry(stack.settings().pipeline.importers))
        yield stack
    finally:
        for worker in stack.workers:
            worker.stop()
        stack.postgres.stop()
        stack.broker.stop()


def env_of(stack: Stack, **extra: str) -> dict[str, str]:
    # No stall recovery during these tests: a run that completes was delivered again.
    return {**stack.env, "SLUICE_STALL_TIMEOUT": "3600", **extra}


async def ready(worker: Worker, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while "[^Worker]: Ready" not in worker.log_path.read_text(errors="replace"):
        assert worker.alive, f"{worker.name} exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"{worker.name} not ready:\n{worker.tail()}"
        await asyncio.sleep(0.5)


def started_worker(
    stack: Stack, name: str, env: dict[str, str], log_dir: Path, cwd: Path = ROOT
) -> Worker:
    worker = Worker(name, env, log_dir, cwd=cwd)
    stack.workers.append(worker)
    worker.start()
    return worker


async def test_a_worker_leaves_nothing_in_the_folder_it_was_started_from(
    own_stack: Stack, tmp_path: Path
) -> None:
    folder = tmp_path / "here"
    tmp = tmp_path / "tmp"
    folder.mkdir()
    tmp.mkdir()
    worker = started_worker(
        own_stack, "from-a-folder", env=env_of(own_stack, TMPDIR=str(tmp)),
        log_dir=tmp_path, cwd=folder,
    )  # fmt: skip
    await ready(worker)
    # Faust's data directory is a temporary one while the worker runs ...
    assert [p.name.startswith("sluice-faust-") for p in tmp.iterdir()] == [True]
    assert list(folder.iterdir()) == []
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()
    # ... and gone with it; nothing ever went to the current folder.
    assert list(tmp.iterdir()) == []
    assert list(folder.iterdir()) == []


async def test_a_worker_stops_within_seconds_of_sigterm_while_postgres_is_down(
    own_stack: Stack, tmp_path: Path
) -> None:
    env = env_of(own_stack)
    first = started_worker(own_stack, "first", env=env, log_dir=tmp_path)
    await ready(first)

    rows = 200_000
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("id,name,amount\n")
        f.writelines(f"{i},name {i},{i * 3}\n" for i in range(rows))
    table = f"big_{uuid.uuid4().hex[:8]}"
    sent = subprocess.run(
        [sys.executable, "-m", "sluice", "import", str(path), "--into", table, "--key", "id",
         "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    run_id = uuid.UUID(json.loads(sent.stdout)["id"])

    async def progress() -> tuple[str, int]:
        conn = await asyncpg.connect(own_stack.postgres.url)
        try:
            row = await conn.fetchrow(
                "SELECT status, processed_rows FROM sluice.runs WHERE id = $1", run_id
            )
        finally:
            await conn.close()
        assert row is not None
        return str(row["status"]), int(row["processed_rows"])

    # Stop PostgreSQL in the middle of the import: the worker has work in flight.
    deadline = time.monotonic() + 120
    while (await progress())[1] == 0:
        assert time.monotonic() < deadline, first.tail()
        await asyncio.sleep(0.1)
    status, done = await progress()
    assert status == "running" and done < rows, "the import finished before the outage"
    await asyncio.to_thread(own_stack.postgres.stop)
    deadline = time.monotonic() + 30
    while "the database is unreachable" not in first.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"it never waited for the database:\n{first.tail()}"
        await asyncio.sleep(0.2)

    assert first.proc is not None
    sent_at = time.monotonic()
    os.kill(first.proc.pid, signal.SIGTERM)
    try:
        code = await asyncio.to_thread(first.proc.wait, 10)
    except subprocess.TimeoutExpired:
        first.kill()
        pytest.fail(f"the worker did not stop within 10 s of SIGTERM:\n{first.tail(60)}")
    took = time.monotonic() - sent_at
    assert code == 0, first.tail()

    # What it was working on was not acknowledged: the next worker gets it and finishes the run
    # (stall recovery is off, so nothing else could).
    await asyncio.to_thread(own_stack.postgres.start)
    second = started_worker(own_stack, "second", env=env, log_dir=tmp_path)
    deadline = time.monotonic() + 180
    while (status := (await progress())[0]) in ("queued", "running"):
        assert second.alive, second.tail()
        assert time.monotonic() < deadline, f"run {run_id} not finished:\n{second.tail()}"
        await asyncio.sleep(0.5)
    assert status == "completed", second.tail()
    conn = await asyncpg.connect(own_stack.postgres.url)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM public.{table}") == rows
    finally:
        await conn.close()
    assert took < 10
