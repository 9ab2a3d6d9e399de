"""The whole pipeline through secured listeners: TLS with the test CA, mutual TLS, SASL_SSL with
SCRAM-SHA-512 and SASL_PLAINTEXT with SCRAM-SHA-256 (tests/support/secure_broker.py).

Per mode, one secured broker and one ``sluice worker`` process configured only through its
environment: the secured ``SLUICE_KAFKA_*`` settings, its own topic prefix, consumer group and
PostgreSQL schemas (the session stack's PostgreSQL, not its schemas). The test process talks to
it with the same settings through ``Client``, ``sluice.subscribe`` and the ``sluice`` CLI.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

import sluice
from sluice.config import DatabaseSettings, PipelineSettings, Settings, UrlSettings
from sluice.dlq import read_letters
from sluice.importers.registry import build_registry
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from sluice.streams import kafka as clients
from sluice.streams.topics import Topics
from sluice.worker import prepare
from tests.conftest import ROOT, Stack, Worker
from tests.support.ports import free_port
from tests.support.rows import checksum, make_rows, table_checksum, write_csv
from tests.support.secure_broker import SecureBroker
from tests.support.servers.paginated_api import FakeApi
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.stack

PARTITIONS = 2
MODES: dict[str, dict[str, Any]] = {
    "tls": {"protocol": "SSL"},
    "mtls": {"protocol": "SSL", "client_auth": True},
    "sasl_ssl": {"protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512"},
    "sasl_plaintext": {"protocol": "SASL_PLAINTEXT", "mechanism": "SCRAM-SHA-256"},
}


@dataclass
class SecureStack:
    """One security mode: its broker, its worker, and the settings the test process uses."""

    mode: str
    broker: SecureBroker
    worker: Worker
    env: dict[str, str]
    settings: Settings
    client: Client
    api_port: int

    @property
    def importer(self) -> str:
        return f"t_sec_{self.mode}"

    @property
    def core_schema(self) -> str:
        return self.settings.database.core_schema

    @property
    def atproto_schema(self) -> str:
        return self.settings.database.atproto_schema

    @property
    def topics(self) -> Topics:
        return Topics.of(self.settings.kafka)

    @property
    def secrets(self) -> list[str]:
        """What must never be printed: the SASL password, the client key's pass phrase."""
        return [self.broker.password, self.broker.pki.key_password]

    def logs(self) -> str:
        return f"--- {self.worker.name}\n{self.worker.tail(60)}\n{self.broker.logs()}"

    async def finish(self, run: Run, timeout: float = 120) -> Run:
        done = await self.client.wait(run.id, timeout=timeout)
        assert done.status.terminal, f"run {run.id} still {done.status}:\n{self.logs()}"
        return done


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def worker_env(
    stack: Stack, root: Path, kafka_env: dict[str, str], mode: str, api_port: int
) -> dict[str, str]:
    """Everything a secured worker is told, through its environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(
        kafka_env,
        SLUICE_TOPIC_PREFIX=f"sec-{mode}",
        SLUICE_GROUP_ID=f"sec-{mode}-workers",
        SLUICE_KAFKA_PARTITIONS=str(PARTITIONS),
        SLUICE_KAFKA_SESSION_TIMEOUT="6",
        SLUICE_DATABASE_URL=stack.postgres.url,
        SLUICE_DATABASE_SCHEMA=f"sec_{mode}",
        SLUICE_DATABASE_ATPROTO_SCHEMA=f"sec_{mode}_atproto",
        SLUICE_IMPORTERS="tests.streams.secure_importers",
        SLUICE_HOME=str(root / "home"),
        SLUICE_URL_ALLOW_HOSTS="127.0.0.1",
        SLUICE_TEST_API_URL=f"http://127.0.0.1:{api_port}",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture(scope="module", params=list(MODES))
async def secure(
    request: pytest.FixtureRequest,
    stack: Stack,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SecureStack]:
    mode: str = request.param
    root = tmp_path_factory.mktemp(f"secure-{mode}")
    broker = SecureBroker(root / "broker", pki, **MODES[mode])
    broker.start()  # skips when stunnel is missing
    api_port = free_port()
    env = worker_env(stack, root, broker.env(), mode, api_port)
    settings = Settings(
        kafka=broker.settings(
            topic_prefix=env["SLUICE_TOPIC_PREFIX"],
            group_id=env["SLUICE_GROUP_ID"],
            partitions=PARTITIONS,
            session_timeout=6,
        ),
        database=DatabaseSettings(
            url=stack.postgres.url,
            core_schema=env["SLUICE_DATABASE_SCHEMA"],
            atproto_schema=env["SLUICE_DATABASE_ATPROTO_SCHEMA"],
        ),
        pipeline=PipelineSettings(importers=env["SLUICE_IMPORTERS"], home=root / "home"),
        url=UrlSettings(allow_hosts="127.0.0.1"),
    )
    worker = Worker(f"worker-{mode}", env, root)
    client = Client(settings)
    secured = SecureStack(mode, broker, worker, env, settings, client, api_port)
    try:
        # Topics (through the secured listener) and this deployment's schemas, before the worker.
        await prepare(settings, build_registry(settings.pipeline.importers))
        worker.start()
        warm = root / "warmup.csv"
        warm.write_text("id,name\n1,warm-up\n")
        run = await client.submit_file(secured.importer, warm, dry_run=True)
        done = await client.wait(run.id, timeout=120)
        assert done.status.terminal, f"the {mode} worker never took the warm-up:\n{secured.logs()}"
        yield secured
    finally:
        await client.close()
        worker.stop()
        broker.stop()


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.postgres.url)
    yield conn
    await conn.close()


async def test_a_file_import_lands_exactly(
    secure: SecureStack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = f"public.{secure.importer}"
    await db.execute(f"TRUNCATE {table}")
    rows = make_rows(3000, seed=5)
    path = write_csv(tmp_path / "items.csv", rows)
    run = await secure.finish(await secure.client.submit_file(secure.importer, path))
    assert run.status is RunStatus.COMPLETED, run.error
    assert (run.total_rows, run.processed_rows, run.created_rows) == (3000, 3000, 3000)
    assert (run.updated_rows, run.skipped_rows, run.failed_rows) == (0, 0, 0)
    assert await table_checksum(db, table) == (3000, checksum(rows))
    # The run is this deployment's: in its own schema, not the session stack's.
    assert await db.fetchval(
        f"SELECT count(*) FROM {secure.core_schema}.runs WHERE id = $1", run.id
    )
    assert not await db.fetchval("SELECT count(*) FROM sluice.runs WHERE id = $1", run.id)


async def test_an_api_source_run_completes(secure: SecureStack, db: asyncpg.Connection) -> None:
    importer = f"{secure.importer}_api"
    with FakeApi(120, port=secure.api_port) as api:
        run = await secure.client.trigger(importer, {})
        done = await secure.finish(run)
        hits = api.snapshot()
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.items_discovered, done.items_completed, done.items_failed) == (120, 120, 0)
    assert done.created_rows == 120
    got = {r["id"]: r["name"] for r in await db.fetch(f"SELECT id, name FROM public.{importer}")}
    assert got == {i: api.item(i)["name"] for i in api.ids}
    assert {h.what for h in hits if h.kind == "detail"} == set(api.ids)


async def test_a_firehose_batch_is_applied(secure: SecureStack, db: asyncpg.Connection) -> None:
    did = f"did:plc:sec{uuid.uuid4().hex[:10]}"
    events = [
        {
            "did": did,
            "time_us": 1_700_000_000_000_000 + i,
            "kind": "commit",
            "commit": {
                "rev": f"3l3qo2vutsw{i:02d}",
                "operation": "create",
                "collection": "test.secure.note",
                "rkey": f"note{i}",
                "record": {"text": f"note {i} over {secure.mode}"},
                "cid": f"bafysecure{i}",
            },
        }
        for i in range(20)
    ]
    producer = clients.producer(secure.settings.kafka)
    await producer.start()
    try:
        for event in events:
            await producer.send(secure.topics.firehose, orjson.dumps(event), key=did.encode())
        await producer.flush()
    finally:
        await producer.stop()
    query = f"SELECT rkey, record FROM {secure.atproto_schema}.records WHERE did = $1"
    deadline = time.monotonic() + 60
    while len(rows := await db.fetch(query, did)) < len(events):
        assert time.monotonic() < deadline, f"{len(rows)} of 20 applied:\n{secure.logs()}"
        await asyncio.sleep(0.3)
    assert {r["rkey"]: orjson.loads(r["record"]) for r in rows} == {
        f"note{i}": {"text": f"note {i} over {secure.mode}"} for i in range(20)
    }


async def test_a_subscription_sees_the_run_complete(secure: SecureStack, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "few.csv", make_rows(10, seed=9))
    async with sluice.subscribe(
        importers=secure.importer, types="run.completed", settings=secure.settings
    ) as events:
        run = await secure.client.submit_file(secure.importer, path, dry_run=True)
        deadline = time.monotonic() + 120

        async def completed() -> Any:
            async for event in events:
                if event.run_id == run.id:
                    return event
            return None

        event = await asyncio.wait_for(completed(), deadline - time.monotonic())
    assert event is not None and event.type == "run.completed"
    assert event.importer == secure.importer


async def test_a_dead_letter_is_listed_by_the_cli(secure: SecureStack) -> None:
    garbage = f"not an import request {uuid.uuid4().hex}".encode()
    producer = clients.producer(secure.settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(secure.topics.requests, garbage, key=b"garbage")
    finally:
        await producer.stop()
    # The worker dead-letters it; then the CLI, with the secured environment, lists it.
    deadline = time.monotonic() + 60
    while not any(
        item.letter.payload == garbage.decode()
        for item in await read_letters(secure.settings.kafka)
    ):
        assert time.monotonic() < deadline, f"never dead-lettered:\n{secure.logs()}"
        await asyncio.sleep(0.5)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluice", "dlq", "--json"],
        cwd=ROOT,
        env=secure.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    letters = [orjson.loads(line) for line in result.stdout.splitlines() if line.strip()]
    mine = [letter for letter in letters if letter["payload"] == garbage.decode()]
    assert len(mine) == 1, result.stdout[-2000:]
    assert mine[0]["topic"] == secure.topics.requests
    assert "not a valid import request" in mine[0]["reason"]
    for secret in secure.secrets:
        assert secret not in result.stdout + result.stderr


# What a worker of each mode is started with to fail, and the setting its message must name.
BROKEN: dict[str, tuple[str, str]] = {
    "tls": ("ssl_cafile", "SLUICE_KAFKA_SSL_CAFILE"),
    "mtls": ("ssl_certfile", "SLUICE_KAFKA_SSL_CERTFILE"),
    "sasl_ssl": ("sasl_password", "SLUICE_KAFKA_SASL_PASSWORD"),
    "sasl_plaintext": ("sasl_password", "SLUICE_KAFKA_SASL_PASSWORD"),
}


async def test_a_worker_with_a_wrong_setting_exits_at_start_saying_which(
    secure: SecureStack, tmp_path: Path
) -> None:
    field, setting = BROKEN[secure.mode]
    wrong = "Wr0ng-pa55word-for-the-test"
    broken = {
        "ssl_cafile": {"ssl_cafile": str(secure.broker.pki.rogue_ca)},
        "ssl_certfile": {"ssl_certfile": "", "ssl_keyfile": "", "ssl_key_password": ""},
        "sasl_password": {"sasl_password": wrong},
    }[field]
    # No metrics port: a port another process holds would fail the worker for that instead.
    env = {**secure.env, **secure.broker.env(**broken), "SLUICE_METRICS_PORT": "0"}
    started = time.monotonic()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluice", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert time.monotonic() - started < 60
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and setting in last, output[-3000:]
    assert "Traceback" not in output
    for secret in [*secure.secrets, wrong]:
        assert secret not in output


async def test_the_worker_log_shows_no_secret(secure: SecureStack) -> None:
    assert secure.worker.alive, secure.logs()
    log = secure.worker.log_path.read_text(errors="replace")
    assert "sec-" in log  # the log is the running worker's (it names its topics)
    for secret in secure.secrets:
        assert secret not in log
