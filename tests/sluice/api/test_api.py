"""The HTTP API: a real `sluice api` process on a real port, against the real stack."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from pydantic import SecretStr, ValidationError

from sluice.config import ApiSettings
from sluice.service import Client
from tests.conftest import Stack, api_process
from tests.support.http import assert_error
from tests.support.prometheus import scrape

TOKEN_HINT = "with a token from SLUICE_API_TOKEN (`sluice env` prints it)"

pytestmark = pytest.mark.stack

TOKEN = "test-token-" + uuid.uuid4().hex  # no name: runs started with it say "api"
CI, OPS = (f"test-{name}-{uuid.uuid4().hex}" for name in ("ci", "ops"))  # named ci and ops
LIMIT = 200_000  # bytes: the upload limit of this API process

GOOD = b"id,name,price,qty,day,version\n1,a,1.00,1,2024-01-01,1\n2,b,2.00,2,2024-01-02,1\n"
WITH_BAD = GOOD + b"3,c,notanumber,3,2024-01-03,1\n4,=HYPERLINK(1),4.00,x,2024-01-04,1\n"


@pytest.fixture(scope="module")
def api(stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with api_process(
        stack,
        tmp_path_factory.mktemp("api") / "api.log",
        SLUICE_API_TOKEN=TOKEN,
        SLUICE_API_TOKENS=f"ci:{CI},ops:{OPS}",
        SLUICE_API_MAX_UPLOAD_BYTES=str(LIMIT),
        SLUICE_API_WAIT_TIMEOUT="60",
        # The contract test sends requests as fast as it can; tests/hostile covers the limit.
        SLUICE_API_RATE_LIMIT="0",
    ) as url:
        yield url


@pytest.fixture
def http(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=90) as c:
        yield c


def upload(http: httpx.Client, slug: str, body: bytes, **params: str) -> httpx.Response:
    data = {form: params.pop(form) for form in ("dry_run", "fresh") if form in params} or None
    return http.post(
        f"/api/v1/imports/{slug}/upload",
        files={"file": ("rows.csv", body, "text/csv")},
        data=data,
        params=params,
    )


def test_tokens(api: str) -> None:
    with httpx.Client(base_url=api, timeout=30) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}  # public by default
        assert anon.get("/readyz").json() == {"status": "ready"}
        missing = anon.get("/api/v1/runs")
        assert_error(
            missing,
            401,
            "unauthorized",
            f"missing API token: send the header 'Authorization: Bearer <token>' {TOKEN_HINT}",
        )
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = anon.get("/api/v1/runs", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "wrong API token: send the header")
        # /metrics needs a token unless configured otherwise.
        assert_error(anon.get("/metrics"), 401, "unauthorized", "missing API token")
        assert_error(
            anon.post("/api/v1/imports/t_api/upload", files={"file": b"x"}),
            401,
            "unauthorized",
            "missing API token",
        )
        assert anon.get("/api/v1/openapi.json").status_code == 200


def as_token(api: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=90)


def test_a_run_records_the_name_of_the_token_that_started_it(
    api: str, http: httpx.Client, stack: Stack
) -> None:
    with as_token(api, CI) as ci, as_token(api, OPS) as ops:
        uploaded = upload(ci, "t_api", WITH_BAD, wait="true")
        assert uploaded.status_code == 200, uploaded.text
        parent = uploaded.json()
        assert parent["requested_by"] == "ci"
        retried = ops.post(f"/api/v1/runs/{parent['id']}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["requested_by"] == "ops"
        assert retried.json()["parent_run_id"] == parent["id"]

        (stack.files / "named-trigger.csv").write_bytes(GOOD)
        triggered = ops.post(
            "/api/v1/imports/t_fs/trigger", json={"path": "named-trigger.csv", "dry_run": True}
        )
        assert triggered.status_code == 202, triggered.text
        assert triggered.json()["requested_by"] == "ops"

        # A backfill's run is made by the worker that takes the request (it fails at once
        # here: no firehose consumer covers the DID).
        did = f"did:plc:named{uuid.uuid4().hex[:12]}"
        assert ci.post("/api/v1/backfill", json={"dids": [did]}).status_code == 202
        deadline = time.monotonic() + 120
        while True:
            runs = ci.get("/api/v1/runs", params={"importer": "atproto.backfill"}).json()
            mine = [r for r in runs["data"] if r["options"].get("did") == did]
            if mine:
                break
            assert time.monotonic() < deadline, "the workers made no run for the backfill"
            time.sleep(0.5)
        assert [r["requested_by"] for r in mine] == ["ci"]

    plain = upload(http, "t_api", GOOD)
    assert plain.status_code == 202 and plain.json()["requested_by"] == "api"


def test_token_settings_name_tokens_and_refuse_what_is_ambiguous() -> None:
    api = ApiSettings(
        token=SecretStr("plain-one"),
        tokens=SecretStr("ci:abc, ops:with:colon ,ci:rotated,plain-one"),
    )
    assert [(t.name, t.secret.get_secret_value()) for t in api.named_tokens()] == [
        ("api", "plain-one"),
        ("ci", "abc"),
        ("ops", "with:colon"),
        ("ci", "rotated"),
    ]
    assert api.all_tokens() == ["plain-one", "abc", "with:colon", "rotated"]
    assert "abc" not in repr(api.named_tokens())
    for bad, fix in (
        ("two words:s3cr3t-x", "name (before the ':')"),
        (":s3cr3t-x", "name (before the ':')"),
        ("ci:", "is empty"),
    ):
        with pytest.raises(ValidationError, match=r"SLUICE_API_TOKENS") as caught:
            ApiSettings(tokens=SecretStr(f"ok:1,{bad}"))
        assert fix in str(caught.value) and "s3cr3t-x" not in str(caught.value)
    with pytest.raises(ValidationError, match="two names") as caught:
        ApiSettings(token=SecretStr("s3cr3t-dup"), tokens=SecretStr("ci:s3cr3t-dup"))
    assert "s3cr3t-dup" not in str(caught.value)


def test_upload_wait_and_follow(http: httpx.Client, api: str) -> None:
    sent = upload(http, "t_api", GOOD)
    assert sent.status_code == 202 and sent.json()["status"] == "queued"
    done = upload(http, "t_api", WITH_BAD, wait="true")
    assert done.status_code == 200, done.text
    run = done.json()
    assert run["status"] == "completed_with_errors"
    assert (run["processed_rows"], run["failed_rows"]) == (4, 2)
    assert http.get(f"/api/v1/runs/{run['id']}").json()["id"] == run["id"]

    page = http.get(f"/api/v1/runs/{run['id']}/failed-rows", params={"limit": 1}).json()
    assert page["pagination"] == {"page": 1, "limit": 1, "total": 2, "totalPages": 2}
    assert page["data"][0]["row_number"] == 3 and "price" in page["data"][0]["reason"]
    second = http.get(f"/api/v1/runs/{run['id']}/failed-rows", params={"limit": 1, "page": 2})
    assert second.json()["data"][0]["row_number"] == 4
    exported = http.get(f"/api/v1/runs/{run['id']}/failed-rows", params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["row_number"] for r in table] == ["3", "4"]
    assert table[1]["name"] == "'=HYPERLINK(1)"

    # Server-Sent Events: the run's whole timeline, ending with its final event.
    with http.stream("GET", f"/api/v1/runs/{run['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    events = [
        orjson.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data:")
    ]
    assert events[0]["type"] == "run.started" and events[-1]["type"] == "run.completed"
    assert all(e["run_id"] == run["id"] for e in events)
    ids = [line.split(": ")[1] for line in text.splitlines() if line.startswith("id:")]
    with http.stream(
        "GET", f"/api/v1/runs/{run['id']}/events", headers={"Last-Event-ID": ids[-2]}
    ) as resumed:
        rest = "".join(resumed.iter_text())
    assert rest.count("data:") == 1 and "run.completed" in rest

    retried = http.post(f"/api/v1/runs/{run['id']}/retry")
    assert retried.status_code == 202 and retried.json()["parent_run_id"] == run["id"]
    first = sent.json()["id"]
    for _ in range(600):  # the first upload was not waited for: let it finish
        if http.get(f"/api/v1/runs/{first}").json()["status"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert_error(
        http.post(f"/api/v1/runs/{first}/retry"), 409, "conflict", "has no rejected rows to retry"
    )
    assert_error(
        http.post(f"/api/v1/runs/{first}/cancel"),
        409,
        "conflict",
        "is completed; only queued or running runs can be cancelled",
    )


def test_runs_listing(http: httpx.Client) -> None:
    for _ in range(3):
        assert upload(http, "t_api", GOOD, dry_run="true").status_code == 202
    listed = http.get("/api/v1/runs", params={"importer": "t_api", "limit": 2}).json()
    assert set(listed) == {"data", "pagination"}
    p = listed["pagination"]
    assert p["limit"] == 2 and p["total"] >= 3 and p["totalPages"] == -(-p["total"] // 2)
    assert len(listed["data"]) == 2
    times = [r["queued_at"] for r in listed["data"]]
    assert times == sorted(times, reverse=True)
    done = http.get("/api/v1/runs", params={"status": "completed", "limit": 500}).json()
    assert all(r["status"] == "completed" for r in done["data"])
    recent = http.get("/api/v1/runs/recent", params={"limit": 3}).json()["data"]
    assert len(recent) == 3
    several = http.get("/api/v1/runs", params={"status": "completed,failed", "limit": 500}).json()
    assert {r["status"] for r in several["data"]} <= {"completed", "failed"}
    assert several["pagination"]["total"] >= done["pagination"]["total"]
    wrong = assert_error(
        http.get("/api/v1/runs", params={"status": "failed,zzz"}),
        422,
        "invalid_parameters",
        "query.status: String should match pattern",
    )
    assert "completed_with_errors" in wrong  # names the valid ones
    assert_error(
        http.get("/api/v1/runs", params={"page": 0}),
        422,
        "invalid_parameters",
        "query.page: Input should be greater than or equal to 1",
    )


def test_errors(http: httpx.Client, tmp_path: Path) -> None:
    unknown = upload(http, "no_such_importer", GOOD)
    assert_error(
        unknown, 404, "not_found", "no importer 'no_such_importer'; registered importers: "
    )
    assert_error(
        http.get(f"/api/v1/runs/{uuid.uuid4()}"), 404, "not_found", "; list runs with `sluice runs`"
    )
    assert_error(
        http.get("/api/v1/runs/not-a-uuid"),
        422,
        "invalid_parameters",
        "path.run_id: Input should be a valid UUID",
    )
    assert_error(http.get("/api/v1/nothing-here"), 404, "not_found", "Not Found")
    big = b"id,name\n" + b"".join(b"%d,%s\n" % (i, b"x" * 100) for i in range(5000))
    assert len(big) > LIMIT
    assert_error(
        upload(http, "t_api", big),
        413,
        "too_large",
        "bytes (SLUICE_API_MAX_UPLOAD_BYTES): split the file or raise the limit",
    )
    as_json = http.post("/api/v1/imports/t_api/upload", json={"rows": []})
    assert_error(
        as_json,
        415,
        "unsupported_media_type",
        "send the file as multipart/form-data with a field 'file' (got 'application/json')",
    )
    raw = http.post(
        "/api/v1/imports/t_api/upload", content=GOOD, headers={"Content-Type": "text/csv"}
    )
    assert_error(raw, 415, "unsupported_media_type", "(got 'text/csv')")
    assert_error(
        http.post("/api/v1/imports/t_api/trigger", json={}),
        422,
        "no_pull_source",
        "importer 't_api' has no pull source (it accepts: upload, file); upload a file to",
    )
    empty = upload(http, "t_api", b"", wait="true")
    assert empty.status_code == 200 and empty.json()["status"] == "failed"
    assert "empty" in empty.json()["error"]


def test_trigger(http: httpx.Client, stack: Stack) -> None:
    (stack.files / "api-trigger.csv").write_bytes(GOOD)
    queued = http.post("/api/v1/imports/t_fs/trigger", json={"path": "api-trigger.csv"})
    assert queued.status_code == 202, queued.text
    assert queued.json()["source"] == "filesystem"
    done = http.post(
        "/api/v1/imports/t_fs/trigger",
        params={"wait": "true"},
        json={"path": "api-trigger.csv", "dry_run": True},
    )
    assert done.status_code == 200, done.text
    run = done.json()
    assert run["status"] == "completed" and run["dry_run"] and run["total_rows"] == 2
    assert run["source_location"].endswith("api-trigger.csv")
    refused = http.post(
        "/api/v1/imports/t_url/trigger", json={"url": "http://169.254.169.254/latest/"}
    )
    assert_error(
        refused,
        422,
        "source_refused",
        "refused 169.254.169.254: SLUICE_URL_ALLOW_HOSTS is set and names neither; add the host",
    )
    assert_error(
        http.post("/api/v1/imports/nope/trigger", json={}), 404, "not_found", "no importer 'nope'"
    )
    assert_error(
        http.post("/api/v1/imports/t_fs/trigger", json=[1, 2]),
        422,
        "invalid_parameters",
        "body: Input should be a valid dictionary",
    )
    outside = http.post(
        "/api/v1/imports/t_fs/trigger", params={"wait": "true"}, json={"path": "../../x.csv"}
    )
    assert outside.status_code == 200 and outside.json()["status"] == "failed"
    assert "SLUICE_FILE_ROOTS" in outside.json()["error"]


def test_api_source_items_and_schedules(http: httpx.Client, stack: Stack) -> None:
    from tests.support.servers.paginated_api import FakeApi

    with FakeApi(12, port=stack.api_port, broken={"item-00005"}):
        done = http.post("/api/v1/imports/t_api_small/trigger", params={"wait": "true"})
    assert done.status_code == 200, done.text
    run = done.json()
    assert run["status"] == "completed_with_errors" and run["items_failed"] == 1
    for key in ("rate_limit_hits", "rate_limit_sleeps", "total_sleep_seconds"):
        assert key in run
    page = http.get(f"/api/v1/runs/{run['id']}/items", params={"status": "failed"}).json()
    assert page["counts"] == {"pending": 0, "processing": 0, "completed": 11, "failed": 1}
    assert page["pagination"]["total"] == 1
    (item,) = page["data"]
    assert item["external_id"] == "item-00005" and item["failure_count"] == 4
    assert "HTTP 500" in item["last_error"] and item["metadata"]["id"] == "item-00005"
    assert_error(
        http.get(f"/api/v1/runs/{uuid.uuid4()}/items"), 404, "not_found", "; list runs with"
    )
    schedules = {s["importer"]: s for s in http.get("/api/v1/schedules").json()["data"]}
    assert schedules["t_sched"]["paused"] is True


def test_metrics(http: httpx.Client, api: str) -> None:
    """The API's own metrics: runs queued and running (a count per scrape), the outbox, its
    requests. The pipeline's counters are the workers' (tests/sluice/test_metrics.py)."""
    assert upload(http, "t_api", GOOD, wait="true").status_code == 200
    samples = scrape(f"{api}/metrics", headers=dict(http.headers))
    assert samples.types["sluice_runs_active"] == "gauge"
    assert samples.has("sluice_runs_active", status="queued")
    assert samples.has("sluice_runs_active", status="running")
    assert samples.total("sluice_outbox_pending") >= 0
    route = "/api/v1/imports/{slug}/upload"
    assert samples.total("sluice_api_requests_total", method="POST", route=route, status="200") >= 1
    # Nothing derived from the runs table, and no consumer opened per scrape.
    assert not samples.has("sluice_rows_total") and not samples.has("sluice_consumer_lag")


# ----------------------------------------------------------------------------- schemathesis


def test_openapi_contract(api: str) -> None:
    """Generated requests against every operation of the OpenAPI document: no 5xx, and every
    answer fits the document (status, content type, body schema)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{api}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:

        @settings(
            max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            )

        check()


