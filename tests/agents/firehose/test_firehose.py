"""Firehose plus backfill on the real stack: a fake PDS and a Jetstream-compatible WebSocket
server (tests/support/servers/atproto.py) script a world in which the backfill races the live
firehose; a real `sluice firehose` process, the broker, PostgreSQL and the two workers do the
rest."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from sluice.agents.firehose.backfill import IMPORTER, Backfiller
from sluice.config import FirehoseSettings, UrlSettings
from sluice.schemas.firehose import BackfillRequested
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.db import create_pool
from tests.conftest import ROOT, TOPICS, Stack, Worker
from tests.support.ports import free_port
from tests.support.prometheus import scrape
from tests.support.servers.atproto import FakeJetstream, FakePds, World

pytestmark = pytest.mark.stack

POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"
DIDS = [f"did:plc:repo{i:02d}" for i in range(8)]
DOOMED = DIDS[5]  # its account is deleted during the backfill
SLOW = "did:plc:slowrepo"  # the backfill that is killed mid-way
SENTINEL_DIDS = DIDS[:4]
WARMUP = "did:plc:warmup"  # its one post makes the consumer save a first cursor


class Firehose:
    """A `sluice firehose` process reading the fake Jetstream."""

    def __init__(self, stack: Stack, url: str, log: Path) -> None:
        self.stack, self.url, self.log = stack, url, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        env = {
            **self.stack.env,
            "SLUICE_FIREHOSE_CURSOR_INTERVAL": "0.5",
            "SLUICE_METRICS_PORT": str(self.metrics_port),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice", "firehose", "--url", self.url],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        return self.log.read_text(errors="replace")


class Scene:
    def __init__(self, world: World, pds: FakePds, jetstream: FakeJetstream, fh: Firehose):
        self.world, self.pds, self.jetstream, self.firehose = world, pds, jetstream, fh
        self.hook_mutations = 0


@pytest.fixture(scope="module")
def scene(
    stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    world = World()
    for i, did in enumerate(DIDS):
        world.add_repo(did, f"user{i}.test", {POST: 250, LIKE: 120})
    world.add_repo(SLOW, "slow.test", {POST: 1200})
    world.add_repo(WARMUP, "warmup.test", {})
    rng = random.Random(7)
    holder: dict[str, Scene] = {}

    def on_page(did: str, collection: str, number: int, served: int) -> None:
        """Between pages: change records on pages read and not yet read, add one, and delete
        the doomed account."""
        scene = holder["scene"]
        if did == SLOW:
            time.sleep(0.15)
            return
        if did == DOOMED:
            if world.status(did) is None:
                world.delete_account(did)
            return
        records = world.records(did, collection)
        if len(records) < 10:
            return
        read = rng.randrange(0, min(len(records), number * 100))
        unread = rng.randrange(min(len(records) - 1, number * 100), len(records))
        world.update(did, collection, records[read][0])
        world.delete(did, collection, records[unread][0])
        world.create(did, collection)
        records = world.records(did, collection)
        world.update(did, collection, records[rng.randrange(len(records))][0])
        scene.hook_mutations += 4
        # The page was built before these changes: hold it back so that their live events
        # overtake it, and its older copies arrive last.
        time.sleep(0.3)

    pds = FakePds(world, port=stack.pds_port, on_page=on_page)
    port = free_port()
    url = f"ws://127.0.0.1:{port}/subscribe"
    jetstream = FakeJetstream(world, port=port)
    firehose = Firehose(stack, url, tmp_path_factory.mktemp("firehose") / "fh.log")
    holder["scene"] = scene = Scene(world, pds, jetstream, firehose)
    with pds, jetstream:
        firehose.start()
        try:
            jetstream.wait_connected(timeout=60)
            # A backfill starts only once the consumer is live (it saved a cursor): one event.
            world.create(WARMUP, POST)
            asyncio.run(saved_a_cursor(stack, "default"))
            yield scene
        finally:
            firehose.stop()


async def saved_a_cursor(stack: Stack, name: str, timeout: float = 60) -> None:
    conn = await asyncpg.connect(stack.postgres.url)
    try:
        deadline = time.monotonic() + timeout
        while not await conn.fetchval(
            "SELECT time_us IS NOT NULL FROM sluice.firehose_cursors WHERE name = $1", name
        ):
            assert time.monotonic() < deadline, f"the firehose consumer {name} saved no cursor"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def db_state(
    db: asyncpg.Connection, dids: list[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    rows = await db.fetch(
        "SELECT uri, cid, record FROM atproto.records WHERE did = ANY($1::text[])", dids
    )
    return {r["uri"]: (r["cid"], orjson.loads(r["record"])) for r in rows}


async def converged(
    db: asyncpg.Connection, world: World, dids: list[str], timeout: float = 90
) -> None:
    """Until the records of ``dids`` equal the PDS's (the pipeline is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await db_state(db, dids)
        want = {u: v for u, v in world.state().items() if u.split("/")[2] in dids}
        if got == want:
            return
        if time.monotonic() > deadline:
            missing = set(want) - set(got)
            extra = set(got) - set(want)
            stale = [u for u in set(want) & set(got) if want[u] != got[u]]
            raise AssertionError(
                f"records differ from the PDS: {len(missing)} missing, {len(extra)} extra"
                f" (resurrected or never deleted), {len(stale)} stale; e.g."
                f" {sorted(missing)[:2]} {sorted(extra)[:2]} {stale[:2]}"
            )
        await asyncio.sleep(0.5)


