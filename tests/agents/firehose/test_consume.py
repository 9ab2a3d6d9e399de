"""The Jetstream consumer against a real local WebSocket server (no database: the cursor store
is in memory)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve

from sluice.agents.firehose.consume import (
    BINARY_FRAME_REASON,
    DEAD_LETTER_KEEP,
    JetstreamConsumer,
    subscribe_url,
)
from sluice.errors import InvalidConfig
from sluice.schemas.firehose import JetstreamEvent

BASE_US = 1_725_911_162_329_308
REWIND = 2.0

Script = Callable[[ServerConnection], Awaitable[None]]


def event_json(i: int, *, did: str = "did:plc:alice") -> str:
    return json.dumps(
        {
            "did": did,
            "time_us": BASE_US + i * 1000,
            "kind": "commit",
            "commit": {
                "rev": f"3l3qo2vutsw{i:02d}",
                "operation": "create",
                "collection": "app.bsky.feed.post",
                "rkey": f"3l3qo2vuowo{i:02d}",
                "record": {"$type": "app.bsky.feed.post", "text": f"post {i}"},
                "cid": "bafyreib2rxk3rh6kzwq",
            },
        }
    )


class FakeJetstream:
    """A local WebSocket server: each connection runs the next script (the last one for
    every further connection) and records the path it asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.scripts: list[Script] = []
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.paths.append(ws.request.path)
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        await script(ws)

    def query(self, n: int) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.paths[n]).query)


async def hold_open(ws: ServerConnection) -> None:
    await ws.wait_closed()


def send_then_hold(messages: list[str | bytes]) -> Script:
    async def script(ws: ServerConnection) -> None:
        for m in messages:
            await ws.send(m)
        await ws.wait_closed()

    return script


@pytest.fixture
async def jetstream() -> AsyncIterator[FakeJetstream]:
    fake = FakeJetstream()
    async with serve(fake.handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}/subscribe"
        yield fake


class MemoryCursorStore:
    def __init__(self, initial: int | None = None) -> None:
        self.value = initial
        self.saves: list[int] = []
        self.on_save: Callable[[int], None] = lambda _: None

    async def load(self, name: str) -> int | None:
        return self.value

    async def save(self, name: str, time_us: int) -> None:
        self.on_save(time_us)
        assert self.value is None or time_us >= self.value, "cursor moved backwards"
        self.saves.append(time_us)
        self.value = time_us


class Sink:
    """publish / flush / dead_letter that record what they got; a save is checked against
    what had been flushed."""

    def __init__(self, store: MemoryCursorStore) -> None:
        self.events: list[tuple[JetstreamEvent, bytes]] = []
        self.dead: list[tuple[bytes, str]] = []
        self.flushes = 0
        self.flushed_up_to = -1  # highest time_us published when flush was last called
        store.on_save = self.check_save

    async def publish(self, event: JetstreamEvent, raw: bytes) -> None:
        self.events.append((event, raw))

    async def flush(self) -> None:
        self.flushes += 1
        self.flushed_up_to = max((e.time_us for e, _ in self.events), default=-1)

    async def dead_letter(self, raw: bytes, reason: str) -> None:
        self.dead.append((raw, reason))

    def check_save(self, time_us: int) -> None:
        assert time_us <= self.flushed_up_to, "saved a cursor for an event not flushed"


