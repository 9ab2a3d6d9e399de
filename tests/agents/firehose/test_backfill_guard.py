"""The backfill's guard against losing live changes: it starts only when a live firehose
consumer covers the repository. Live means it heard from its server and saved a cursor, not
that its process runs; covered means every collection the backfill will read (from
describeRepo when it names none) passes the consumer's filter. Real `sluice firehose`
processes against a real WebSocket server (or a port where none listens), a fake PDS over
HTTP, and the stack's PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from sluice.agents.firehose.backfill import Backfiller, firehose_covers
from sluice.config import FirehoseSettings, UrlSettings
from sluice.schemas.firehose import BackfillRequested
from sluice.schemas.runs import RunStatus
from sluice.storage import backfill as store
from sluice.storage.db import create_pool
from tests.conftest import ROOT, Stack
from tests.support.ports import free_port
from tests.support.servers.atproto import FakeJetstream, FakePds, World

pytestmark = pytest.mark.stack

POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"
FRESHNESS = 3.0
DID = f"did:plc:guard{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack.postgres.url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[World, FakePds]]:
    world = World()
    world.add_repo(DID, "guarded.test", {POST: 30, LIKE: 20})
    with FakePds(world) as pds:
        yield world, pds


def start_firehose(
    stack: Stack, url: str, name: str, log: Path, *collections: str
) -> subprocess.Popen[bytes]:
    env = {
        **stack.env,
        "SLUICE_FIREHOSE_NAME": name,
        "SLUICE_FIREHOSE_CURSOR_INTERVAL": "0.3",
    }
    args = [arg for c in collections for arg in ("--collection", c)]
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sluice", "firehose", "--url", url, *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


async def forget(pool: asyncpg.Pool, name: str) -> None:
    """The consumer's row goes with its test: the guard of later tests does not see it."""
    await pool.execute("DELETE FROM sluice.firehose_cursors WHERE name = $1", name)


async def until(what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def consumer(pool: asyncpg.Pool, name: str) -> store.ConsumerCursor | None:
    return next((c for c in await store.consumer_cursors(pool) if c.name == name), None)


async def others_not_live(pool: asyncpg.Pool, mine: str) -> bool:
    """No consumer of another test is live: the guard sees only this test's."""
    return all(
        c.name == mine or c.age > FRESHNESS or c.time_us is None
        for c in await store.consumer_cursors(pool)
    )


async def backfill(pool: asyncpg.Pool, pds: FakePds, *collections: str) -> tuple[RunStatus, str]:
    settings = FirehoseSettings(plc_url=pds.plc_url, freshness=FRESHNESS)
    backfiller = Backfiller(pool, settings, UrlSettings(allow_hosts="127.0.0.1"))
    try:
        run = await backfiller.backfill(BackfillRequested(did=DID, collections=list(collections)))
    finally:
        await backfiller.close()
    return run.status, run.error or ""


async def test_a_consumer_that_cannot_reach_its_server_does_not_let_a_backfill_start(
    stack: Stack, pool: asyncpg.Pool, world: tuple[World, FakePds], tmp_path: Path
) -> None:
    name = f"guard-dead-{uuid.uuid4().hex[:6]}"
    dead = f"ws://127.0.0.1:{free_port()}/subscribe"  # nothing listens there
    proc = start_firehose(stack, dead, name, tmp_path / "dead.log")
    try:
        await until("the consumer to register", lambda: consumer(pool, name))
        await until("other consumers to go quiet", lambda: others_not_live(pool, name))
        # It runs, reconnecting, well past the freshness: still not live.
        await asyncio.sleep(FRESHNESS + 1)
        assert proc.poll() is None, (tmp_path / "dead.log").read_text()
        status, error = await backfill(pool, world[1])
    finally:
        stop(proc)
        await forget(pool, name)
    assert status is RunStatus.FAILED
    assert error.startswith(
        "no live firehose consumer (one that heard from its server in the last 3s and saved a "
        "cursor): "
    ), error
    assert f"{name} never heard from its server" in error
    assert error.endswith(
        "Check that it runs and that SLUICE_FIREHOSE_URL (or `sluice firehose --url`) reaches "
        "a Jetstream, then start the backfill"
    )
    assert "reconnecting" in (tmp_path / "dead.log").read_text()


async def test_a_collection_the_consumer_filters_out_refuses_the_backfill(
    stack: Stack, pool: asyncpg.Pool, world: tuple[World, FakePds], tmp_path: Path
) -> None:
    name = f"guard-posts-{uuid.uuid4().hex[:6]}"
    port = free_port()
    with FakeJetstream(world[0], port=port) as jetstream:
        proc = start_firehose(
            stack, f"ws://127.0.0.1:{port}/subscribe", name, tmp_path / "posts.log", POST
        )
        try:
            assert await asyncio.to_thread(jetstream.wait_connected, 1, 60)
            world[0].create(DID, POST)  # an event that passes its filter: a cursor to save

            async def live() -> bool:
                c = await consumer(pool, name)
                return c is not None and c.time_us is not None and c.age <= 1

            await until("the filtered consumer to save a cursor", live)
            await until("other consumers to go quiet", lambda: others_not_live(pool, name))
            # Names no collection: describeRepo says posts and likes, and likes are filtered out.
            status, error = await backfill(pool, world[1])
            assert status is RunStatus.FAILED
            assert error == (
                f"the collection {LIKE} of {DID} is not covered: firehose consumer {name} lets "
                f"only {POST} through, so changes to {LIKE} during the backfill would be lost; "
                f"add {LIKE} to its SLUICE_FIREHOSE_COLLECTIONS, or name only covered "
                "collections in the backfill"
            )
            # Posts only: covered, and a quiet stream stays live by the pings it answers.
            await asyncio.sleep(FRESHNESS + 1)
            status, error = await backfill(pool, world[1], POST)
            assert status is RunStatus.COMPLETED, error
        finally:
            stop(proc)
            await forget(pool, name)


async def test_a_refusal_names_a_few_consumers_those_that_never_heard_first(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    """Rows of consumers long gone stay: the message names five, the ones that never heard
    from their server first, then the most recently heard, and counts the rest."""
    tag = uuid.uuid4().hex[:6]
    gone = [f"gone-{tag}-{n}" for n in range(7)]
    fresh = f"never-{tag}"
    await pool.execute(
        "INSERT INTO sluice.firehose_cursors (name, time_us, updated_at)"
        " SELECT x.name, 1, now() - x.n * interval '1 hour'"
        " FROM unnest($1::text[]) WITH ORDINALITY AS x(name, n)",
        gone,
    )
    await pool.execute(
        "INSERT INTO sluice.firehose_cursors (name, updated_at) VALUES ($1, 'epoch')", fresh
    )
    try:
        total = await pool.fetchval("SELECT count(*) FROM sluice.firehose_cursors")
        error = await firehose_covers(pool, DID, ["app.bsky.feed.post"], 0.0)
    finally:
        for name in (*gone, fresh):
            await forget(pool, name)
    assert error is not None
    named = error.split("saved a cursor): ", 1)[1].split(". Check", 1)[0].split("; ")
    assert len(named) == 6 and named[-1] == f"and {total - 5} more that heard from it earlier"
    assert f"{fresh} never heard from its server" in named
    never = [i for i, n in enumerate(named[:5]) if n.endswith(" never heard from its server")]
    assert never == list(range(len(never))), named  # the ones that never heard come first
    heard = [n.split(" last heard from its server at ", 1)[1][:19] for n in named[len(never) : 5]]
    assert heard == sorted(heard, reverse=True), named  # then the most recently heard
