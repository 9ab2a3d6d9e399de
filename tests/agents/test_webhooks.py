"""Webhooks: signing, hook selection, the delivery log, and a real receiver on the real stack."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from sluice.agents.deps import build_deps
from sluice.agents.webhooks import (
    HookSet,
    WebhookDispatcher,
    resolve_hooks,
    sign,
    verify_signature,
)
from sluice.config import DatabaseSettings, Settings, WebhookSettings, WebhookTarget
from sluice.errors import InvalidConfig
from sluice.importers.registry import Registry
from sluice.retries import backoff
from sluice.schemas.events import LifecycleEvent
from sluice.schemas.importers import Webhook
from sluice.schemas.runs import RunCounters, RunStatus
from sluice.schemas.webhooks import DeliveryStatus
from sluice.service import Client
from sluice.storage.db import connect, migrate
from sluice.storage.webhooks import DeliveryLog
from tests.conftest import WEBHOOK_SECRET, Stack, finish
from tests.support.cli import sluice
from tests.support.importers import items

# --- signing ------------------------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering_and_replays() -> None:
    body = b'{"type":"run.completed","run_id":"r1"}'
    now = str(int(time.time()))
    signature = sign(b"s3cret", now, body)
    assert signature.startswith("v1=") and len(signature) == 3 + 64

    assert verify_signature("s3cret", now, body, signature)
    assert verify_signature(b"s3cret", now, body, f"v1=0000, {signature}")  # rotation list
    assert not verify_signature("s3cret", now, body.replace(b"r1", b"r2"), signature)
    assert not verify_signature("other", now, body, signature)
    assert not verify_signature("s3cret", str(int(now) + 1), body, signature)
    assert not verify_signature("s3cret", now, body, signature.replace("v1=", "v0="))
    assert not verify_signature("s3cret", now, body, "garbage")
    assert not verify_signature("s3cret", "soon", body, signature)

    old = str(int(time.time()) - 301)
    assert not verify_signature("s3cret", old, body, sign(b"s3cret", old, body))
    assert verify_signature("s3cret", old, body, sign(b"s3cret", old, body), tolerance=3600)


def test_backoff_doubles_up_to_the_cap() -> None:
    # The webhook schedule: exact, since the next attempt is a time stored in PostgreSQL.
    assert [backoff(n, first=1.0, cap=300.0, jitter=False) for n in range(1, 11)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 256, 300,
    ]  # fmt: skip
    assert backoff(10_000, first=0.5, cap=60.0, jitter=False) == 60.0


# --- which hooks get which events -----------------------------------------------------------------


def test_hooks_are_chosen_by_event_type_and_importer() -> None:
    settings = WebhookSettings(
        hooks=(
            WebhookTarget(url="https://all.example/h"),
            WebhookTarget(
                url="https://orders.example/h",
                events=("run.started", "run.completed"),
                importers=("orders",),
                secret_env="ORDERS_HOOK_SECRET",
            ),
        ),
        secret=SecretStr("default-secret"),
    )
    own = Webhook("https://orders.example/own", events=("run.failed",), secret_env="OWN_SECRET")
    orders = replace(items("orders"), webhooks=(own,))
    environ = {"ORDERS_HOOK_SECRET": "orders-secret", "OWN_SECRET": "own-secret"}

    hooks = resolve_hooks(settings, [orders, items("other")], environ)

    def urls(event_type: str, importer: str) -> list[str]:
        return [h.url for h in hooks.for_event(event_type, importer)]

    assert urls("run.completed", "orders") == ["https://all.example/h", "https://orders.example/h"]
    assert urls("run.completed", "other") == ["https://all.example/h"]
    assert urls("run.started", "orders") == ["https://orders.example/h"]
    assert urls("run.progress", "orders") == []
    assert urls("run.failed", "orders") == ["https://orders.example/own", "https://all.example/h"]
    secrets = {h.url: h.secret.get_secret_value() for h in hooks.for_event("run.failed", "orders")}
    assert secrets == {
        "https://orders.example/own": "own-secret",
        "https://all.example/h": "default-secret",
    }
    assert "default-secret" not in repr(hooks.for_event("run.failed", "orders"))
    assert not HookSet()


def test_a_hook_without_a_secret_or_a_known_event_is_refused() -> None:
    no_default = WebhookSettings(
        hooks=(WebhookTarget(url="https://x.example/h"),), secret=SecretStr("")
    )
    with pytest.raises(InvalidConfig, match="SLUICE_WEBHOOK_SECRET"):
        resolve_hooks(no_default, [], {})
    unset = WebhookSettings(
        hooks=(WebhookTarget(url="https://x.example/h", secret_env="NOT_SET"),),
        secret=SecretStr("s"),
    )
    with pytest.raises(InvalidConfig, match="NOT_SET"):
        resolve_hooks(unset, [], {})
    with pytest.raises(ValueError, match="unknown event type"):
        WebhookTarget(url="https://x.example/h", events=("run.complete",))
    with pytest.raises(ValueError, match="http"):
        Webhook("ftp://x.example/h")


# --- the delivery log, against PostgreSQL -------------------------------------------------------


@pytest.fixture
async def scratch_url(stack: Stack, db: asyncpg.Connection) -> AsyncIterator[str]:
    """A database of its own: the stack's workers retry due deliveries in theirs."""
    name = f"webhooks_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE DATABASE {name}")
    url = stack.postgres.url.rsplit("/", 1)[0] + f"/{name}"
    conn = await connect(url)
    await migrate(conn)
    await conn.close()
    yield url
    await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