async def backfill_runs(db: asyncpg.Connection, dids: list[str]) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT DISTINCT ON (options->>'did') options->>'did' AS did, status, error, id"
        " FROM sluice.runs WHERE importer = $1 AND options->>'did' = ANY($2::text[])"
        " ORDER BY options->>'did', queued_at DESC",
        IMPORTER,
        dids,
    )


async def test_backfill_racing_the_firehose_ends_equal_to_the_pds(
    scene: Scene, client: Client, db: asyncpg.Connection, stack: Stack
) -> None:
    world = scene.world
    stop = threading.Event()

    def mutate() -> None:  # the live world keeps changing during the backfill
        rng = random.Random(11)
        live = [d for d in DIDS if d != DOOMED]
        while not stop.is_set():
            world.random_mutation(rng, live)
            time.sleep(0.01)

    mutator = threading.Thread(target=mutate, daemon=True)
    mutator.start()
    try:
        queued = await client.backfill(DIDS, requested_by="test")
        assert queued == DIDS
        # Shown at once, before a worker took them: pending for every collection ("*").
        shown = {s.did for s in await client.backfill_states() if s.did in DIDS}
        assert shown == set(DIDS)
        deadline = time.monotonic() + 180
        while True:
            runs = await backfill_runs(db, DIDS)
            if len(runs) == len(DIDS) and all(r["status"] not in ("running",) for r in runs):
                break
            assert time.monotonic() < deadline, f"backfills unfinished: {runs}\n{stack.logs()}"
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        mutator.join()
    by_did = {r["did"]: r for r in runs}
    assert by_did[DOOMED]["status"] == "failed" and "RepoNotFound" in by_did[DOOMED]["error"]
    assert all(by_did[d]["status"] == "completed" for d in DIDS if d != DOOMED), runs
    assert scene.hook_mutations > 20  # pages were read while their repos changed
    states = await db.fetch(
        "SELECT did, collection, status, records_synced, pages FROM sluice.backfill"
        " WHERE did = ANY($1::text[])",
        DIDS,
    )
    assert {(s["did"], s["collection"]) for s in states if s["status"] == "completed"} == {
        (d, c) for d in DIDS if d != DOOMED for c in (POST, LIKE)
    }
    await converged(db, world, DIDS)
    # The importer that projects posts into its own table follows the records table.
    projected = {
        r["uri"]: (r["text"], r["did"])
        for r in await db.fetch("SELECT uri, text, did FROM t_posts WHERE did = ANY($1)", DIDS)
    }
    posts = {
        u: (v[1]["text"], u.split("/")[2])
        for u, v in world.state().items()
        if u.split("/")[2] in DIDS and f"/{POST}/" in u
    }
    assert projected == posts
    # The doomed DID is tombstoned as a whole; its records are gone and stay gone.
    assert await db.fetchval("SELECT status FROM atproto.repos WHERE did = $1", DOOMED) == "deleted"
    assert not await db.fetchval("SELECT count(*) FROM atproto.records WHERE did = $1", DOOMED)
    origins = dict(await db.fetch("SELECT origin, count(*) FROM atproto.records GROUP BY origin"))
    assert origins.get("backfill", 0) > 1000 and origins.get("live", 0) > 50, origins
    events = await db.fetch(
        "SELECT type FROM sluice.events WHERE run_id = $1 ORDER BY id",
        by_did[DIDS[0]]["id"],
    )
    types = [e["type"] for e in events]
    assert types[0] == "backfill.started" and types[-1] == "backfill.completed"
    assert types.count("backfill.progress") >= 5  # one per page


