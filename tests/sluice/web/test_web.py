"""The web dashboard end to end: headless Chromium (Debian's, driven by Playwright) against a real
`sluice api` process and the session stack. Screenshots of every page go to tests/artifacts/."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from sluice.service import Client
from tests.conftest import ROOT, Stack, api_process

pytest.importorskip("playwright", reason="playwright is not installed: `make setup` installs it")
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

CHROMIUM = os.environ.get("SLUICE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: `make setup` installs Debian's chromium "
        "(it needs root and apt-get)",
    ),
]

TOKEN = "web-token-" + uuid.uuid4().hex  # the test's own API calls; no name ("api")
SESSION_TOKEN = "web-session-" + uuid.uuid4().hex  # the browser signs in with this one
SESSION_NAME = "dashboard"
ARTIFACTS = ROOT / "tests" / "artifacts"
HEADER = "id,name,price,qty,day,version\n"
DESKTOP: ViewportSize = {"width": 1280, "height": 860}
PHONE: ViewportSize = {"width": 390, "height": 844}
FINAL = ("run.completed", "run.failed", "run.cancelled")


def csv_rows(first: int, n: int, *, bad_every: int = 0) -> bytes:
    """``n`` item rows from id ``first``; with ``bad_every``, every such row has a bad price."""
    lines = [HEADER]
    for i in range(first, first + n):
        price = "not-a-price" if bad_every and i % bad_every == 0 else f"{i % 1000}.{i % 100:02d}"
        lines.append(f"{i},item {i},{price},{i % 50},2024-01-{1 + i % 28:02d},1\n")
    return "".join(lines).encode()


def shot(page: Page, name: str, *, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


@pytest.fixture(scope="module")
def api(stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with api_process(
        stack,
        tmp_path_factory.mktemp("web") / "api.log",
        SLUICE_API_TOKEN=TOKEN,
        SLUICE_API_TOKENS=f"{SESSION_NAME}:{SESSION_TOKEN}",
    ) as url:
        yield url


@pytest.fixture
def http(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=90) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def session(api: str, browser: Browser) -> Any:
    """A signed-in browser state (the session cookie), made through the sign-in form."""
    context = browser.new_context(base_url=api)
    page = context.new_page()
    page.goto("/ui/login")
    page.fill("#token", SESSION_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/runs")
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def page(api: str, browser: Browser, session: Any) -> Iterator[Page]:
    """A signed-in page; a script error, or anything the browser logs as an error (a refused
    resource, a policy violation), fails the test."""
    context = browser.new_context(base_url=api, storage_state=session, viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"script error: {exc}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    # The console says "Failed to load resource" without the address: keep the addresses.
    refused: list[str] = []
    page.on(
        "response",
        lambda r: (
            refused.append(f"{r.status} {r.request.method} {r.url}") if r.status >= 400 else None
        ),
    )
    yield page
    context.close()
    assert not errors, (errors, refused)


def sql(stack: Stack, query: str, *args: Any) -> None:
    """One statement, from a synchronous test: in a thread of its own, since Playwright's sync
    API keeps an event loop running in this one."""

    async def run() -> None:
        conn = await asyncpg.connect(stack.postgres.url)
        try:
            await conn.execute(query, *args)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=30)


@pytest.fixture
def backfilled(stack: Stack) -> Iterator[str]:
    """Backfill state of one made-up repository, removed afterwards."""
    did = f"did:plc:web{uuid.uuid4().hex[:12]}"
    sql(
        stack,
        "INSERT INTO sluice.backfill (did, collection, status, pds, records_synced, pages,"
        " started_at, completed_at, error) VALUES"
        " ($1, 'app.bsky.feed.post', 'completed', 'https://pds.example', 1234, 13,"
        "  now() - interval '1 minute', now(), NULL),"
        " ($1, 'app.bsky.graph.follow', 'failed', 'https://pds.example', 40, 1,"
        "  now() - interval '1 minute', now(), 'listRecords answered HTTP 500 three times')",
        did,
    )
    yield did
    sql(stack, "DELETE FROM sluice.backfill WHERE did = $1", did)


def upload(http: httpx.Client, slug: str, body: bytes, **params: str) -> dict[str, Any]:
    sent = http.post(
        f"/api/v1/imports/{slug}/upload",
        files={"file": ("rows.csv", body, "text/csv")},
        params=params,
    )
    assert sent.status_code in (200, 202), sent.text
    run: dict[str, Any] = sent.json()
    return run


def stays_on_page(page: Page) -> None:
    """Marks the document: the mark is gone if the page reloads or navigates."""
    page.evaluate("window.__sluiceMark = 'still here'")


def did_not_reload(page: Page) -> bool:
    return bool(page.evaluate("window.__sluiceMark === 'still here'"))


# ----------------------------------------------------------------------------- sign-in, auth


def test_sign_in_refuses_a_wrong_token_and_keeps_the_right_one_out_of_urls(
    api: str, browser: Browser
) -> None:
    context = browser.new_context(base_url=api, viewport=DESKTOP)
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))

    page.goto("/ui/runs")
    assert page.url.endswith("/ui/login?next=/ui/runs")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert not [c for c in context.cookies() if c["name"] == "sluice_session"]
    shot(page, "login")

    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/runs")
    expect(page.locator("h1")).to_have_text("Runs")
    (cookie,) = [c for c in context.cookies() if c["name"] == "sluice_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not page.evaluate("document.cookie.includes('sluice_session')")
    assert not [u for u in urls if TOKEN in u]

    page.click("text=Sign out")
    page.wait_for_url("**/ui/login")
    page.goto("/ui/importers")
    assert "/ui/login?next=/ui/importers" in page.url
    context.close()


def test_the_api_takes_the_session_cookie_and_the_pages_stay_out_of_openapi(api: str) -> None:
    with httpx.Client(base_url=api, timeout=30) as anon:
        assert anon.get("/api/v1/runs", cookies={"sluice_session": TOKEN}).status_code == 200
        wrong = anon.get("/api/v1/runs", cookies={"sluice_session": "nope"})
        assert wrong.status_code == 401 and "wrong API token" in wrong.json()["error"]["message"]
        missing = anon.get("/api/v1/events")
        assert missing.status_code == 401
        assert "missing API token" in missing.json()["error"]["message"]
        for path in ("/", "/ui/runs", "/ui/upload", f"/ui/runs/{uuid.uuid4()}"):
            redirect = anon.get(path, cookies={"sluice_session": "nope"})
            assert redirect.status_code == 303, path
            assert redirect.headers["location"].startswith(("/ui/login", "/ui/runs"))
        page = anon.get("/ui/runs", cookies={"sluice_session": TOKEN})
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for missing_run in (str(uuid.uuid4()), "not-a-run-id"):
            gone = anon.get(f"/ui/runs/{missing_run}", cookies={"sluice_session": TOKEN})
            assert gone.status_code == 404 and "Not found" in gone.text
        paths = anon.get("/api/v1/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui") or p == "/api/v1/events"]


def test_live_events_stream_from_the_lifecycle_topic(api: str, http: httpx.Client) -> None:
    with (
        httpx.Client(base_url=api, headers=http.headers, timeout=60) as one,
        httpx.Client(base_url=api, headers=http.headers, timeout=60) as two,
        one.stream("GET", "/api/v1/events", params={"importer": "t_api"}) as everything,
        two.stream("GET", "/api/v1/events", params={"type": "run.completed,run.failed"}) as ends,
    ):
        assert everything.headers["content-type"].startswith("text/event-stream")
        run = upload(http, "t_api", csv_rows(1, 10))

        def until_final(stream: httpx.Response) -> list[dict[str, Any]]:
            seen: list[dict[str, Any]] = []
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = orjson.loads(line[len("data: ") :])
                    seen.append(event)
                    if event["run_id"] == run["id"] and event["type"] in FINAL:
                        return seen
            raise AssertionError(f"the stream ended before the run did: {seen}")

        events = until_final(everything)
        assert {e["importer"] for e in events} == {"t_api"}
        mine = [e["type"] for e in events if e["run_id"] == run["id"]]
        assert mine[0] == "run.started" and mine[-1] == "run.completed", mine
        assert events[-1]["counters"]["processed_rows"] == 10
        finals = until_final(ends)
        assert {e["type"] for e in finals} <= {"run.completed", "run.failed"}


def test_live_stream_keeps_alive_and_stops_when_the_client_leaves(stack: Stack) -> None:
    from sluice.api.events import stream_events
    from sluice.subscription import Subscription

    class Visitor:
        """The part of a request the stream looks at: whether its client is gone."""

        def __init__(self) -> None:
            self.gone = False

        async def is_disconnected(self) -> bool:
            return self.gone

    async def follow() -> tuple[list[bytes], bool]:
        # The events of a run that does not exist: a run of another test on this stack that
        # ends meanwhile (a stalled one the recovery fails, say) is not this test's business.
        subscription = await Subscription(stack.settings(), run_id=uuid.uuid4()).start()
        request = Visitor()
        frames: list[bytes] = []
        async for frame in stream_events(subscription, request, keepalive=0.5):  # type: ignore[arg-type]
            frames.append(frame)
            if frame == b": keep-alive\n\n":
                request.gone = True
        return frames, subscription._closed

    with ThreadPoolExecutor(1) as pool:  # Playwright's loop runs in this thread
        frames, closed = pool.submit(asyncio.run, follow()).result(timeout=60)
    assert frames[0].startswith(b"retry: ") and frames[-1] == b": keep-alive\n\n"
    assert closed  # the generator ended by itself and left the topic


# ----------------------------------------------------------------------------- pages


def test_upload_through_the_page_and_watch_it_reach_100_percent(
    page: Page, http: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "web-upload.csv"
    path.write_bytes(csv_rows(100_001, 30_000))
    page.goto("/ui/upload")
    page.select_option("#importer", "t_api")
    page.set_input_files("#file", str(path))
    page.check("#dry-run")
    shot(page, "upload")
    page.click("#upload-submit")
    page.wait_for_url("**/ui/runs/*")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    stays_on_page(page)

    expect(page.locator("#run-pct")).to_have_text("100%", timeout=60_000)
    expect(page.locator("#run-status .badge")).to_have_text("completed")
    assert page.locator("#run-progress").evaluate("p => p.value") == 100
    expect(page.locator("#dry-run")).to_be_visible()
    expect(page.locator("[data-counter=processed_rows]")).to_have_text("30,000")
    expect(page.locator("#timeline li[data-type='run.completed']")).to_have_count(1)
    expect(page.locator("#timeline li[data-type='run.started']")).to_have_count(1)
    expect(page.locator("#chart svg path.line")).to_have_count(1)
    expect(page.locator("#cancel")).to_be_hidden()
    assert did_not_reload(page) and navigations == []
    shot(page, "run")
    run = http.get(f"/api/v1/runs/{page.url.rsplit('/', 1)[-1]}").json()
    assert run["requested_by"] == SESSION_NAME  # the name of the token signed in with


def test_an_adhoc_import_through_the_page_lands_the_table_the_api_lands(
    page: Page, http: httpx.Client, stack: Stack, tmp_path: Path
) -> None:
    """The upload page without an importer: table, key, a date format and decimal commas;
    the same table as POST /api/v1/imports/adhoc/upload, shown as adhoc:TABLE in the list."""
    suffix = uuid.uuid4().hex[:6]
    body = "Artikel;Preis;Seit\nK-1;24,32;10.03.2024\nK-2;1.234,5;11.03.2024\n".encode("cp1252")
    path = tmp_path / "preise.csv"
    path.write_bytes(body)
    page.goto("/ui/upload")
    expect(page.locator("#adhoc-fields")).to_be_hidden()
    page.select_option("#importer", "adhoc")
    expect(page.locator("#adhoc-fields")).to_be_visible()
    page.fill("#table", f"Page Prices {suffix}")
    page.fill("#key", "Artikel")
    page.fill("#date-format", "%d.%m.%Y")
    page.check("#decimal-comma")
    page.set_input_files("#file", str(path))
    shot(page, "upload-adhoc")
    page.click("#upload-submit")
    page.wait_for_url("**/ui/runs/*")
    expect(page.locator("#run-status .badge")).to_have_text("completed", timeout=60_000)
    table = f"page_prices_{suffix}"
    expect(page.locator("#target")).to_contain_text(f"public.{table}")
    run_id = page.url.rsplit("/", 1)[-1]
    sent = http.post(
        "/api/v1/imports/adhoc/upload",
        files={"file": ("preise.csv", body, "text/csv")},
        data={"table": f"api_prices_{suffix}", "key": "Artikel", "date_format": "%d.%m.%Y"}
        | {"decimal_comma": "true"},
        params={"wait": "true"},
    )
    assert sent.status_code == 200, sent.text

    async def shapes() -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(stack.postgres.url)
        try:
            return [
                [
                    tuple(r)
                    for r in await conn.fetch(
                        "SELECT column_name, data_type FROM information_schema.columns"
                        " WHERE table_name = $1 ORDER BY ordinal_position",
                        name,
                    )
                ]
                + [tuple(r) for r in await conn.fetch(f"SELECT * FROM {name} ORDER BY 1")]
                for name in (table, f"api_prices_{suffix}")
            ]
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        ours, theirs = pool.submit(asyncio.run, shapes()).result(timeout=30)
    assert ours == theirs
    assert ("preis", "numeric") in ours and ("seit", "date") in ours
    page.goto("/ui/runs")
    expect(page.locator(f"tr[data-run-id='{run_id}'] .c-importer")).to_have_text(f"adhoc:{table}")


def test_a_run_page_opened_before_the_file_was_read_shows_what_it_read_once_known(
    page: Page, stack: Stack
) -> None:
    """The page of a run whose split has not read the file yet has no "What it read"; once
    the run has its provenance, the next lifecycle event brings the card in, without a reload."""
    from datetime import UTC, datetime

    from sluice.schemas.events import LifecycleEvent
    from sluice.schemas.runs import RunCounters, RunStatus

    run_id = uuid.uuid4()
    sql(
        stack,
        "INSERT INTO sluice.runs (id, importer, source, status, file_name, started_at)"
        " VALUES ($1, 't_api', 'upload', 'running', 'preise.csv', now())",
        run_id,
    )
    try:
        page.goto(f"/ui/runs/{run_id}")
        stays_on_page(page)
        expect(page.locator("#run-status .badge")).to_have_text("running")
        expect(page.locator("#provenance")).to_have_count(0)
        provenance = {
            "file": {
                "name": "preise.csv",
                "size": 42,
                "content_type": "text/csv",
                "compression": "none",
            },
            "sha256": "ab" * 32,
            "format": "csv",
            "delimiter": ";",
            "sheet": None,
            "encoding": "cp1252",
            "header": ["Artikel", "Preis"],
            "columns": {"Artikel": "artikel", "Preis": "preis"},
            "aliases": {},
            "ignored": [],
            "duplicate_of": None,
            "schema_changes": [],
            "repeated_keys": {"keys": 1200, "rows": 3400, "won": "the last row in the file"},
            "readings": [
                {
                    "column": "preis",
                    "by": "inferred",
                    "decimal": ",",
                    "thousands": ".",
                    "why": "'24,32' has a decimal comma",
                }
            ],
        }
        event = LifecycleEvent(
            event_id=uuid.uuid4(),
            type="run.progress",
            run_id=run_id,
            importer="t_api",
            status=RunStatus.RUNNING,
            time=datetime.now(UTC),
            counters=RunCounters(),
            error=None,
        )
        # As the split does: the provenance saved, then a lifecycle event in the outbox.
        sql(
            stack,
            "UPDATE sluice.runs SET provenance = $2::jsonb WHERE id = $1",
            run_id,
            orjson.dumps(provenance).decode(),
        )
        sql(
            stack,
            "INSERT INTO sluice.events (event_id, run_id, type, topic, key, payload)"
            " VALUES ($1, $2, $3, 'lifecycle', $4, $5::jsonb)",
            event.event_id,
            run_id,
            event.type,
            str(run_id),
            event.model_dump_json(),
        )
        card = page.locator("#provenance")
        expect(card).to_be_visible(timeout=30_000)
        expect(card).to_contain_text("semicolon-separated")
        expect(card.locator("#readings")).to_contain_text("numbers with decimal ','")
        expect(card.locator("#repeated-keys")).to_have_text(
            "1,200 keys occur in more than one row (3,400 rows lost to another);"
            " the table keeps the last row in the file"
        )
        assert did_not_reload(page)
    finally:
        sql(stack, "DELETE FROM sluice.events WHERE run_id = $1", run_id)
        sql(stack, "DELETE FROM sluice.runs WHERE id = $1", run_id)


def test_runs_page_follows_new_runs_live(page: Page, http: httpx.Client) -> None:
    page.goto("/ui/runs")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    stays_on_page(page)
    run = upload(http, "t_api", csv_rows(200_001, 20_000))
    row = page.locator(f"tr[data-run-id='{run['id']}']")
    expect(row).to_be_visible(timeout=30_000)
    expect(row.locator(".pct")).to_have_text("100%", timeout=60_000)
    expect(row.locator(".badge")).to_have_text("completed")
    expect(row.locator(".c-rows")).to_have_text("20,000 / 20,000")
    assert row.locator(".c-rate").inner_text() not in ("", "—")
    assert did_not_reload(page)
    shot(page, "runs")

    page.select_option("select[name=status]", "completed_with_errors")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/ui/runs?status=completed_with_errors*")
    statuses = set(page.locator("#runs-body .badge").all_inner_texts())
    assert statuses <= {"completed with errors"}, statuses


def test_rejected_rows_with_reasons_csv_and_retry(page: Page, http: httpx.Client) -> None:
    run = upload(http, "t_api", csv_rows(300_001, 300, bad_every=10), wait="true")
    assert run["status"] == "completed_with_errors" and run["failed_rows"] == 30
    page.goto(f"/ui/runs/{run['id']}")
    rejected = page.locator("#rejected-body tr")
    expect(rejected).to_have_count(25)
    expect(page.locator("#rejected-count")).to_have_text("30 rows")
    expect(rejected.first.locator(".reason")).to_contain_text("price")
    assert rejected.first.locator("td").first.inner_text() == "10"
    # A table of the rows' columns, not a JSON blob.
    expect(rejected.first.locator("td[data-column='price']")).to_have_text("not-a-price")
    expect(page.locator("#rejected-head th.col", has_text="price")).to_have_count(1)
    assert not any("{" in text for text in rejected.first.locator("td.raw").all_inner_texts())
    page.click("#rejected-next")
    expect(rejected).to_have_count(5)
    expect(page.locator("#rejected-page")).to_have_text("Page 2 of 2")
    csv_link = page.locator("#csv")
    expect(csv_link).to_be_visible()
    exported = page.request.get(csv_link.get_attribute("href") or "")
    assert exported.ok and exported.headers["content-type"].startswith("text/csv")
    assert len(exported.text().splitlines()) == 1 + 30
    shot(page, "run-rejected")

    stays_on_page(page)
    page.click("#retry")
    child_link = page.locator("#related li.child a")
    expect(child_link).to_have_count(1)
    expect(page.locator("#action-message")).to_contain_text("Retry started")
    assert did_not_reload(page)
    child_link.click()
    page.wait_for_url("**/ui/runs/*")
    expect(page.locator("#parent a")).to_have_attribute("href", f"/ui/runs/{run['id']}")
    expect(page.locator("#run-status .badge")).to_have_text("completed with errors", timeout=60_000)
    child = http.get(f"/api/v1/runs/{page.url.rsplit('/', 1)[-1]}").json()
    assert child["parent_run_id"] == run["id"] and child["source"] == "retry"
    # Uploaded with the test's unnamed token, retried from the page signed in as dashboard.
    assert (run["requested_by"], child["requested_by"]) == ("api", SESSION_NAME)
    page.goto(f"/ui/runs/{run['id']}")
    expect(page.locator("#related li.child a")).to_have_attribute("href", f"/ui/runs/{child['id']}")


def test_cancel_a_long_run_from_the_page(page: Page, http: httpx.Client) -> None:
    # t_cancel has batches of 100: 200,000 rows keep the workers busy long enough to cancel.
    run = upload(http, "t_cancel", csv_rows(1, 200_000))
    page.goto("/ui/runs")
    row = page.locator(f"tr[data-run-id='{run['id']}']")
    expect(row.locator(".badge")).to_have_text("running", timeout=60_000)
    expect(row.locator(".c-rate")).not_to_have_text("—", timeout=30_000)
    shot(page, "runs-while-running")
    row.locator("a.run-link").click()
    page.wait_for_url(f"**/ui/runs/{run['id']}")
    expect(page.locator("#run-status .badge")).to_have_text("running", timeout=60_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    expect(page.locator("#run-status .badge")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#timeline li[data-type='run.cancelled']")).to_have_count(1)
    final = http.get(f"/api/v1/runs/{run['id']}").json()
    assert final["status"] == "cancelled" and final["processed_rows"] < 200_000
    shot(page, "run-cancelled")


def test_importers_and_backfill_pages(page: Page, backfilled: str) -> None:
    page.goto("/ui/importers")
    card = page.locator("section#t_api")
    expect(card).to_contain_text("upsert")
    expect(card).to_contain_text("upload")
    expect(page.locator("section#t_sched")).to_contain_text("paused")
    shot(page, "importers")

    page.goto("/ui/backfill")
    rows = page.locator(f"#backfill-body tr[data-did='{backfilled}']")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("completed")
    expect(rows.nth(0)).to_contain_text("1,234")
    expect(rows.nth(1)).to_contain_text("HTTP 500")
    shot(page, "backfill")
    page.select_option("select[name=status]", "failed")
    page.fill("input[name=did]", backfilled)
    page.click("form.filters button[type=submit]")
    expect(page.locator("#backfill-body tr")).to_have_count(1)
    expect(page.locator("#backfill-body tr")).to_contain_text("app.bsky.graph.follow")


def test_every_page_fits_a_phone(
    api: str, browser: Browser, session: Any, http: httpx.Client
) -> None:
    (latest,) = http.get("/api/v1/runs", params={"importer": "t_api", "limit": 1}).json()["data"]
    pages = {
        "runs": "/ui/runs",
        "run": f"/ui/runs/{latest['id']}",
        "upload": "/ui/upload",
        "importers": "/ui/importers",
        "backfill": "/ui/backfill",
    }
    signed_in = browser.new_context(base_url=api, storage_state=session, viewport=PHONE)
    anonymous = browser.new_context(base_url=api, viewport=PHONE)
    try:
        checks = [(anonymous.new_page(), "login", "/ui/login")]
        checks += [(signed_in.new_page(), name, path) for name, path in pages.items()]
        for page, name, path in checks:
            page.goto(path)
            if name == "backfill":  # its table comes from a fetch()
                page.wait_for_load_state("networkidle")
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
            shot(page, f"phone-{name}", full_page=False)  # what a phone shows first
            page.close()
    finally:
        signed_in.close()
        anonymous.close()


# Every visible cell of each runs row, and whether any two of them overlap or the table is
# wider than the page: measured from the element boxes the browser laid out.
RUNS_LAYOUT = """() => {
  const rows = [...document.querySelectorAll('#runs-body tr')];
  const overlaps = [];
  for (const row of rows) {
    const boxes = [...row.children]
      .filter((td) => td.offsetWidth > 0 && td.offsetHeight > 0)
      .map((td) => [td.className, td.getBoundingClientRect()]);
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const [a, r] = boxes[i];
        const [b, q] = boxes[j];
        const w = Math.min(r.right, q.right) - Math.max(r.left, q.left);
        const h = Math.min(r.bottom, q.bottom) - Math.max(r.top, q.top);
        if (w > 1 && h > 1) overlaps.push(`${a} / ${b}`);
      }
    }
    // Text wider than its own cell spills over the next one.
    for (const td of row.children) {
      if (td.offsetWidth > 0 && td.scrollWidth > td.clientWidth + 1
          && getComputedStyle(td).overflowX === 'visible') overlaps.push(`${td.className} spills`);
    }
  }
  const page = document.documentElement;
  return {rows: rows.length, overlaps, overflow: page.scrollWidth - page.clientWidth};
}"""


@pytest.mark.parametrize(
    "viewport", [{"width": 1366, "height": 768}, PHONE], ids=["1366x768", "phone"]
)
def test_the_runs_table_fits_without_overlapping_cells(
    api: str, browser: Browser, session: Any, http: httpx.Client, viewport: ViewportSize
) -> None:
    """A failed run's reason and an ad-hoc run's table name are the longest cells."""
    failed = http.post(
        "/api/v1/imports/adhoc/upload",
        files={"file": ("header-only.csv", b"id,name\n", "text/csv")},
        data={
            "table": f"a_rather_long_table_name_for_the_list_{uuid.uuid4().hex[:8]}",
            "key": "id",
        },
        params={"wait": "true"},
    )
    assert failed.status_code == 200 and failed.json()["status"] == "failed", failed.text
    context = browser.new_context(base_url=api, storage_state=session, viewport=viewport)
    try:
        page = context.new_page()
        page.goto("/ui/runs")
        expect(page.locator("#runs-body tr").first).to_be_visible()
        # The widest rows cell of a large import, whatever runs the list shows now.
        page.evaluate(
            "() => { document.querySelector('#runs-body tr .c-rows').textContent ="
            " '9,999,999 / 10,000,000'; }"
        )
        layout = page.evaluate(RUNS_LAYOUT)
        assert layout["rows"] > 1
        assert layout["overflow"] <= 0, f"the page is {layout['overflow']}px too wide"
        assert layout["overlaps"] == []
        shot(page, f"runs-{viewport['width']}", full_page=False)
    finally:
        context.close()


def test_the_api_docs_render_without_internet(api: str, browser: Browser) -> None:
    """/api/v1/docs loads Swagger UI from the server itself: with every request to another
    host refused, the operations of the OpenAPI document still show."""
    context = browser.new_context(base_url=api, viewport=DESKTOP)
    elsewhere: list[str] = []

    def only_here(route: Any) -> None:
        if route.request.url.startswith(api):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_here)
    page = context.new_page()
    page.goto("/api/v1/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Sluice", timeout=30_000)
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/runs").first).to_be_visible()
    context.close()
    assert not elsewhere, elsewhere
