"""The scripted AT Protocol world, its fake PDS and fake Jetstream, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sluice.schemas.firehose import JetstreamEvent
from tests.support.servers.atproto import (
    TID_ALPHABET,
    FakeJetstream,
    FakePds,
    World,
    decode_tid,
    encode_tid,
)

ALICE = "did:plc:alice000000000000000000"
BOB = "did:web:bob.example.com"
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
LIST = "com.atproto.repo.listRecords"


@pytest.fixture
def world() -> World:
    w = World()
    w.add_repo(ALICE, "alice.test", {POST: 250, LIKE: 250})
    w.add_repo(BOB, "bob.example.com", {POST: 250, LIKE: 250})
    return w


@pytest.fixture
def pds(world: World) -> Iterator[FakePds]:
    with FakePds(world) as server:
        yield server


@pytest.fixture
def client(pds: FakePds) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pds.url, timeout=5) as c:
        yield c


def list_all(
    client: httpx.Client, did: str, collection: str, limit: int = 100
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every record of a collection, page by page; also the raw page bodies."""
    records: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"repo": did, "collection": collection, "limit": str(limit)}
        if cursor is not None:
            params["cursor"] = cursor
        response = client.get(f"/xrpc/{LIST}", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        records.extend(body["records"])
        cursor = body.get("cursor")
        if cursor is None:
            return records, pages


def listed_state(client: httpx.Client, world: World) -> dict[str, tuple[str, dict[str, Any]]]:
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for did in world.dids():
        for collection in world.collections(did):
            for rec in list_all(client, did, collection)[0]:
                assert rec["uri"] not in out
                out[rec["uri"]] = (rec["cid"], rec["value"])
    return out


# -- world ---------------------------------------------------------------------------------


def test_tids_are_13_chars_and_strictly_increasing() -> None:
    w = World()
    tids = [w.next_tid() for _ in range(10_000)]
    assert all(len(t) == 13 and set(t) <= set(TID_ALPHABET) for t in tids)
    assert all(a < b for a, b in itertools.pairwise(tids))
    assert tids[0][0] in "234567"  # the top bit is zero
    micros, clock = decode_tid(tids[-1])
    assert clock == 0 and abs(micros - time.time_ns() // 1000) < 60_000_000
    assert encode_tid(micros, clock) == tids[-1]


def test_mutations_emit_jetstream_events(world: World) -> None:
    rkey = world.records(ALICE, POST)[0][0]
    before = world.rev(ALICE)
    events = [
        world.create(ALICE, POST),
        world.update(ALICE, POST, rkey),
        world.delete(ALICE, POST, rkey),
        world.set_handle(ALICE, "alice2.test"),
        world.delete_account(BOB),
    ]
    assert [e["kind"] for e in events] == ["commit"] * 3 + ["identity", "account"]
    assert [e["commit"]["operation"] for e in events[:3]] == ["create", "update", "delete"]
    assert "record" not in events[2]["commit"] and "cid" not in events[2]["commit"]
    assert events[4]["account"]["active"] is False
    assert events[4]["account"]["status"] == "deleted"
    assert events[3]["identity"]["handle"] == "alice2.test"
    for event in events:
        JetstreamEvent.model_validate(event)
    times = [e["time_us"] for e in events]
    assert times == sorted(set(times))
    revs = [e["commit"]["rev"] for e in events[:3]]
    assert before < revs[0] < revs[1] < revs[2] < world.rev(ALICE)
    assert world.events == events
    created = events[0]["commit"]
    uri = f"at://{ALICE}/{POST}/{created['rkey']}"
    assert world.state()[uri] == (created["cid"], created["record"])
    assert f"at://{ALICE}/{POST}/{rkey}" not in world.state()
    assert world.uris_of(BOB) == set()


# -- PDS -----------------------------------------------------------------------------------


def test_list_records_pages_every_record_once(
    world: World, pds: FakePds, client: httpx.Client
) -> None:
    for did in (ALICE, BOB):
        for collection in (POST, LIKE):
            records, pages = list_all(client, did, collection)
            assert [len(p["records"]) for p in pages] == [100, 100, 50]
            assert "cursor" not in pages[-1]
            assert all("cursor" in p for p in pages[:-1])
            rkeys = [r["uri"].rsplit("/", 1)[1] for r in records]
            assert rkeys == sorted(set(rkeys))
            assert [(k, c, v) for k, c, v in world.records(did, collection)] == [
                (r["uri"].rsplit("/", 1)[1], r["cid"], r["value"]) for r in records
            ]
    assert listed_state(client, world) == world.state()
    assert len(world.state()) == 1000
    assert pds.count(endpoint=LIST, status=200) == 12 * 2  # listed_state walked again
    default = client.get(f"/xrpc/{LIST}", params={"repo": ALICE, "collection": POST}).json()
    assert len(default["records"]) == 50
    too_big = client.get(f"/xrpc/{LIST}", params={"repo": ALICE, "collection": POST, "limit": 101})
    assert too_big.status_code == 400 and too_big.json()["error"] == "InvalidRequest"


def test_mutations_during_paging_show_on_later_pages(world: World) -> None:
    rkeys = [r[0] for r in world.records(ALICE, POST)]
    made: list[dict[str, Any]] = []

    def on_page(did: str, collection: str, number: int, served: int) -> None:
        if (did, collection, number) == (ALICE, POST, 1):
            assert served == 100
            made.append(world.create(ALICE, POST))  # newest rkey: lands on the last page
            world.update(ALICE, POST, rkeys[150], {"$type": POST, "text": "edited"})
            world.delete(ALICE, POST, rkeys[200])
            world.update(ALICE, POST, rkeys[10], {"$type": POST, "text": "too late"})

    with FakePds(world, on_page=on_page) as pds, httpx.Client(base_url=pds.url) as client:
        records, _ = list_all(client, ALICE, POST)
    by_rkey = {r["uri"].rsplit("/", 1)[1]: r for r in records}
    assert made[0]["commit"]["rkey"] in by_rkey
    assert by_rkey[rkeys[150]]["value"]["text"] == "edited"
    assert rkeys[200] not in by_rkey
    assert by_rkey[rkeys[10]]["value"]["text"] != "too late"  # served before the edit
    assert len(records) == 250


def test_state_agrees_with_list_records_after_random_mutations(
    world: World, client: httpx.Client
) -> None:
    rng = random.Random(7)
    events = [world.random_mutation(rng) for _ in range(2000)]
    ops = {e["commit"]["operation"] for e in events}
    assert ops == {"create", "update", "delete"}
    only_bob = [world.random_mutation(rng, [BOB]) for _ in range(50)]
    assert {e["did"] for e in only_bob} == {BOB}
    assert listed_state(client, world) == world.state()


def test_latest_commit_rev_follows_mutations(world: World, client: httpx.Client) -> None:
    def rev() -> str:
        response = client.get("/xrpc/com.atproto.sync.getLatestCommit", params={"did": ALICE})
        assert response.status_code == 200
        body = response.json()
        assert body["cid"].startswith("bafy")
        return str(body["rev"])

    seen = [rev()]
    rng = random.Random(1)
    for _ in range(20):
        event = world.random_mutation(rng, [ALICE])
        seen.append(rev())
        assert seen[-1] == event["commit"]["rev"] == world.rev(ALICE)
    assert seen == sorted(set(seen))


def test_deleted_account_is_gone(world: World, pds: FakePds, client: httpx.Client) -> None:
    world.delete_account(ALICE)
    assert not any(uri.startswith(f"at://{ALICE}/") for uri in world.state())
    for path, params in [
        ("com.atproto.sync.getLatestCommit", {"did": ALICE}),
        ("com.atproto.repo.describeRepo", {"repo": ALICE}),
        (LIST, {"repo": ALICE, "collection": POST}),
        ("com.atproto.sync.getLatestCommit", {"did": "did:plc:nobody"}),
    ]:
        response = client.get(f"/xrpc/{path}", params=params)
        assert response.status_code == 400
        assert response.json()["error"] == "RepoNotFound"
    assert pds.count(status=400) == 4


def test_describe_repo_and_plc_document(world: World, pds: FakePds, client: httpx.Client) -> None:
    body = client.get("/xrpc/com.atproto.repo.describeRepo", params={"repo": ALICE}).json()
    assert body["handle"] == "alice.test" and body["did"] == ALICE
    assert body["collections"] == [LIKE, POST] and body["handleIsCorrect"] is True
    doc = client.get(f"/plc/{ALICE}").json()
    assert doc["id"] == ALICE and doc["alsoKnownAs"] == ["at://alice.test"]
    assert doc["service"][0]["serviceEndpoint"] == pds.url
    assert doc["service"][0]["id"] == "#atproto_pds"
    assert body["didDoc"] == doc
    assert client.get("/plc/did:plc:nobody").status_code == 404
    web = client.get("/.well-known/did.json").json()
    assert web["id"] == BOB and web["service"][0]["serviceEndpoint"] == pds.url
    world.set_handle(ALICE, "alice.new")
    assert client.get(f"{pds.plc_url}/{ALICE}").json()["alsoKnownAs"] == ["at://alice.new"]
    assert pds.count(endpoint="plc") == 3


def test_throttle_answers_429_with_retry_after(world: World) -> None:
    with FakePds(world, throttle_every=3) as pds, httpx.Client(base_url=pds.url) as client:
        statuses = []
        for _ in range(9):
            response = client.get(f"/xrpc/{LIST}", params={"repo": ALICE, "collection": POST})
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.headers["retry-after"] == "1"
                assert int(response.headers["ratelimit-reset"]) >= int(time.time())
                assert response.json()["error"] == "RateLimitExceeded"
        client.get(f"/plc/{ALICE}")  # not throttled, not counted
        assert statuses == [200, 200, 429] * 3
        assert pds.throttled() == 3 and pds.count(endpoint=LIST) == 9


def test_page_delay_and_hook_errors(world: World) -> None:
    def boom(did: str, collection: str, number: int, served: int) -> None:
        raise RuntimeError("hook failed")

    pds = FakePds(world, page_delay=0.2, on_page=boom).start()
    with httpx.Client(base_url=pds.url) as client:
        started = time.monotonic()
        response = client.get(f"/xrpc/{LIST}", params={"repo": ALICE, "collection": POST})
        assert response.status_code == 200 and time.monotonic() - started >= 0.2
    with pytest.raises(RuntimeError, match="hook failed"):
        pds.stop()


# -- Jetstream -----------------------------------------------------------------------------


@pytest.fixture
def jetstream(world: World) -> Iterator[FakeJetstream]:
    with FakeJetstream(world) as server:
        yield server


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def receive(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(n)]


async def test_jetstream_streams_live_events_in_order(
    world: World, jetstream: FakeJetstream
) -> None:
    world.create(ALICE, POST)  # before the connection: not sent without a cursor
    assert jetstream.url.endswith("/subscribe")
    async with connect(jetstream.url) as ws:
        await until(lambda: jetstream.active == 1)
        rng = random.Random(3)
        emitted = [world.random_mutation(rng) for _ in range(200)]
        emitted.append(world.set_handle(BOB, "bob2.example.com"))
        got = await receive(ws, len(emitted))
        assert got == emitted
    await until(lambda: jetstream.active == 0)
    assert jetstream.sent == len(emitted)
    assert jetstream.connections[0]["cursor"] is None


async def test_jetstream_replays_from_cursor_then_goes_live(
    world: World, jetstream: FakeJetstream
) -> None:
    rng = random.Random(5)
    for _ in range(50):
        world.random_mutation(rng)
    cursor = world.events[20]["time_us"]
    stop = threading.Event()

    def churn() -> None:  # keeps the world moving while the client subscribes
        while not stop.is_set():
            world.random_mutation(rng)
            time.sleep(0.0005)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        async with connect(f"{jetstream.url}?cursor={cursor}") as ws:
            await until(lambda: jetstream.active == 1)
            await asyncio.sleep(0.1)
            stop.set()
            thread.join()
            expected = [e for e in world.events if e["time_us"] >= cursor]
            got = await receive(ws, len(expected))
            assert got == expected
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)  # nothing extra, no duplicate
    finally:
        stop.set()
        thread.join()
    assert len(expected) > 60


async def test_jetstream_filters(world: World, jetstream: FakeJetstream) -> None:
    query = f"wantedDids={ALICE}&wantedCollections=app.bsky.feed.p*&wantedCollections={LIKE}"
    prefix = "wantedCollections=app.bsky.*&wantedDids=" + BOB
    async with (
        connect(f"{jetstream.url}?{query}") as narrow,
        connect(f"{jetstream.url}?{prefix}") as wide,
    ):
        await until(lambda: jetstream.active == 2)
        world.create(ALICE, "app.other.thing")  # nobody wants it
        world.create(BOB, "com.example.x")  # nobody wants it
        a = world.create(ALICE, LIKE)
        b = world.create(BOB, POST)
        c = world.set_handle(ALICE, "alice.new")  # identity passes collection filters
        d = world.delete_account(BOB)
        assert await receive(narrow, 2) == [a, c]
        assert await receive(wide, 2) == [b, d]
    infos = jetstream.connections
    assert infos[0]["wantedDids"] == [ALICE]
    assert infos[0]["wantedCollections"] == ["app.bsky.feed.p*", LIKE]


async def test_jetstream_inject_and_drop(world: World, jetstream: FakeJetstream) -> None:
    async with connect(jetstream.url) as ws:
        await until(lambda: jetstream.active == 1)
        first = world.create(ALICE, POST)
        jetstream.inject("{not json")
        last = world.create(ALICE, POST)
        assert json.loads(await ws.recv()) == first
        assert await ws.recv() == "{not json"
        assert json.loads(await ws.recv()) == last
        assert jetstream.drop_connections() == 1
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    await until(lambda: jetstream.active == 0)
    async with connect(f"{jetstream.url}?cursor={last['time_us']}") as again:
        assert await receive(again, 1) == [last]
        assert jetstream.drop_connections(abrupt=True) == 1
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(again.recv(), 5)
    assert len(jetstream.connections) == 2
