"""Abusive HTTP clients against a real `sluice api` process (its own, with small limits) on the
real stack: oversized and mislabelled uploads, path-like file names, missing and wrong tokens,
compression bombs, and a request flood that the per-token rate limit answers with 429."""

from __future__ import annotations

import gzip
import math
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from sluice.service import Client
from tests.conftest import ROOT, Stack, api_process
from tests.support.http import assert_error

pytestmark = [pytest.mark.hostile, pytest.mark.stack]

LIMIT = 2**20  # SLUICE_API_MAX_UPLOAD_BYTES of this API process
RATE, BURST = 5, 10  # SLUICE_API_RATE_LIMIT, SLUICE_API_RATE_BURST
# One token per test, so one test's flood does not slow another down.
FLOOD, CALM, UPLOADS = (f"hostile-{name}-{uuid.uuid4().hex}" for name in ("flood", "calm", "up"))
GOOD = b"id,name,price,qty,day,version\n1,a,1.00,1,2024-01-01,1\n2,b,2.00,2,2024-01-02,1\n"


@pytest.fixture(scope="module")
def api(stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("hostile-api") / "api.log"
    with api_process(
        stack,
        log,
        SLUICE_API_TOKEN=FLOOD,
        SLUICE_API_TOKENS=f"{CALM},{UPLOADS}",
        SLUICE_API_MAX_UPLOAD_BYTES=str(LIMIT),
        SLUICE_API_RATE_LIMIT=str(RATE),
        SLUICE_API_RATE_BURST=str(BURST),
    ) as url:
        yield url


def session(api: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=api, headers=headers, timeout=90)


async def stored(db: asyncpg.Connection) -> tuple[int, int]:
    """Files and runs in the database: a refused request adds neither."""
    files = await db.fetchval("SELECT count(*) FROM sluice.files")
    runs = await db.fetchval("SELECT count(*) FROM sluice.runs")
    return files, runs


def upload(
    http: httpx.Client, body: bytes, *, name: str = "rows.csv", kind: str = "text/csv"
) -> httpx.Response:
    return http.post(
        "/api/v1/imports/t_api/upload",
        files={"file": (name, body, kind)},
        data={"dry_run": "true"},  # the shared t_api table is left alone
        params={"wait": "true"},
    )


async def test_missing_and_wrong_tokens_store_nothing(api: str, db: asyncpg.Connection) -> None:
    before = await stored(db)
    with session(api, None) as anon:
        missing = upload(anon, GOOD)
        assert_error(missing, 401, "unauthorized", "missing API token: send the header")
        assert missing.headers["www-authenticate"] == "Bearer"
    with session(api, "not-a-token") as wrong:
        assert_error(upload(wrong, GOOD), 401, "unauthorized", "wrong API token: send the header")
        assert_error(wrong.get("/api/v1/runs"), 401, "unauthorized", "wrong API token")
    assert await stored(db) == before


async def test_uploads_over_the_size_limit(api: str, db: asyncpg.Connection) -> None:
    before = await stored(db)
    big = b"id,name\n" + b"".join(b"%d,%s\n" % (i, b"x" * 200) for i in range(8000))
    assert len(big) > LIMIT + 65536
    with session(api, UPLOADS) as http:
        # Declared with Content-Length: refused before the body is read.
        assert_error(
            upload(http, big),
            413,
            "too_large",
            "bytes; the limit is 1048576 bytes (SLUICE_API_MAX_UPLOAD_BYTES): split the file",
        )

        # Chunked, without a length: stopped while it streams in.
        boundary = uuid.uuid4().hex

        def body() -> Iterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="big.csv"\r\nContent-Type: text/csv\r\n\r\n'
            ).encode()
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]
            yield f"\r\n--{boundary}--\r\n".encode()

        chunked = http.post(
            "/api/v1/imports/t_api/upload",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert_error(
            chunked,
            413,
            "too_large",
            "the upload is over the limit of 1048576 bytes (SLUICE_API_MAX_UPLOAD_BYTES)",
        )
    assert await stored(db) == before


async def test_wrong_content_types(api: str, db: asyncpg.Connection) -> None:
    before = await stored(db)
    with session(api, UPLOADS) as http:
        as_json = http.post("/api/v1/imports/t_api/upload", json={"rows": []})
        assert_error(
            as_json, 415, "unsupported_media_type", "multipart/form-data with a field 'file'"
        )
        raw = http.post(
            "/api/v1/imports/t_api/upload", content=GOOD, headers={"Content-Type": "text/csv"}
        )
        assert_error(raw, 415, "unsupported_media_type", "(got 'text/csv')")
        png = upload(http, b"\x89PNG\r\n\x1a\n" + bytes(100), name="cat.png", kind="image/png")
        assert_error(
            png,
            415,
            "unsupported_media_type",
            "the file is declared as 'image/png', which is not a format Sluice imports: upload",
        )
        docx = upload(
            http,
            b"PK\x03\x04" + bytes(100),
            name="letter.docx",
            kind="application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        )
        assert_error(docx, 415, "unsupported_media_type", "which is not a format Sluice imports")
    assert await stored(db) == before
    # A binary file declared as something harmless is judged by its bytes: the run fails with
    # the reason, nothing is written.
    with session(api, UPLOADS) as http:
        disguised = upload(http, b"\x89PNG\r\n\x1a\n" + bytes(100), kind="text/csv")
    assert disguised.status_code == 200, disguised.text
    run = disguised.json()
    assert run["status"] == "failed" and "not text in a supported encoding" in run["error"]
    assert run["processed_rows"] == 0


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("../../{u}/etc/passwd", "passwd"),
        ("..\\..\\{u}\\evil.csv", "evil.csv"),
        ("a\\b-{u}.csv", "b-{u}.csv"),
        ("/{u}/abs.csv", "abs.csv"),
        ("..", "upload"),
    ],
)
async def test_file_names_with_path_separators_are_only_labels(
    api: str, db: asyncpg.Connection, sent: str, kept: str
) -> None:
    u = uuid.uuid4().hex
    sent, kept = sent.format(u=u), kept.format(u=u)
    with session(api, UPLOADS) as http:
        response = upload(http, GOOD, name=sent)
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "completed" and run["total_rows"] == 2, run
    assert run["file_name"] == kept
    name = await db.fetchval(
        "SELECT f.name FROM sluice.files f JOIN sluice.runs r ON r.file_id = f.id WHERE r.id = $1",
        uuid.UUID(run["id"]),
    )
    assert name == kept and "/" not in name and "\\" not in name
    # Nothing was written where the name points, from the API's working directory or the
    # temporary folder the upload was spooled in.
    for base in (ROOT, Path(tempfile.gettempdir())):
        target = (base / sent.replace("\\", "/").lstrip("/")).resolve()
        assert kept == "upload" or not target.exists(), target
    assert not list(Path(tempfile.gettempdir()).glob(f"*{u}*"))


