"""The host policy (SLUICE_URL_*) on the outbound clients other than the URL source, on the real
stack: the AT Protocol backfill (PLC directory, did:web documents, the PDS and its redirects)
and the paginated API source (list pages, details, redirects).

The workers allow only 127.0.0.1 (SLUICE_URL_ALLOW_HOSTS, tests/conftest.py). The trap is a
working server on 127.0.0.2, a loopback address the policy refuses: every test checks that it
was never contacted, so a refusal that came after the request would fail too."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from sluice.agents.firehose.backfill import IMPORTER, Backfiller
from sluice.config import FirehoseSettings, UrlSettings
from sluice.schemas.firehose import BackfillRequested
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.db import create_pool
from tests.conftest import TRAP_HOST, Stack, finish
from tests.support.servers.atproto import did_document
from tests.support.servers.recorder import Recorder, Reply, Request, redirect

pytestmark = pytest.mark.stack

POST = "app.bsky.feed.post"
TAG = uuid.uuid4().hex[:8]
TO_METADATA = f"did:plc:tometadata{TAG}"  # its PLC entry names http://169.254.169.254
TO_TRAP = f"did:plc:totrap{TAG}"  # its PLC entry names the trap
REDIRECTED = f"did:plc:redirected{TAG}"  # its PDS (allowed) redirects every call to the trap
WEB = f"did:web:trap{TAG}.example"  # its did:web document names the trap
LOOPBACK_PLC = f"did:plc:loopbackplc{TAG}"  # resolved with the default policy
WEB_HOST = f"did:web:{TRAP_HOST}%3A"  # + the trap's port: the did:web host is the trap itself
ALLOWED_ONLY = "SLUICE_URL_ALLOW_HOSTS is set and names neither"


def trap_route(request: Request) -> Reply:
    """Valid answers to everything the clients ask, so a request let through would succeed."""
    path = request.path
    if path == "/items":
        return Reply(200, {"data": [{"id": "t1", "name": "from the trap"}]})
    if path.startswith("/items/"):
        return Reply(200, {"data": {"name": "detail from the trap"}})
    if path.endswith("com.atproto.sync.getLatestCommit"):
        return Reply(200, {"rev": "3l3qo2vutsw2b", "cid": "bafytrap"})
    if path.endswith("com.atproto.repo.describeRepo"):
        return Reply(200, {"collections": [POST]})
    if path.endswith("com.atproto.repo.listRecords"):
        return Reply(200, {"records": []})
    if path == "/.well-known/did.json":
        return Reply(200, did_document(WEB, "trap.example", "http://127.0.0.1:9"))
    return Reply(404, {"error": "NotFound", "message": path})


@pytest.fixture(scope="module")
def trap(stack: Stack) -> Iterator[Recorder]:
    with Recorder(trap_route, host=TRAP_HOST, port=stack.trap_port) as server:
        yield server


@pytest.fixture(autouse=True)
def nothing_reaches_the_trap(trap: Recorder) -> Iterator[None]:
    before = len(trap.requests)
    yield
    assert trap.requests[before:] == [], "a request reached the refused address"


# ---------------------------------------------------------------- backfill


@pytest.fixture(scope="module")
def plc(stack: Stack, trap: Recorder) -> Iterator[Recorder]:
    """The PLC directory and did:web host of the workers (SLUICE_FIREHOSE_PLC_URL and
    _DID_WEB_URL point at stack.pds_port), doubling as a PDS that redirects to the trap."""
    own = f"http://127.0.0.1:{stack.pds_port}"
    documents = {
        TO_METADATA: "http://169.254.169.254",
        TO_TRAP: trap.url,
        REDIRECTED: own,
        LOOPBACK_PLC: own,
    }

    def route(request: Request) -> Reply:
        did = request.path.removeprefix("/plc/")
        if did in documents:
            return Reply(200, did_document(did, "someone.test", documents[did]))
        if request.path == "/.well-known/did.json":
            return Reply(200, did_document(WEB, "web.test", trap.url))
        if request.path.startswith("/xrpc/"):
            return redirect(f"{trap.url}{request.path}?{urlencode(request.query)}")
        return Reply(404, {"error": "NotFound", "message": request.path})

    with Recorder(route, port=stack.pds_port) as server:
        yield server


@pytest.fixture(scope="module")
async def covered(stack: Stack, plc: Recorder) -> AsyncIterator[list[str]]:
    """A firehose cursor that covers the test's DIDs (a backfill starts only when one does)."""
    dids = [TO_METADATA, TO_TRAP, REDIRECTED, WEB, LOOPBACK_PLC]
    conn = await asyncpg.connect(stack.postgres.url)
    name = f"security-{TAG}"
    try:
        await conn.execute(
            "INSERT INTO sluice.firehose_cursors (name, time_us, dids, updated_at)"
            " VALUES ($1, 1, $2, now() + interval '1 hour')",
            name,
            dids,
        )
        yield dids
    finally:
        await conn.execute("DELETE FROM sluice.firehose_cursors WHERE name = $1", name)
        await conn.close()