def lifecycle_event(event_type: str, run_id: uuid.UUID, *, age: timedelta = timedelta()) -> bytes:
    return (
        LifecycleEvent(
            event_id=uuid.uuid4(),
            type=event_type,
            run_id=run_id,
            importer="t_any",
            status=RunStatus.FAILED,
            time=datetime.now(UTC) - age,
            counters=RunCounters(),
            error="boom",
        )
        .model_dump_json()
        .encode()
    )


@pytest.mark.stack
async def test_a_failing_receiver_is_tried_max_attempts_times_then_failed(
    scratch_url: str,
) -> None:
    requests: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(503, text="down for maintenance")

    settings = Settings(
        database=DatabaseSettings(url=SecretStr(scratch_url)),
        webhooks=WebhookSettings(
            hooks=(WebhookTarget(url="http://receiver.test/hook", events=("run.failed",)),),
            secret=SecretStr("s"),
            max_attempts=3,
            backoff=0.05,
            backoff_max=0.1,
        ),
    )
    deps = await build_deps(settings, registry=Registry())
    try:
        dispatcher = WebhookDispatcher(
            deps,
            resolve_hooks(settings.webhooks, [], {}),
            transport=httpx.MockTransport(receiver),
        )
        dlog = DeliveryLog(deps.pool)
        run = await deps.runs.create(importer="t_any", source="file")
        value = lifecycle_event("run.failed", run.id)
        await dispatcher.on_event(value)
        await dispatcher.on_event(value)  # at least once: the same event again
        await dispatcher.on_event(lifecycle_event("run.started", run.id))  # not wanted
        await dispatcher.on_event(lifecycle_event("run.failed", run.id, age=timedelta(hours=2)))
        await dispatcher.on_event(b"not an event")
        # A run the database does not know is refused at once, logged, and not retried.
        started = time.monotonic()
        await dispatcher.on_event(lifecycle_event("run.failed", uuid.uuid4()))
        assert time.monotonic() - started < 2
        assert len(requests) == 1
        assert len(await dlog.list()) == 1

        deadline = time.monotonic() + 20
        while (await dlog.list())[0].status == "pending" and time.monotonic() < deadline:
            await dispatcher.retry_due()
            await asyncio.sleep(0.05)

        [delivery] = await dlog.list()
        assert delivery.event_id == LifecycleEvent.model_validate_json(value).event_id
        assert (delivery.status, delivery.attempts) == ("failed", 3)
        assert delivery.last_status_code == 503
        assert delivery.last_error == "HTTP 503: down for maintenance"
        assert len(requests) == 3
        assert [d.id for d in await dlog.list(status=DeliveryStatus.FAILED)] == [delivery.id]
    finally:
        await deps.close()