async def test_control_characters_in_a_file_name_are_dropped(api: str) -> None:
    """A NUL in the name used to reach PostgreSQL (which cannot store it): a 500."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '.encode()
        + b'filename="ni\x00ce\x01\x7f.csv"\r\nContent-Type: text/csv\r\n\r\n'
        + GOOD
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with session(api, UPLOADS) as http:
        response = http.post(
            "/api/v1/imports/t_api/upload",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            params={"wait": "true"},
        )
    assert response.status_code in (200, 202), response.text
    assert response.json()["file_name"] == "nice.csv"


async def test_a_gzip_bomb_upload_fails_with_the_decompression_limit(api: str) -> None:
    member = gzip.compress(bytes(16 * 2**20), compresslevel=9)
    bomb = member * 64  # 1 GiB of zeros in about 1 MB
    assert len(bomb) < LIMIT
    with session(api, UPLOADS) as http:
        response = upload(http, bomb, name="bomb.csv.gz", kind="application/gzip")
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "failed", run
    assert "compression bomb" in run["error"] and "decompression limit" in run["error"]
    assert run["processed_rows"] == 0


def test_openapi_documents_429(api: str) -> None:
    with session(api, None) as anon:
        document = anon.get("/api/v1/openapi.json").json()
    upload_op = document["paths"]["/api/v1/imports/{slug}/upload"]["post"]
    assert "429" in upload_op["responses"]


def test_a_flood_is_rate_limited_per_token(api: str) -> None:
    """As fast as one client can: the burst is served, then 429 with Retry-After; another token
    is served meanwhile; health checks are never limited; after the wait, served again."""
    with session(api, FLOOD) as flood, session(api, CALM) as calm:
        statuses: list[int] = []
        limited: list[httpx.Response] = []
        started = time.monotonic()
        for _ in range(60):
            response = flood.get("/api/v1/runs", params={"limit": 1})
            statuses.append(response.status_code)
            if response.status_code == 429:
                limited.append(response)
        elapsed = time.monotonic() - started
        served = statuses.count(200)
        assert set(statuses) == {200, 429}, statuses
        assert statuses[:BURST] == [200] * BURST, statuses
        assert served <= BURST + math.ceil(RATE * elapsed) + 1, (served, elapsed)
        for response in limited:
            assert_error(
                response,
                429,
                "rate_limited",
                f"too many requests: the limit is {RATE} per second with bursts of {BURST} per"
                " API token (per address without one) (SLUICE_API_RATE_LIMIT,"
                " SLUICE_API_RATE_BURST). Retry after ",
            )
            assert int(response.headers["retry-after"]) >= 1

        # Other tokens and the health checks are unaffected.
        assert calm.get("/api/v1/runs", params={"limit": 1}).status_code == 200
        assert flood.get("/healthz").status_code == 200
        assert flood.get("/readyz").status_code == 200

        # After Retry-After, the flooding client is served again. The checks above took time in
        # which the bucket refilled a little, so flood again until the next 429.
        for _ in range(4 * BURST):
            last = flood.get("/api/v1/runs", params={"limit": 1})
            if last.status_code == 429:
                break
        assert last.status_code == 429
        time.sleep(int(last.headers["retry-after"]))
        assert flood.get("/api/v1/runs", params={"limit": 1}).status_code == 200


def test_requests_without_a_valid_token_are_limited_by_address(api: str) -> None:
    """Made-up tokens do not buy fresh buckets: they all count against the client's address."""
    with session(api, CALM) as calm, session(api, None) as guess:
        # Until the first 429: the bucket refills at RATE per second, so on a slow machine it
        # takes more than 2 * BURST requests; how many were answered before it is bounded.
        statuses: list[int] = []
        started = time.monotonic()
        for i in range(50 * BURST):
            headers = {"Authorization": f"Bearer made-up-{i}"}
            statuses.append(guess.get("/api/v1/runs", headers=headers).status_code)
            if statuses[-1] == 429:
                break
        elapsed = time.monotonic() - started
        assert statuses[:BURST] == [401] * BURST and statuses[-1] == 429, statuses
        assert set(statuses[:-1]) == {401}, statuses
        assert len(statuses) - 1 <= BURST + math.ceil(RATE * elapsed) + 1, (statuses, elapsed)
        assert calm.get("/api/v1/runs", params={"limit": 1}).status_code == 200
    time.sleep(BURST / RATE)  # leave the address's bucket full for whatever runs next