async def backfill_runs(
    db: asyncpg.Connection, dids: list[str], timeout: float = 120
) -> dict[str, Any]:
    """The finished backfill run of each DID, by DID."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch(
            "SELECT options->>'did' AS did, status, error, requested_by FROM sluice.runs"
            " WHERE importer = $1 AND options->>'did' = ANY($2::text[])"
            " AND status NOT IN ('queued', 'running')",
            IMPORTER,
            dids,
        )
        found = {r["did"]: r for r in rows}
        if len(found) == len(dids):
            return found
        assert time.monotonic() < deadline, f"backfills unfinished: {found}"
        await asyncio.sleep(0.5)


async def test_the_workers_refuse_a_pds_the_policy_does_not_allow(
    client: Client, db: asyncpg.Connection, plc: Recorder, covered: list[str]
) -> None:
    dids = [TO_METADATA, TO_TRAP, WEB, REDIRECTED]
    await client.backfill(dids, collections=[POST], requested_by="security-test")
    runs = await backfill_runs(db, dids)
    for did, run in runs.items():
        assert run["status"] == RunStatus.FAILED.value, (did, run["error"])
        assert ALLOWED_ONLY in run["error"], (did, run["error"])  # names the setting
    assert runs[TO_METADATA]["error"].startswith(
        f"{TO_METADATA}: its DID document names the PDS http://169.254.169.254, which is refused"
    )
    for did in (TO_TRAP, WEB):
        assert f"names the PDS http://{TRAP_HOST}:" in runs[did]["error"], runs[did]["error"]
        assert f"refused {TRAP_HOST}: " in runs[did]["error"]
    # The PDS answered with a redirect; the redirect was not followed.
    redirected = runs[REDIRECTED]["error"]
    assert f"redirects to http://{TRAP_HOST}:" in redirected, redirected
    assert f"refused {TRAP_HOST}: {ALLOWED_ONLY}" in redirected
    xrpc = [r.path for r in plc.requests if r.query.get("did") == REDIRECTED]
    assert xrpc == ["/xrpc/com.atproto.sync.getLatestCommit"], xrpc
    assert (
        await db.fetchval(
            "SELECT count(*) FROM sluice.backfill WHERE did = ANY($1::text[])"
            " AND status = 'completed'",
            dids,
        )
        == 0
    )


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack.postgres.url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def backfill_here(
    pool: asyncpg.Pool, did: str, settings: FirehoseSettings, policy: UrlSettings
) -> Any:
    backfiller = Backfiller(pool, settings, policy)
    try:
        return await backfiller.backfill(BackfillRequested(did=did, collections=[POST]))
    finally:
        await backfiller.close()


async def test_the_plc_directory_is_under_the_policy_too(
    pool: asyncpg.Pool, plc: Recorder, covered: list[str]
) -> None:
    settings = FirehoseSettings(plc_url=f"{plc.url}/plc")
    run = await backfill_here(pool, LOOPBACK_PLC, settings, UrlSettings())
    assert run.status is RunStatus.FAILED
    assert f"GET {plc.url}/plc/{LOOPBACK_PLC}: refused 127.0.0.1: a loopback address" in run.error
    assert "SLUICE_URL_ALLOW_HOSTS" in run.error and "SLUICE_URL_ALLOW_PRIVATE=true" in run.error
    assert [r for r in plc.requests if LOOPBACK_PLC in r.path] == []
    # With 127.0.0.1 allowed, the same backfill gets past the directory and its PDS, and stops
    # at the PDS's redirect to the trap.
    allowed = await backfill_here(
        pool, LOOPBACK_PLC, settings, UrlSettings(allow_hosts="127.0.0.1")
    )
    assert allowed.status is RunStatus.FAILED
    assert f"redirects to http://{TRAP_HOST}:" in (allowed.error or ""), allowed.error
    assert [r.path for r in plc.requests if LOOPBACK_PLC in r.path] == [f"/plc/{LOOPBACK_PLC}"]


async def test_a_did_web_host_on_a_refused_address_is_never_asked(
    pool: asyncpg.Pool, trap: Recorder, covered: list[str], db: asyncpg.Connection
) -> None:
    did = f"{WEB_HOST}{trap.port}"
    await db.execute(
        "UPDATE sluice.firehose_cursors SET dids = array_append(dids, $1) WHERE name = $2",
        did,
        f"security-{TAG}",
    )
    settings = FirehoseSettings(did_web_url="http://{host}/.well-known/did.json")
    run = await backfill_here(pool, did, settings, UrlSettings(allow_hosts="127.0.0.1"))
    assert run.status is RunStatus.FAILED
    assert (
        f"GET http://{TRAP_HOST}:{trap.port}/.well-known/did.json: refused {TRAP_HOST}: "
        f"{ALLOWED_ONLY}" in run.error
    ), run.error


# ---------------------------------------------------------------- paginated API source

ITEMS = [{"id": "g1", "name": "one"}, {"id": "g2", "name": "two"}]


@pytest.fixture(scope="module")
def guarded_api(stack: Stack, trap: Recorder) -> Iterator[Recorder]:
    """The allowed API of the t_api_list_redirect and t_api_detail_redirect importers."""

    def route(request: Request) -> Reply:
        if request.path == "/to-trap":
            return redirect(f"{trap.url}/items?{urlencode(request.query)}")
        if request.path == "/items":
            return Reply(200, {"data": ITEMS if request.query.get("page") == "1" else []})
        if request.path.startswith("/detail-to-trap/"):
            return redirect(f"{trap.url}/items/{request.path.rsplit('/', 1)[-1]}", 307)
        return Reply(404, {"error": "not found"})

    with Recorder(route, port=stack.guard_port) as server:
        yield server


async def test_an_api_source_on_a_refused_host_fails_its_run(client: Client, stack: Stack) -> None:
    run = await client.trigger("t_api_trapped", {})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.FAILED
    assert done.error == (
        f"api source: GET /items: refused {TRAP_HOST}: {ALLOWED_ONLY}; add the host, its "
        "address or a CIDR to it"
    )


async def test_a_list_page_that_redirects_to_a_refused_host_fails_the_run(
    client: Client, stack: Stack, guarded_api: Recorder
) -> None:
    run = await client.trigger("t_api_list_redirect", {})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.FAILED
    error = done.error or ""
    assert error.startswith("api source: GET /to-trap: "), error
    assert f"redirects to http://{TRAP_HOST}:" in error and ALLOWED_ONLY in error
    (asked,) = [r for r in guarded_api.requests if r.path == "/to-trap"]
    assert asked.headers["x-api-key"] == "guarded-secret"  # the API's own origin gets it


async def test_a_detail_that_redirects_to_a_refused_host_fails_the_item(
    client: Client, stack: Stack, db: asyncpg.Connection, guarded_api: Recorder
) -> None:
    run = await client.trigger("t_api_detail_redirect", {})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert (done.items_discovered, done.items_failed) == (2, 2)
    items = await db.fetch(
        "SELECT external_id, status, failure_count, last_error FROM sluice.items"
        " WHERE run_id = $1 ORDER BY external_id",
        run.id,
    )
    assert [(i["external_id"], i["status"], i["failure_count"]) for i in items] == [
        ("g1", "failed", 1),
        ("g2", "failed", 1),
    ]
    for item in items:
        assert item["last_error"].startswith(f"GET /detail-to-trap/{item['external_id']}: ")
        assert f"refused {TRAP_HOST}: {ALLOWED_ONLY}" in item["last_error"]