@pytest.mark.stack
async def test_two_workers_never_claim_the_same_attempt(scratch_url: str) -> None:
    settings = Settings(database=DatabaseSettings(url=SecretStr(scratch_url)))
    deps = await build_deps(settings, registry=Registry())
    try:
        dlog = DeliveryLog(deps.pool)
        urls = [f"http://receiver.test/{i}" for i in range(20)]
        ids = await dlog.record(
            event_id=uuid.uuid4(), run_id=None, event_type="run.completed", payload={}, urls=urls
        )
        assert len(ids) == 20
        first, second = await asyncio.gather(
            dlog.claim(lease=60, max_attempts=8, limit=15),
            dlog.claim(lease=60, max_attempts=8, limit=15),
        )
        claimed = [d.id for d in first + second]
        assert sorted(claimed) == sorted(ids)  # all of them, each once
        assert all(d.attempts == 1 for d in first + second)
        assert await dlog.claim(lease=60, max_attempts=8) == []  # leased, not due
    finally:
        await deps.close()


# --- a real receiver on the real stack ----------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class FlakyReceiver:
    """An HTTP server that answers 500 to the first ``failures`` requests, then 200."""

    def __init__(self, port: int, failures: int) -> None:
        self.requests: list[Received] = []
        self.succeeded = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 500 if len(receiver.requests) < failures else 200
                receiver.requests.append(
                    Received(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body, status
                    )
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status == 500 else b"ok")
                if status == 200:
                    receiver.succeeded.set()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(stack: Stack) -> Iterator[FlakyReceiver]:
    with FlakyReceiver(stack.webhook_port, failures=2) as r:
        yield r


@pytest.mark.stack
async def test_receiver_failing_twice_gets_the_event_on_the_third_attempt_signed(
    stack: Stack, client: Client, db: asyncpg.Connection, receiver: FlakyReceiver, tmp_path: Path
) -> None:
    path = tmp_path / "hooked.csv"
    path.write_text("id,name\n1,apple\n2,plum\n")
    run = await client.submit_file("t_hook", path)
    done = await finish(client, run, stack)
    assert done.status is RunStatus.COMPLETED

    assert await asyncio.to_thread(receiver.succeeded.wait, 60), (
        f"the hook got {len(receiver.requests)} requests, none answered 200:\n{stack.logs()}"
    )
    assert [r.answered for r in receiver.requests] == [500, 500, 200]
    third = receiver.requests[-1]
    assert third.path == "/hook"
    headers = third.headers
    assert headers["content-type"] == "application/json"
    assert headers["sluice-event"] == "run.completed"
    assert verify_signature(
        WEBHOOK_SECRET, headers["sluice-timestamp"], third.body, headers["sluice-signature"]
    )
    event = LifecycleEvent.model_validate_json(third.body)
    assert (event.run_id, event.type, event.status) == (run.id, "run.completed", "completed")
    assert str(event.event_id) == headers["sluice-event-id"]
    assert event.counters.created_rows == 2
    # Every attempt carries the same event, each signed at its own time.
    assert {r.headers["sluice-event-id"] for r in receiver.requests} == {str(event.event_id)}
    assert all(json.loads(r.body) == json.loads(third.body) for r in receiver.requests)

    # The worker records the outcome just after the answer.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = await db.fetchrow(
            "SELECT status, attempts, last_status_code FROM sluice.webhook_deliveries"
            " WHERE run_id = $1",
            run.id,
        )
        if row is not None and row["status"] != "pending":
            break
        await asyncio.sleep(0.1)
    assert row is not None and dict(row) == {
        "status": "delivered",
        "attempts": 3,
        "last_status_code": 200,
    }

    listed = sluice("webhooks", "--json", env=stack.env)
    assert listed.returncode == 0, listed.stderr
    [logged] = [d for d in json.loads(listed.stdout) if d["run_id"] == str(run.id)]
    assert logged["status"] == "delivered" and logged["attempts"] == 3
    assert logged["url"] == f"http://127.0.0.1:{stack.webhook_port}/hook"
    assert logged["event_type"] == "run.completed" and logged["delivered_at"]
    assert logged["last_error"].startswith("HTTP 500")

    text = sluice("webhooks", env=stack.env)
    assert text.returncode == 0 and str(run.id) in text.stdout
    failed = sluice("webhooks", "--failed", "--json", env=stack.env)
    assert failed.returncode == 0, failed.stderr
    assert str(run.id) not in failed.stdout
    assert len(receiver.requests) == 3  # delivered once, never again