async def test_replaying_the_firehose_from_an_earlier_cursor_changes_nothing(
    scene: Scene, client: Client, db: asyncpg.Connection
) -> None:
    world = scene.world
    await converged(db, world, DIDS)
    before = [
        tuple(r)
        for r in await db.fetch(
            "SELECT uri, rev, cid, record, origin, indexed_at FROM atproto.records ORDER BY uri"
        )
    ]
    scene.firehose.stop()
    first = world.events[0]["time_us"]
    await db.execute(
        "UPDATE sluice.firehose_cursors SET time_us = $1 WHERE name = 'default'", first
    )
    replayed_from = len(world.events)
    scene.firehose.start()
    await asyncio.to_thread(scene.jetstream.wait_connected, 1, 60)
    deadline = time.monotonic() + 60
    while scene.jetstream.connections[-1]["sent"] < replayed_from:
        assert time.monotonic() < deadline, "the replay did not happen"
        await asyncio.sleep(0.2)
    assert scene.jetstream.connections[-1]["cursor"] <= first
    # A new record per repository, after the replay on the same partitions: once they are
    # in, every replayed event of those repositories was applied.
    marks = [world.create(did, POST) for did in SENTINEL_DIDS]
    uris = [f"at://{m['did']}/{POST}/{m['commit']['rkey']}" for m in marks]
    deadline = time.monotonic() + 60
    while await db.fetchval("SELECT count(*) FROM atproto.records WHERE uri = ANY($1)", uris) < 4:
        assert time.monotonic() < deadline, "the replayed events were not applied"
        await asyncio.sleep(0.2)
    after = [
        tuple(r)
        for r in await db.fetch(
            "SELECT uri, rev, cid, record, origin, indexed_at FROM atproto.records"
            " WHERE NOT (uri = ANY($1)) ORDER BY uri",
            uris,
        )
    ]
    assert after == before
    await converged(db, world, DIDS)


