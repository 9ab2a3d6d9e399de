"""Pull sources end to end on the real stack: URL (with the SSRF guard), filesystem, FTP, SFTP,
the rate-limited paginated API with per-item tracking, and schedules. Every source is a real
local server started by the test; the broker, PostgreSQL and the two workers are real."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import pytest

from sluice.errors import NoPullSource, SourceError
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client, run_options
from tests.conftest import Stack, Worker, finish
from tests.support.rows import item_states
from tests.support.servers.paginated_api import FakeApi, most_in_window

pytestmark = pytest.mark.stack

CSV = "id,name,price\n1,one,1.50\n2,two,2.50\n3,three,3.50\n"


class Files(BaseHTTPRequestHandler):
    """/items.csv, a redirect to it, a redirect to the metadata address, a big and a slow file."""

    protocol_version = "HTTP/1.1"
    slow_seconds = 3.0

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/items.csv":
            self._send(200, CSV.encode(), {"Content-Type": "text/csv"})
        elif self.path == "/redirect":
            self._send(302, headers={"Location": "/items.csv"})
        elif self.path == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/big.csv":
            rows = "".join(f"{i},name {i},{i}.00\n" for i in range(1, 400))
            self._send(200, ("id,name,price\n" + rows).encode())
        elif self.path == "/slow.csv":
            time.sleep(self.slow_seconds)
            self._send(200, CSV.encode())
        else:
            self._send(404, b"no such file")


@pytest.fixture(scope="module")
def files_server(stack: Stack) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", stack.http_port), Files)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_url(stack: Stack, path: str) -> str:
    return f"http://127.0.0.1:{stack.http_port}{path}"


async def rows_of(db: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await db.fetch(f"SELECT id, name, price FROM {table} ORDER BY id")]


# ---------------------------------------------------------------- URL


async def test_a_file_behind_a_redirect_lands(
    client: Client, stack: Stack, db: asyncpg.Connection, files_server: Any
) -> None:
    run = await client.trigger("t_url", {"url": http_url(stack, "/redirect")})
    assert run.source == "url"
    done = await finish(client, run, stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.created_rows == 3
    assert done.source_location == http_url(stack, "/items.csv")
    assert done.file_name == "items.csv"
    assert [r[1] for r in await rows_of(db, "t_url")] == ["one", "two", "three"]


# The test stack allows only its own servers (SLUICE_URL_ALLOW_HOSTS); what is refused for
# being private without an allow list is tests/agents/fetch/test_url.py's.
_NOT_LISTED = (
    ": SLUICE_URL_ALLOW_HOSTS is set and names neither; add the host, its address or a CIDR to it"
)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", f"refused 169.254.169.254{_NOT_LISTED}"),
        ("http://10.1.2.3/data.csv", f"refused 10.1.2.3{_NOT_LISTED}"),
        ("http://192.168.0.10/data.csv", f"refused 192.168.0.10{_NOT_LISTED}"),
        ("http://[::1]:8080/data.csv", f"refused ::1{_NOT_LISTED}"),
        (
            "file:///etc/passwd",
            "only http and https URLs can be fetched, not file: (file:/etc/passwd); give an"
            " http:// or https:// link",
        ),
    ],
)
async def test_ssrf_targets_are_refused_before_a_run_exists(
    client: Client, url: str, why: str
) -> None:
    before = len(await client.list_runs(importer="t_url", limit=1000))
    with pytest.raises(SourceError) as refused:
        await client.trigger("t_url", {"url": url})
    assert str(refused.value).endswith(why), str(refused.value)
    assert len(await client.list_runs(importer="t_url", limit=1000)) == before


async def test_a_redirect_to_the_metadata_address_fails_the_run(
    client: Client, stack: Stack, files_server: Any
) -> None:
    run = await client.trigger("t_url", {"url": http_url(stack, "/to-metadata")})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.FAILED
    assert "169.254.169.254" in (done.error or "")


async def test_an_oversized_body_is_stopped_at_the_limit(
    client: Client, stack: Stack, db: asyncpg.Connection, files_server: Any
) -> None:
    run = await client.trigger("t_url_small", {"url": http_url(stack, "/big.csv")})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.FAILED
    assert "1000" in (done.error or ""), done.error
    assert done.file_id is None
    assert await db.fetchval("SELECT count(*) FROM t_url_small") == 0


async def test_a_trigger_for_an_importer_without_pull_source_is_refused(client: Client) -> None:
    with pytest.raises(NoPullSource, match="upload"):
        await client.trigger("t_exact", {})


# ---------------------------------------------------------------- filesystem


async def test_filesystem_paths_are_confined_to_the_roots(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    (stack.files / "inside.csv").write_text(CSV)
    outside = stack.root / "outside.csv"
    outside.write_text(CSV)
    (stack.files / "escape.csv").symlink_to(outside)

    run = await client.trigger("t_fs", {"path": "inside.csv"})
    done = await finish(client, run, stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert len(await rows_of(db, "t_fs")) == 3

    for path in ("../outside.csv", str(outside), "escape.csv", "sub/../../outside.csv"):
        run = await client.trigger("t_fs", {"path": path})
        done = await finish(client, run, stack)
        assert done.status is RunStatus.FAILED, path
        assert f"the path {path!r} is outside the allowed file roots (" in (done.error or ""), (
            path,
            done.error,
        )
        assert (done.error or "").endswith(
            "'..' and symlinks may not lead out of them; name a file inside one of the roots of"
            " SLUICE_FILE_ROOTS"
        ), done.error


# ---------------------------------------------------------------- FTP and SFTP


@pytest.fixture(scope="module")
def ftp_server(stack: Stack) -> Iterator[Any]:
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import ThreadedFTPServer

    home = stack.root / "ftp"
    (home / "in").mkdir(parents=True)
    authorizer = DummyAuthorizer()
    authorizer.add_user("loader", "s3cret-ftp", str(home), perm="elradfmwMT")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    server = ThreadedFTPServer(("127.0.0.1", stack.ftp_port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2}, daemon=True)
    thread.start()
    yield home
    server.close_all()


def drop_orders(folder: Any) -> None:
    import os

    (folder / "in").mkdir(parents=True, exist_ok=True)
    old = folder / "in" / "orders-1.csv"
    old.write_text("id,name,price\n1,old,1.00\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (folder / "in" / "orders-2.csv").write_text(CSV)
    (folder / "in" / "notes.txt").write_text("not an order")


async def wait_for(check: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.2)
    return check()


async def test_ftp_newest_matching_file_is_imported_then_moved(
    client: Client, stack: Stack, db: asyncpg.Connection, ftp_server: Any
) -> None:
    drop_orders(ftp_server)
    done = await finish(client, await client.trigger("t_ftp", {}), stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.source_location == "/in/orders-2.csv"
    assert [r[1] for r in await rows_of(db, "t_ftp")] == ["one", "two", "three"]
    moved = ftp_server / "done" / "orders-2.csv"
    assert await wait_for(moved.exists), "the imported file was not moved to /done"
    assert not (ftp_server / "in" / "orders-2.csv").exists()
    assert (ftp_server / "in" / "orders-1.csv").exists()  # older: not imported, not moved


async def test_ftp_wrong_password_fails_the_run_clearly(
    client: Client, stack: Stack, ftp_server: Any
) -> None:
    drop_orders(ftp_server)
    done = await finish(client, await client.trigger("t_ftp_wrong", {}), stack)
    assert done.status is RunStatus.FAILED
    assert "SLUICE_TEST_FTP_WRONG" in (done.error or ""), done.error
    assert "not-the-password" not in (done.error or "")


@pytest.fixture(scope="module")
async def sftp_server(stack: Stack) -> Any:
    import asyncssh

    home = stack.root / "sftp"
    (home / "in").mkdir(parents=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    (stack.root / "known_hosts").write_text(
        f"[127.0.0.1]:{stack.sftp_port} {key.export_public_key().decode().strip()}\n"
    )

    class Server(asyncssh.SSHServer):
        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return username == "loader" and password == "s3cret-ftp"

    def sftp_factory(chan: Any) -> asyncssh.SFTPServer:
        return asyncssh.SFTPServer(chan, chroot=str(home).encode())

    server = await asyncssh.create_server(
        Server,
        "127.0.0.1",
        stack.sftp_port,
        server_host_keys=[key],
        sftp_factory=sftp_factory,
    )
    yield home
    server.close()
    await server.wait_closed()


async def test_sftp_newest_matching_file_is_imported_then_moved(
    client: Client, stack: Stack, db: asyncpg.Connection, sftp_server: Any
) -> None:
    drop_orders(sftp_server)
    done = await finish(client, await client.trigger("t_sftp", {}), stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert [r[1] for r in await rows_of(db, "t_sftp")] == ["one", "two", "three"]
    assert await wait_for((sftp_server / "done" / "orders-2.csv").exists)
    assert (sftp_server / "in" / "orders-1.csv").exists()

    done = await finish(client, await client.trigger("t_sftp_wrong", {}), stack)
    assert done.status is RunStatus.FAILED
    assert "SLUICE_TEST_FTP_WRONG" in (done.error or ""), done.error


# ---------------------------------------------------------------- paginated API


async def test_rate_limited_api_with_flaky_and_failing_items(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    # About 12 s of fetching at the importer's rate: long enough for the limit to hold over
    # many windows, 429s and retries from both workers.
    n, allowed, burst = 2500, 220, 20  # the importer asks for 200/s with a burst of 20
    api = FakeApi(n, port=stack.api_port, per_second=allowed, throttle_every=500)
    flaky = {api.ids[i]: 1 + i % 3 for i in range(10, 2000, 200)}  # fail 1-3 times, then work
    broken = {api.ids[i] for i in (7, 1250, 2499)}  # 500 for ever
    missing = {api.ids[i] for i in (42, 1500)}  # 404
    api.flaky.update(flaky)
    api.broken = frozenset(broken)
    api.missing = frozenset(missing)
    with api:
        run = await client.trigger("t_api_rated", {})
        done = await finish(client, run, stack, timeout=300)
        hits = api.snapshot()
    bad = broken | missing
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert (done.items_discovered, done.items_completed, done.items_failed) == (n, n - 5, 5)
    assert (done.total_rows, done.processed_rows, done.created_rows) == (n, n, n - 5)
    assert done.failed_rows == 5
    got = {r["id"]: r for r in await db.fetch("SELECT id, name, price FROM t_api_rated")}
    assert set(got) == set(api.ids) - bad
    assert all(got[i]["name"] == api.item(i)["name"] for i in list(got)[:500])
    states = await item_states(db, run.id)
    for i in broken:
        assert states[i]["status"] == "failed"
        assert states[i]["failure_count"] == 4 and "HTTP 500" in states[i]["last_error"]
    for i in missing:
        assert states[i]["status"] == "failed" and "HTTP 404" in states[i]["last_error"]
    for i, k in flaky.items():
        assert states[i]["status"] == "completed" and states[i]["failure_count"] == k
    reasons = {
        r["reason"]
        for r in await db.fetch("SELECT reason FROM sluice.row_log WHERE run_id = $1", run.id)
    }
    assert len(reasons) >= 2 and all("HTTP" in r for r in reasons)
    # The cluster never went over the rate plus the burst, and counted every 429 it got.
    assert most_in_window([h.time for h in hits]) <= allowed + burst
    throttled = sum(1 for h in hits if h.status == 429)
    assert throttled > 0
    assert done.rate_limit_hits == throttled
    assert done.rate_limit_sleeps > 0 and done.total_sleep_seconds > 0
    # Both workers fetched details: the limit held for the cluster, not per process.
    agents = Counter(h.agent for h in hits if h.kind == "detail" and h.status == 200)
    assert len(agents) >= 2, agents

    # The broken items work now: a retry fetches just the failed ones, in a child run.
    api2 = FakeApi(n, port=stack.api_port)
    api2.missing = frozenset(missing)
    with api2:
        child = await client.retry(run.id)
        child = await finish(client, child, stack)
        retried = api2.snapshot()
    assert child.parent_run_id == run.id
    assert child.status is RunStatus.COMPLETED_WITH_ERRORS
    assert (child.items_discovered, child.items_completed, child.items_failed) == (5, 3, 2)
    assert {h.what for h in retried if h.kind == "detail"} == bad
    assert not [h for h in retried if h.kind == "list"]
    assert await db.fetchval("SELECT count(*) FROM t_api_rated") == n - 2


async def test_api_run_survives_killed_workers_without_refetching(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    n = 1500
    api = FakeApi(n, port=stack.api_port, list_latency=0.25)
    with api:
        run = await client.trigger("t_api_killed", {})

        # Kill every worker once discovery has recorded a few pages and details are landing.
        async def progressed() -> bool:
            pages = await db.fetchval(
                "SELECT pages FROM sluice.discovery WHERE run_id = $1", run.id
            )
            done = await db.fetchval(
                "SELECT count(*) FROM sluice.items WHERE run_id = $1 AND status = 'completed'",
                run.id,
            )
            return bool(pages and pages >= 6 and done >= 100)

        deadline = time.monotonic() + 120
        while not await progressed():
            assert time.monotonic() < deadline, f"no progress:\n{stack.logs()}"
            await asyncio.sleep(0.1)
        for worker in stack.workers:
            worker.kill()
        killed_at = time.time()
        resume = await db.fetchval("SELECT pages FROM sluice.discovery WHERE run_id = $1", run.id)
        completed = {
            r["external_id"]
            for r in await db.fetch(
                "SELECT external_id FROM sluice.items WHERE run_id = $1 AND status = 'completed'",
                run.id,
            )
        }
        assert resume < n // 50, "discovery finished before the kill; slow the list down"
        for worker in stack.workers:
            worker.start()
        done = await finish(client, run, stack, timeout=300)
        hits = api.snapshot()
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.items_discovered, done.items_completed, done.created_rows) == (n, n, n)
    assert await db.fetchval("SELECT count(*) FROM t_api_killed") == n
    # No page before the resume point was listed again.
    pages = Counter(h.what for h in hits if h.kind == "list" and h.status == 200)
    assert all(pages[str(p)] == 1 for p in range(1, resume + 1)), pages
    assert {str(p) for p in range(1, n // 50 + 1)} <= set(pages)
    # No item completed before the kill was fetched again.
    again = {h.what for h in hits if h.kind == "detail" and h.time > killed_at} & completed
    assert not again, f"{len(again)} completed items fetched again"


async def test_a_run_killed_while_items_wait_for_their_retry_loses_none_of_them(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    n = 600
    api = FakeApi(n, port=stack.api_port)
    flaky = {api.ids[i]: 1 + i % 2 for i in range(5, n, 20)}  # 30 items fail once or twice
    api.flaky.update(flaky)
    with api:
        run = await client.trigger("t_api_retry_killed", {})

        # Kill every worker while items wait for their retry and others are completed.
        async def waiting() -> set[str]:
            rows = await db.fetch(
                "SELECT external_id FROM sluice.items WHERE run_id = $1 AND seq < 0"
                " AND status = 'pending' AND retry_at > now()",
                run.id,
            )
            return {r["external_id"] for r in rows}

        deadline = time.monotonic() + 120
        while len(in_retry := await waiting()) < 5:
            assert time.monotonic() < deadline, f"no items in retry:\n{stack.logs()}"
            await asyncio.sleep(0.05)
        for worker in stack.workers:
            worker.kill()
        killed_at = time.time()
        completed = {
            r["external_id"]
            for r in await db.fetch(
                "SELECT external_id FROM sluice.items WHERE run_id = $1 AND status = 'completed'",
                run.id,
            )
        }
        assert completed, "nothing completed before the kill"
        for worker in stack.workers:
            worker.start()
        done = await finish(client, run, stack, timeout=300)
        hits = api.snapshot()
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.items_discovered, done.items_completed, done.items_failed) == (n, n, 0)
    assert (done.created_rows, done.failed_rows) == (n, 0)
    got = {r["id"]: r["name"] for r in await db.fetch("SELECT id, name FROM t_api_retry_killed")}
    assert got == {i: api.item(i)["name"] for i in api.ids}
    # The items that waited for their retry at the kill were fetched again and landed; no item
    # completed before the kill was fetched again.
    states = await item_states(db, run.id)
    assert in_retry <= set(flaky)
    after = Counter(h.what for h in hits if h.kind == "detail" and h.time > killed_at)
    assert all(after[i] >= 1 and states[i]["status"] == "completed" for i in in_retry)
    again = set(after) & completed
    assert not again, f"{len(again)} completed items fetched again"
    # A failure is counted once per failed fetch: never more than the server gave.
    assert all(1 <= states[i]["failure_count"] <= k for i, k in flaky.items())
    # The retry batches that died with the workers were sent again once overdue: the run did
    # not wait to stall and be resumed.
    assert await db.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id) == 0


async def test_an_incremental_run_fetches_only_what_changed_since_the_last_completed_one(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    n, slug = 300, "t_api_incremental"
    api = FakeApi(n, port=stack.api_port)

    async def names() -> dict[str, str]:
        return {r["id"]: r["name"] for r in await db.fetch(f"SELECT id, name FROM {slug}")}

    async def run_fetching(**options: Any) -> tuple[Run, set[str]]:
        """A run to its end, and the items whose detail it fetched."""
        since = len(api.snapshot())
        run = await client.trigger(slug, {}, options=run_options(**options))
        done = await finish(client, run, stack)
        fetched = [h.what for h in api.snapshot()[since:] if h.kind == "detail"]
        assert len(fetched) == len(set(fetched)), "an item was fetched twice"
        return done, set(fetched)

    with api:
        first, fetched = await run_fetching()
        assert first.status is RunStatus.COMPLETED, first.error
        assert (first.items_discovered, first.created_rows, len(fetched)) == (n, n, n)
        newest = api.item(api.ids[-1])["updated_at"]
        assert (first.cursor_from, first.cursor_reached) == (None, newest)

        changed = api.ids[7::30]
        api.change(changed)
        second, fetched = await run_fetching()
        assert second.status is RunStatus.COMPLETED, second.error
        assert fetched == set(changed)
        assert (second.items_discovered, second.updated_rows, second.created_rows) == (10, 10, 0)
        assert second.cursor_from == newest
        assert second.cursor_reached == api.item(changed[-1])["updated_at"] > newest
        assert await names() == {i: api.item(i)["name"] for i in api.ids}
        assert all(api.item(i)["name"].endswith(" v2") for i in changed)

        # Nothing changed since: nothing listed, nothing fetched, the cursor stays.
        idle, fetched = await run_fetching()
        assert (idle.status, idle.items_discovered, fetched) == (RunStatus.COMPLETED, 0, set())
        assert (idle.cursor_from, idle.cursor_reached) == (second.cursor_reached,) * 2

        # A cancelled run does not move the cursor, even though it listed the new changes.
        later = api.ids[3:8]
        api.change(later)
        api.latency = 5.0  # the details outlast the cancel
        before = len(api.snapshot())
        cancelled = await client.trigger(slug, {})
        deadline = time.monotonic() + 60
        while (await client.get_run(cancelled.id)).cursor_reached is None:
            assert time.monotonic() < deadline, f"the listing did not end:\n{stack.logs()}"
            await asyncio.sleep(0.1)
        # Cancel once every detail is asked for: one asked for after the cancel (its page was
        # taken just before it) would land among the next run's.
        while set(later) - {h.what for h in api.snapshot()[before:] if h.kind == "detail"}:
            assert time.monotonic() < deadline, f"the details were not asked for:\n{stack.logs()}"
            await asyncio.sleep(0.05)
        await client.cancel(cancelled.id)
        cancelled = await finish(client, cancelled, stack)
        assert cancelled.status is RunStatus.CANCELLED
        assert cancelled.cursor_reached == api.item(later[-1])["updated_at"]
        api.latency = 0.0
        resumed, fetched = await run_fetching()
        assert resumed.cursor_from == second.cursor_reached
        assert fetched == set(later) and resumed.status is RunStatus.COMPLETED

        # --full lists everything again, whatever the cursor says.
        full, fetched = await run_fetching(full=True)
        assert full.status is RunStatus.COMPLETED, full.error
        assert (full.items_discovered, full.unchanged_rows, len(fetched)) == (n, n, n)
        assert (full.cursor_from, full.cursor_reached) == (None, resumed.cursor_reached)
    assert await names() == {i: api.item(i)["name"] for i in api.ids}


# ---------------------------------------------------------------- schedules


async def test_a_schedule_fires_once_per_time_across_two_workers(
    client: Client, stack: Stack, db: asyncpg.Connection, files_server: Any
) -> None:
    from sluice.agents.schedule import set_paused

    assert all(w.alive for w in stack.workers)
    await set_paused(await client.deps(), "t_sched", False)
    try:
        await asyncio.sleep(9)
    finally:
        await set_paused(await client.deps(), "t_sched", True)
    # The last run (3 s per fetch) finishes; on a loaded machine that can take a while longer.
    deadline = time.monotonic() + 60
    while await db.fetchval(
        "SELECT count(*) FROM sluice.runs WHERE importer = 't_sched'"
        " AND status NOT IN ('completed', 'failed', 'cancelled')"
    ):
        assert time.monotonic() < deadline, "a scheduled run did not finish within a minute"
        await asyncio.sleep(0.5)
    fires = await db.fetch(
        "SELECT fire_time, run_id, outcome FROM sluice.schedule_fires WHERE importer = 't_sched'"
        " ORDER BY fire_time"
    )
    runs = await db.fetch(
        "SELECT id, options->>'scheduled_for' AS at, started_at, completed_at, status"
        " FROM sluice.runs WHERE importer = 't_sched' ORDER BY queued_at"
    )
    started = [f for f in fires if f["outcome"] == "started"]
    skipped = [f for f in fires if f["outcome"].startswith("skipped")]
    assert len(started) >= 2 and skipped, fires
    # One run per started time, none for a skipped one, and never two at once.
    assert len(runs) == len(started)
    assert sorted(r["id"] for r in runs) == sorted(f["run_id"] for f in started)
    assert len({r["at"] for r in runs}) == len(runs)
    spans = sorted((r["started_at"], r["completed_at"]) for r in runs if r["started_at"])
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert end is not None and end <= begin, spans
    assert all(r["status"] == "completed" for r in runs), runs


def _unused(worker: Worker) -> None:  # keep the import honest for type checkers
    del worker


# ---------------------------------------------------------------- the input topic contract


async def test_any_producer_starts_an_import_with_one_raw_message(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    """No Sluice code on the producing side: plain JSON on sluice.triggers, as kcat would."""
    import uuid

    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from sluice.schemas.events import TriggerRequested
    from tests.conftest import TOPICS

    (stack.files / "raw.csv").write_text(CSV)
    request_id = uuid.uuid4().hex
    raw = orjson.dumps(
        {"importer": "t_fs", "params": {"path": "raw.csv"}, "request_id": request_id}
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.triggers, raw)
        await producer.send_and_wait(TOPICS.triggers, raw)  # produced twice: one run
        await producer.send_and_wait(TOPICS.triggers, b'{"importer": "no_such_importer"}')
    finally:
        await producer.stop()
    run_id = TriggerRequested(importer="t_fs", request_id=request_id).run_id_for_request()
    deadline = time.monotonic() + 60
    while (run := (await client.deps()).runs) and (found := await run.get(run_id)) is None:
        assert time.monotonic() < deadline, "no run was created for the produced trigger"
        await asyncio.sleep(0.2)
    done = await finish(client, found, stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.source == "filesystem" and done.requested_by == "kafka"
    assert done.created_rows + done.updated_rows + done.unchanged_rows == 3
    await asyncio.sleep(1)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM sluice.runs WHERE options->'params'->>'path' = 'raw.csv'"
        )
        == 1
    )
    consumer = AIOKafkaConsumer(
        TOPICS.deadletter, bootstrap_servers=stack.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        reasons = []
        deadline = time.monotonic() + 30
        while not any("no_such_importer" in r for r in reasons):
            assert time.monotonic() < deadline, reasons
            for records in (await consumer.getmany(timeout_ms=500)).values():
                reasons.extend(orjson.loads(r.value)["reason"] for r in records)
    finally:
        await consumer.stop()


async def test_a_raw_message_on_the_requests_topic_starts_an_import(
    client: Client, stack: Stack
) -> None:
    """The requests topic takes the same run-less start message (no stored file): a producer
    needs to know one topic, not which of two."""
    import uuid

    import orjson
    from aiokafka import AIOKafkaProducer

    from sluice.schemas.events import TriggerRequested
    from tests.conftest import TOPICS

    (stack.files / "raw-req.csv").write_text(CSV)
    request_id = uuid.uuid4().hex
    raw = {"importer": "t_fs", "params": {"path": "raw-req.csv"}, "request_id": request_id}
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.requests, orjson.dumps(raw))
    finally:
        await producer.stop()
    run_id = TriggerRequested(importer="t_fs", request_id=request_id).run_id_for_request()
    runs = (await client.deps()).runs
    deadline = time.monotonic() + 60
    while (found := await runs.get(run_id)) is None:
        assert time.monotonic() < deadline, "no run was created for the produced request"
        await asyncio.sleep(0.2)
    done = await finish(client, found, stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.requested_by == "kafka" and done.provenance is not None
    assert done.provenance["file"]["name"] == "raw-req.csv"


async def test_link_header_pages_are_followed_and_one_on_another_host_fails_the_run(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    with FakeApi(120, port=stack.api_port, page_style="link_header") as api:
        run = await client.trigger("t_api_linked", {})
        done = await finish(client, run, stack)
        pages = api.served_pages()
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.items_discovered, done.items_completed) == (120, 120)
    assert pages == ["0", "25", "50", "75", "100"]
    assert await db.fetchval("SELECT count(*) FROM t_api_linked") == 120

    elsewhere = f"http://localhost:{stack.api_port}"
    with FakeApi(120, port=stack.api_port, page_style="link_header", next_base=elsewhere) as api:
        run = await client.trigger("t_api_linked", {})
        done = await finish(client, run, stack)
        pages = api.served_pages()
    assert done.status is RunStatus.FAILED
    assert done.error == (
        'api source: GET /items: the next page\'s URL in its Link: rel="next" header is '
        f"{elsewhere}/items?offset=25&limit=25, on {elsewhere}, not on the source's own host "
        f"http://127.0.0.1:{stack.api_port}; the listing was stopped there. If the API really "
        "pages through another host, make that host the importer's ApiSource.base_url"
    )
    assert pages == ["0"]