def multipart(disposition: str, data: bytes, boundary: str) -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        f"Content-Type: text/csv\r\n\r\n".encode()
        + data
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="dry_run"\r\n\r\n'
        f"true\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.parametrize(
    ("disposition", "kept"),
    [
        # RFC 5987 alone: used to be "Expected UploadFile, received: <class 'str'>".
        ("form-data; name=\"file\"; filename*=UTF-8''pr%C3%BCfung.csv", "prüfung.csv"),
        # Beside a plain ASCII fallback, the extended name wins (RFC 6266).
        (
            'form-data; name="file"; filename="pruefung.csv"; '
            "filename*=utf-8'de'Pr%C3%BCfung%20%E2%82%AC.csv",
            "Prüfung €.csv",
        ),
        ("form-data; name=\"file\"; filename*=ISO-8859-1''caf%E9.csv", "café.csv"),
    ],
)
async def test_an_rfc5987_file_name_is_a_file_with_the_decoded_name(
    api: str, db: asyncpg.Connection, disposition: str, kept: str
) -> None:
    boundary = uuid.uuid4().hex
    with session(api, UPLOADS) as http:
        response = http.post(
            "/api/v1/imports/t_api/upload",
            content=multipart(disposition, GOOD, boundary),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            params={"wait": "true"},
        )
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "completed" and run["total_rows"] == 2, run
    assert run["file_name"] == kept
    name = await db.fetchval(
        "SELECT f.name FROM sluice.files f JOIN sluice.runs r ON r.file_id = f.id WHERE r.id = $1",
        uuid.UUID(run["id"]),
    )
    assert name == kept