def test_a_fresh_upload_deletes_the_rows_it_did_not_contain(http: httpx.Client, api: str) -> None:
    table = "t_fresh_scoped"  # refreshes within the suppliers the file holds: only "api" here
    first = b"id,name,supplier,price\n9001,a,api,1.00\n9002,b,api,1.00\n9003,c,api,1.00\n"
    assert upload(http, table, first, wait="true").json()["status"] == "completed"
    second = b"id,name,supplier,price\n9001,a,api,1.00\n"
    done = upload(http, table, second, wait="true", fresh="true").json()
    assert done["status"] == "completed", done
    assert done["deleted_rows"] == 2


SHOP = (
    b"Product Code,Name,Price,Added\n"
    b"A-1,Widget,2.50,2026-01-05\n"
    b"B-2,Gadget,10,2026-02-11\n"
    b"C-3,Doohickey,0.75,2026-03-17\n"
)


async def test_an_adhoc_upload_lands_the_table_the_cli_lands(
    http: httpx.Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """POST /api/v1/imports/adhoc/upload does what `sluice import --into --key` does; both
    normalise the table's name as column names are."""
    suffix = uuid.uuid4().hex[:6]
    sent = http.post(
        "/api/v1/imports/adhoc/upload",
        files={"file": ("shop.csv", SHOP, "text/csv")},
        data={"table": f"Shop Items {suffix}", "key": "Product Code", "schema": "public"}
        | {"null_marker": ["-"]},
        params={"wait": "true"},
    )
    assert sent.status_code == 200, sent.text
    run = sent.json()
    assert run["status"] == "completed" and run["created_rows"] == 3
    assert run["options"]["table"] == f"shop_items_{suffix}"
    assert run["options"]["null_markers"] == ["-"]
    path = tmp_path / "shop.csv"
    path.write_bytes(SHOP)
    command = [sys.executable, "-m", "sluice", "import", str(path), "--into"]
    cli = subprocess.run(
        [*command, f"Shop Items CLI {suffix}", "--key", "Product Code", "--wait", "--json"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["created_rows"] == 3

    async def shape(table: str) -> tuple[list[tuple[str, str]], list[tuple[object, ...]]]:
        columns = await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = $1 ORDER BY ordinal_position",
            table,
        )
        rows = await db.fetch(f"SELECT * FROM {table} ORDER BY product_code")
        return [tuple(c) for c in columns], [tuple(r) for r in rows]

    assert await shape(f"shop_items_{suffix}") == await shape(f"shop_items_cli_{suffix}")
    columns, rows = await shape(f"shop_items_{suffix}")
    assert dict(columns)["price"] == "numeric" and dict(columns)["added"] == "date"
    assert [r[0] for r in rows] == ["A-1", "B-2", "C-3"]

    # Without a key (or a table): 422 with what to give, and no run.
    before = http.get("/api/v1/runs", params={"importer": "adhoc"}).json()["pagination"]["total"]
    keyless = http.post(
        "/api/v1/imports/adhoc/upload",
        files={"file": ("shop.csv", SHOP, "text/csv")},
        data={"table": "shop"},
    )
    assert_error(keyless, 422, "invalid_parameters", "body.key: Field required")
    after = http.get("/api/v1/runs", params={"importer": "adhoc"}).json()["pagination"]["total"]
    assert after == before


async def test_the_upload_forms_take_date_formats_and_decimal_commas(
    http: httpx.Client, db: asyncpg.Connection
) -> None:
    """``date_format`` (repeatable) and ``decimal_comma`` in an importer's upload and in an
    ad-hoc one; a format without a day fails its run with what to fix."""
    suffix = uuid.uuid4().hex[:6]
    prices = f"sku;price;since\nU{suffix}-1;1.024,5;25.12.2024\nU{suffix}-2;2,5;01/12/2024\n"
    sent = http.post(
        "/api/v1/imports/t_euro_plain/upload",
        files={"file": ("prices.csv", prices.encode(), "text/csv")},
        data={"date_format": ["%d.%m.%Y", "%d/%m/%Y"], "decimal_comma": "true"},
        params={"wait": "true"},
    )
    assert sent.status_code == 200, sent.text
    run = sent.json()
    assert (run["status"], run["created_rows"], run["failed_rows"]) == ("completed", 2, 0)
    assert run["options"]["date_formats"] == ["%d.%m.%Y", "%d/%m/%Y"]
    got = await db.fetch(
        "SELECT price::text, since::text FROM t_euro_plain WHERE sku LIKE $1 ORDER BY sku",
        f"U{suffix}-%",
    )
    assert [tuple(r) for r in got] == [("1024.5", "2024-12-25"), ("2.5", "2024-12-01")]

    # Ambiguous dates (every day 12 or less): the form's format makes them dates.
    adhoc = http.post(
        "/api/v1/imports/adhoc/upload",
        files={"file": ("a.csv", b"id,day\n1,03/04/2024\n2,05/06/2024\n", "text/csv")},
        data={"table": f"euro_form_{suffix}", "key": "id", "date_format": "%m/%d/%Y"},
        params={"wait": "true"},
    )
    assert adhoc.status_code == 200, adhoc.text
    assert adhoc.json()["provenance"]["readings"] == [
        {
            "column": "day",
            "by": "run",
            "date_format": ["%m/%d/%Y"],
            "why": "the run's date format (--date-format)",
        }
    ]
    days = await db.fetch(f"SELECT day::text FROM euro_form_{suffix} ORDER BY id")
    assert [r[0] for r in days] == ["2024-03-04", "2024-05-06"]

    # A format that names no day, month and year: the run fails and says so (every request
    # the OpenAPI document allows is taken; the format is the run's to judge).
    refused = http.post(
        "/api/v1/imports/t_euro_plain/upload",
        files={"file": ("prices.csv", prices.encode(), "text/csv")},
        data={"date_format": "%H:%M"},
        params={"wait": "true"},
    )
    assert refused.status_code == 200, refused.text
    assert refused.json()["status"] == "failed"
    assert "names the day, month and year" in refused.json()["error"]