def make_consumer(url: str, store: MemoryCursorStore, sink: Sink, **kw: Any) -> JetstreamConsumer:
    kw.setdefault("rewind", REWIND)
    kw.setdefault("cursor_interval", 0.1)
    kw.setdefault("backoff", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return JetstreamConsumer(
        url,
        name="test",
        cursor_store=store,
        publish=sink.publish,
        flush=sink.flush,
        dead_letter=sink.dead_letter,
        **kw,
    )


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Running:
    """Run a consumer in a task; stop it cleanly on exit."""

    def __init__(self, consumer: JetstreamConsumer) -> None:
        self.consumer = consumer
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.consumer.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.stop.set()
        async with asyncio.timeout(5):
            await self.task


def test_subscribe_url() -> None:
    url = subscribe_url(
        "wss://jet.example/subscribe?requireHello=false&cursor=1",
        collections=["app.bsky.feed.post", "app.bsky.graph.*"],
        dids=["did:plc:a", "did:web:b.example"],
        cursor=42,
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "jet.example", "/subscribe")
    assert parse_qs(parts.query) == {
        "requireHello": ["false"],
        "wantedCollections": ["app.bsky.feed.post", "app.bsky.graph.*"],
        "wantedDids": ["did:plc:a", "did:web:b.example"],
        "cursor": ["42"],
    }
    assert subscribe_url("ws://h/subscribe", collections=(), dids=(), cursor=None) == (
        "ws://h/subscribe"
    )


def test_refuses_a_non_websocket_url() -> None:
    store = MemoryCursorStore()
    with pytest.raises(InvalidConfig, match="ws://"):
        make_consumer("https://jet.example/subscribe", store, Sink(store))


async def test_publishes_events_in_order_with_filters(jetstream: FakeJetstream) -> None:
    messages = [event_json(i) for i in range(50)]
    jetstream.scripts = [send_then_hold(list(messages))]
    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(
        jetstream.url,
        store,
        sink,
        collections=["app.bsky.feed.post", "app.bsky.feed.like"],
        dids=["did:plc:alice"],
    )
    async with Running(consumer):
        await until(lambda: len(sink.events) == 50)

    assert [raw for _, raw in sink.events] == [m.encode() for m in messages]
    assert [e.commit.rkey for e, _ in sink.events if e.commit] == [
        f"3l3qo2vuowo{i:02d}" for i in range(50)
    ]
    assert jetstream.query(0) == {
        "wantedCollections": ["app.bsky.feed.post", "app.bsky.feed.like"],
        "wantedDids": ["did:plc:alice"],
    }
    assert consumer.stats.received == consumer.stats.published == 50
    assert consumer.stats.malformed == 0 and consumer.stats.reconnects == 0
    # A clean stop flushes and saves the last cursor.
    assert store.value == BASE_US + 49 * 1000
    assert consumer.stats.last_time_us == store.value


async def test_malformed_messages_are_dead_lettered(jetstream: FakeJetstream) -> None:
    no_did = json.loads(event_json(1))
    del no_did["did"]
    foo = json.loads(event_json(2))
    foo["kind"] = "foo"
    no_record = json.loads(event_json(3))
    del no_record["commit"]["record"]
    bad_type = json.loads(event_json(4))
    bad_type["time_us"] = "yesterday"
    binary = b"\x28\xb5\x2f\xfd compressed"
    messages: list[str | bytes] = [
        event_json(0),
        "{not json",
        json.dumps(no_did),
        json.dumps(foo),
        json.dumps(no_record),
        json.dumps(bad_type),
        binary,
        event_json(5),
        event_json(6),
    ]
    jetstream.scripts = [send_then_hold(messages)]
    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(jetstream.url, store, sink)
    async with Running(consumer):
        await until(lambda: len(sink.events) == 3)

    assert [e.time_us for e, _ in sink.events] == [BASE_US, BASE_US + 5000, BASE_US + 6000]
    assert consumer.stats.malformed == 6
    assert consumer.stats.received == 9
    raws = [raw for raw, _ in sink.dead]
    assert raws == [m.encode() if isinstance(m, str) else m for m in messages[1:7]]
    reasons = [reason for _, reason in sink.dead]
    assert reasons[0].startswith("not JSON")
    assert "did" in reasons[1] and "required" in reasons[1].lower()
    assert "kind" in reasons[2]
    assert "commit" in reasons[3] and "needs a record" in reasons[3]
    assert "time_us" in reasons[4]
    assert reasons[5] == BINARY_FRAME_REASON


async def test_an_event_larger_than_a_kafka_message_is_dead_lettered_and_the_rest_go_on(
    jetstream: FakeJetstream,
) -> None:
    """Published, it would fail every flush and the consumer would resume before it forever.
    Its dead letter (a Kafka message too) keeps only its first DEAD_LETTER_KEEP bytes."""
    big = json.loads(event_json(1))
    big["commit"]["record"]["text"] = "x" * (DEAD_LETTER_KEEP + 1000)
    messages: list[str | bytes] = [event_json(0), json.dumps(big), event_json(2)]
    jetstream.scripts = [send_then_hold(messages)]
    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(jetstream.url, store, sink, max_event_bytes=DEAD_LETTER_KEEP)
    async with Running(consumer):
        await until(lambda: len(sink.events) == 2)

    assert [e.time_us for e, _ in sink.events] == [BASE_US, BASE_US + 2000]
    assert consumer.stats.malformed == 1
    ((raw, reason),) = sink.dead
    assert raw == json.dumps(big).encode()[:DEAD_LETTER_KEEP]
    assert f"{len(json.dumps(big).encode()):,} bytes is larger than" in reason
    assert "SLUICE_KAFKA_MAX_MESSAGE_BYTES" in reason and "keeps its first" in reason


async def test_reconnects_from_cursor_minus_rewind(jetstream: FakeJetstream) -> None:
    async def send_then_drop(ws: ServerConnection) -> None:
        for i in range(5):
            await ws.send(event_json(i))
        # Let the client read them, then drop the TCP connection without a close frame.
        await asyncio.sleep(0.1)
        ws.transport.abort()

    jetstream.scripts = [send_then_drop, send_then_hold([event_json(i) for i in range(3, 10)])]
    store = MemoryCursorStore(initial=BASE_US - 60_000_000)
    sink = Sink(store)
    consumer = make_consumer(jetstream.url, store, sink, dids=["did:plc:alice"])
    async with Running(consumer):
        await until(lambda: len(sink.events) == 12)

    # First connection: the stored cursor minus rewind; second: the last published one.
    assert jetstream.query(0)["cursor"] == [str(BASE_US - 60_000_000 - int(REWIND * 1e6))]
    assert jetstream.query(1) == {
        "wantedDids": ["did:plc:alice"],
        "cursor": [str(BASE_US + 4000 - int(REWIND * 1e6))],
    }
    assert consumer.stats.reconnects >= 1
    # Replayed events are published again (idempotent downstream); nothing is lost.
    assert {e.time_us for e, _ in sink.events} == {BASE_US + i * 1000 for i in range(10)}
    assert store.value == BASE_US + 9000


async def test_reconnects_after_a_clean_close_and_refused_connections() -> None:
    # Nothing listens on this port at first: connections are refused, with backoff.
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    holder.close()
    await holder.wait_closed()

    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        await ws.send(event_json(len(paths)))
        await ws.close()  # a clean close (1000) is reconnected too

    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(f"ws://127.0.0.1:{port}/subscribe", store, sink)
    async with Running(consumer):
        await until(lambda: consumer.stats.reconnects >= 2)
        async with serve(handler, "127.0.0.1", port, compression=None):
            await until(lambda: len(sink.events) >= 3)
    assert "cursor" not in parse_qs(urlsplit(paths[0]).query)
    assert parse_qs(urlsplit(paths[1]).query)["cursor"] == [str(BASE_US + 1000 - 2_000_000)]


async def test_cursor_saved_while_events_flow_only_after_flush(
    jetstream: FakeJetstream,
) -> None:
    async def trickle(ws: ServerConnection) -> None:
        for i in range(40):
            await ws.send(event_json(i))
            await asyncio.sleep(0.02)
        await ws.wait_closed()

    jetstream.scripts = [trickle]
    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(jetstream.url, store, sink)
    async with Running(consumer):
        await until(lambda: len(sink.events) == 40)
        saves_while_flowing = list(store.saves)
        # The stream is quiet now: the last cursor is still saved by the timer.
        await until(lambda: store.value == BASE_US + 39_000, timeout=1.0)
        quiet_flushes = sink.flushes
        await asyncio.sleep(0.3)
        assert sink.flushes == quiet_flushes, "flushed with nothing new to save"

    # ~0.8 s of events at a 0.1 s interval.
    assert len(saves_while_flowing) >= 4
    assert saves_while_flowing == sorted(set(saves_while_flowing))
    assert sink.flushes >= len(store.saves)
    assert store.value == BASE_US + 39_000


async def test_stop_while_waiting_to_reconnect() -> None:
    store = MemoryCursorStore()
    sink = Sink(store)
    consumer = make_consumer(
        "ws://127.0.0.1:9/subscribe", store, sink, backoff=30.0, backoff_max=30.0
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    stop.set()
    async with asyncio.timeout(2):
        await task
    assert time.monotonic() - started < 1.0
    assert store.saves == [] and sink.flushes == 0