async def test_a_killed_backfill_resumes_from_its_cursor(
    scene: Scene, stack: Stack, db: asyncpg.Connection
) -> None:
    log = stack.root / "backfill-slow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "backfill", SLOW],
            cwd=ROOT,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        pages = await db.fetchval(
            "SELECT pages FROM sluice.backfill WHERE did = $1 AND collection = $2", SLOW, POST
        )
        if pages and pages >= 4:
            break
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = time.time()
    cursor = await db.fetchval(
        "SELECT cursor FROM sluice.backfill WHERE did = $1 AND collection = $2", SLOW, POST
    )
    assert cursor
    world = scene.world
    world.update(SLOW, POST, world.records(SLOW, POST)[0][0])  # changed while nobody listed
    again = subprocess.run(
        [sys.executable, "-m", "sluice", "backfill", SLOW, "--json"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    run = orjson.loads(again.stdout)
    assert run["status"] == "completed"
    after = [
        h
        for h in scene.pds.hits
        if h.endpoint == "com.atproto.repo.listRecords"
        and h.params.get("repo") == SLOW
        and h.time > killed_at
    ]
    # It went on from the stored cursor: no page before it was listed again.
    assert after and after[0].params.get("cursor") == cursor
    assert all(h.params.get("cursor", "") >= cursor for h in after)
    await converged(db, world, [SLOW])
    interrupted = await db.fetch(
        "SELECT status, error FROM sluice.runs WHERE importer = $1 AND options->>'did' = $2",
        IMPORTER,
        SLOW,
    )
    assert sorted(r["status"] for r in interrupted) == ["completed", "failed"]


async def test_a_pds_answering_429_slows_the_backfill_and_does_not_fail_it(
    scene: Scene, stack: Stack, db: asyncpg.Connection
) -> None:
    world = World(clock_id=3)
    did = "did:plc:throttled"
    world.add_repo(did, "throttled.test", {POST: 500})
    with FakePds(world, throttle_every=3) as pds:
        settings = FirehoseSettings(plc_url=pds.plc_url, page_limit=50)
        pool = await create_pool(stack.postgres.url, min_size=1, max_size=4)
        backfiller = Backfiller(pool, settings, UrlSettings(allow_hosts="127.0.0.1"))
        try:
            started = time.monotonic()
            run = await backfiller.backfill(BackfillRequested(did=did, collections=[POST]))
            took = time.monotonic() - started
        finally:
            await backfiller.close()
            await pool.close()
        throttled = pds.throttled()
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.processed_rows == 500 and run.created_rows == 500
    assert throttled >= 3 and run.rate_limit_hits == throttled
    assert took >= throttled * 0.9  # each 429 said "Retry-After: 1"
    assert await db.fetchval("SELECT count(*) FROM atproto.records WHERE did = $1", did) == 500


async def test_malformed_events_are_dead_lettered_and_the_consumer_goes_on(
    scene: Scene, stack: Stack, db: asyncpg.Connection
) -> None:
    def counted() -> tuple[float, ...]:
        """Malformed events and dead letters, by `sluice firehose` and by the workers."""
        fh = scrape(scene.firehose.metrics_url)
        workers = scrape(*(w.metrics_url for w in stack.workers))
        return (
            fh.total("sluice_firehose_events_total", outcome="malformed"),
            fh.total("sluice_dead_letters_total", topic="jetstream"),
            workers.total("sluice_firehose_events_total", outcome="malformed"),
            workers.total("sluice_dead_letters_total", topic=TOPICS.firehose),
        )

    before = counted()
    consumer = AIOKafkaConsumer(
        TOPICS.deadletter, bootstrap_servers=stack.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        bad = [
            "this is not json",
            '{"did": "did:plc:repo01", "kind": "commit"}',
            '{"did": "did:plc:repo01", "time_us": 5, "kind": "weird"}',
        ]
        for raw in bad:
            scene.jetstream.inject(raw)
        mark = scene.world.create(DIDS[1], POST)
        uri = f"at://{DIDS[1]}/{POST}/{mark['commit']['rkey']}"
        # Straight onto the topic, past the consumer: the firehose agent refuses it.
        producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(TOPICS.firehose, b'{"did": 42}', key=b"did:plc:x")
        finally:
            await producer.stop()
        deadline = time.monotonic() + 60
        while not await db.fetchval("SELECT count(*) FROM atproto.records WHERE uri = $1", uri):
            assert time.monotonic() < deadline, "the good event after the bad ones never landed"
            await asyncio.sleep(0.2)
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                letters.extend(orjson.loads(r.value) for r in records)
            found = {letter["payload"] for letter in letters}
            if set(bad) <= found and '{"did": 42}' in found:
                break
        by_payload = {letter["payload"]: letter for letter in letters}
        for raw in bad:
            assert raw in by_payload, letters[-5:]
            assert by_payload[raw]["topic"] == "jetstream" and by_payload[raw]["reason"]
        agent = by_payload['{"did": 42}']
        assert agent["topic"] == TOPICS.firehose and agent["offset"] >= 0
        assert "did" in agent["reason"]
        assert [a - b for a, b in zip(counted(), before, strict=True)] == [3, 3, 1, 1]
    finally:
        await consumer.stop()
    output = scene.firehose.stop()
    assert "3 malformed" in output, output[-2000:]
    scene.firehose.start()


async def test_backfill_status_cli_and_http_api(scene: Scene, stack: Stack, tmp_path: Path) -> None:
    import httpx

    from sluice.stack import wait_for_port

    status = subprocess.run(
        [sys.executable, "-m", "sluice", "backfill-status", "--json"],
        cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    rows = [orjson.loads(line) for line in status.stdout.splitlines()]
    assert {(r["did"], r["status"]) for r in rows if r["did"] == DOOMED} == {(DOOMED, "failed")}
    failed = subprocess.run(
        [sys.executable, "-m", "sluice", "backfill-status", "--failed"],
        cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert DOOMED in failed.stdout and DIDS[0] not in failed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "sluice", "backfill", "not-a-did"],
        cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "did:plc" in bad.stderr

    port = free_port()
    token = "firehose-test-token"
    with (tmp_path / "api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "sluice", "api", "--port", str(port)],
            cwd=ROOT, env={**stack.env, "SLUICE_API_TOKEN": token}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        ) as http:
            states = (await http.get("/api/v1/backfill", params={"did": DIDS[0]})).json()
            assert {s["collection"] for s in states["data"]} == {POST, LIKE}
            assert all(s["status"] == "completed" for s in states["data"])
            failed_only = (await http.get("/api/v1/backfill", params={"status": "failed"})).json()
            # (Other tests' refused backfills are listed as failed too.)
            assert {s["did"] for s in failed_only["data"] if s["did"] in DIDS} == {DOOMED}
            queued = await http.post("/api/v1/backfill", json={"dids": [DIDS[1]], "reset": True})
            assert queued.status_code == 202 and queued.json() == {"queued": [DIDS[1]]}
            refused = await http.post("/api/v1/backfill", json={"dids": ["nope"]})
            assert refused.status_code == 422 and "did:" in refused.json()["error"]["message"]
            assert (await http.post("/api/v1/backfill", json={"dids": []})).status_code == 422
    finally:
        api.terminate()
        api.wait(20)


async def test_the_consumer_runs_inside_a_worker_by_configuration(
    scene: Scene, stack: Stack, db: asyncpg.Connection
) -> None:
    env = {
        **stack.env,
        "SLUICE_FIREHOSE_ENABLED": "true",
        "SLUICE_FIREHOSE_URL": scene.firehose.url,
        "SLUICE_FIREHOSE_NAME": "in-worker",
    }
    subscriptions = len(scene.jetstream.connections)
    worker = Worker("worker-firehose", env, stack.root)
    worker.start()
    try:
        # Joining the session workers' group can take a minute on a busy machine.
        deadline = time.monotonic() + 150
        while not await db.fetchval(
            "SELECT count(*) FROM sluice.firehose_cursors WHERE name = 'in-worker'"
        ):
            assert worker.alive and time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.5)
        # The consumer registers before it connects, and reads live: an event made before its
        # subscription is open would never reach it.
        while len(scene.jetstream.connections) <= subscriptions:
            assert worker.alive and time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 60
        event = scene.world.create(DIDS[2], LIKE)
        while (
            await db.fetchval(
                "SELECT coalesce(time_us, 0) FROM sluice.firehose_cursors WHERE name = 'in-worker'"
            )
            < event["time_us"]
        ):
            assert worker.alive and time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.5)
        # The worker running the consumer reports its cursor lag; so does `sluice firehose`.
        lags = {
            name: scrape(url).series("sluice_firehose_cursor_lag_seconds", consumer=name)
            for name, url in (
                ("in-worker", worker.metrics_url),
                ("default", scene.firehose.metrics_url),
            )
        }
        for name, series in lags.items():
            (lag,) = series.values()
            assert 0 <= lag < 600, (name, lag)
        # The session workers applied the firehose's events and counted them.
        applied = scrape(*(w.metrics_url for w in stack.workers))
        assert applied.total("sluice_firehose_events_total", outcome="applied") > 0
    finally:
        worker.stop()


def test_sluice_firehose_says_why_it_reconnects(stack: Stack, tmp_path: Path) -> None:
    """Pointed at a port nobody listens on, the command says what failed and when it tries
    again, without -v."""
    log = tmp_path / "unreachable.log"
    env = {**stack.env, "SLUICE_FIREHOSE_NAME": f"unreachable-{uuid.uuid4().hex[:6]}"}
    url = f"ws://127.0.0.1:{free_port()}/subscribe"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "firehose", "--url", url],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "reconnecting in" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    line = next(x for x in log.read_text(errors="replace").splitlines() if "reconnecting in" in x)
    assert "WARNING" in line and "connection failed: " in line, line
