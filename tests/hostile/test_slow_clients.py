"""Slow, stalled and broken HTTP clients against a real `sluice api` process (its own, with short
header and body timeouts), over raw sockets: a body that stops arriving, a request head that
never ends, uploads cut short. Each is answered (or, when the client is gone, logged) with the
reason, its connection is closed, nothing is stored, and other clients are served meanwhile."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
import pytest

from sluice.service import Client
from tests.conftest import Stack, api_process

pytestmark = [pytest.mark.hostile, pytest.mark.stack]

TOKEN = f"slow-{uuid.uuid4().hex}"
HEADER_TIMEOUT = 3.0  # SLUICE_API_HEADER_TIMEOUT of this API process
BODY_TIMEOUT = 5.0  # SLUICE_API_BODY_TIMEOUT
# How long a test waits for an answer: far past the timeouts, well under the 75 s for which
# the connections used to be held (and held on).
PATIENCE = 60.0
UPLOAD = "/api/v1/imports/t_api/upload"
CSV = b"id,name,price,qty,day,version\n1,a,1.00,1,2024-01-01,1\n2,b,2.00,2,2024-01-02,1\n"


@dataclass
class Api:
    url: str
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname and parts.port
        return parts.hostname, parts.port


@pytest.fixture(scope="module")
def api(stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    log = tmp_path_factory.mktemp("slow-api") / "api.log"
    with api_process(
        stack,
        log,
        SLUICE_API_TOKEN=TOKEN,
        SLUICE_API_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        SLUICE_API_BODY_TIMEOUT=str(BODY_TIMEOUT),
        SLUICE_API_RATE_LIMIT="0",
    ) as url:
        yield Api(url, log)


@dataclass
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it
    elapsed: float  # seconds from the call to the end of the connection

    def error(self) -> tuple[str, str]:
        payload = orjson.loads(self.body)
        assert set(payload) == {"error"}, payload
        return payload["error"]["code"], payload["error"]["message"]


def read_answer(
    sock: socket.socket, since: float, data: bytes = b"", patience: float = PATIENCE
) -> Answer:
    """Everything the server sends until it closes the connection (or `patience` runs out);
    `data`: what was read of it already."""
    sock.settimeout(0.5)
    closed = False
    while time.monotonic() - since < patience:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    elapsed = time.monotonic() - since
    sock.close()
    if not data:
        return Answer(None, {}, b"", closed, elapsed)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body, closed, elapsed)


def request_head(headers: dict[str, str], path: str = UPLOAD) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: sluice", f"Authorization: Bearer {TOKEN}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def multipart(boundary: str, data: bytes = CSV) -> bytes:
    """An upload of `data` as a dry run (the shared t_api table is left alone)."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="dry_run"\r\n\r\ntrue\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="rows.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def form_type(boundary: str) -> str:
    return f"multipart/form-data; boundary={boundary}"


async def stored(db: asyncpg.Connection) -> tuple[int, int]:
    files = await db.fetchval("SELECT count(*) FROM sluice.files")
    runs = await db.fetchval("SELECT count(*) FROM sluice.runs")
    return files, runs


def assert_closed_with(answer: Answer, status: int, code: str) -> str:
    assert answer.status == status, answer
    assert answer.headers.get("connection") == "close", answer.headers
    assert answer.closed, "the server left the connection open"
    got, message = answer.error()
    assert got == code, message
    return message


async def test_bodies_that_stop_arriving_are_cut_off_while_others_upload(
    api: Api, db: asyncpg.Connection
) -> None:
    """Twenty clients declare a longer body than they send: each is answered 408 after the body
    timeout and closed (they used to be held for at least 75 s); an upload meanwhile works."""
    before = await stored(db)
    boundary = uuid.uuid4().hex
    body = multipart(boundary)
    stalled = []
    for _ in range(20):
        sock = socket.create_connection(api.address)
        declared = len(body) + 100_000
        head = request_head({"Content-Type": form_type(boundary), "Content-Length": str(declared)})
        sock.sendall(head + body[:-20])
        stalled.append((sock, time.monotonic()))

    with httpx.Client(base_url=api.url, timeout=PATIENCE) as http:
        response = http.post(
            UPLOAD,
            headers={"Authorization": f"Bearer {TOKEN}"},
            files={"file": ("ok.csv", CSV, "text/csv")},
            data={"dry_run": "true"},
            params={"wait": "true"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"

    for sock, since in stalled:
        answer = read_answer(sock, since)
        message = assert_closed_with(answer, 408, "body_timeout")
        assert message == (
            f"the request body stopped arriving: no byte for {BODY_TIMEOUT:g} s "
            f"(SLUICE_API_BODY_TIMEOUT) after {len(body) - 20} of {len(body) + 100_000} bytes "
            f"read. Send the request again, without pausing in the middle"
        )
        # Cut off at the timeout, not before it (asyncio timers may fire a little early).
        assert BODY_TIMEOUT * 0.8 <= answer.elapsed < PATIENCE, answer.elapsed
    assert await stored(db) == (before[0] + 1, before[1] + 1)  # only the upload that worked


async def test_a_chunked_upload_that_stops_in_the_middle_is_cut_off(
    api: Api, db: asyncpg.Connection
) -> None:
    before = await stored(db)
    boundary = uuid.uuid4().hex
    part = multipart(boundary)[:150]
    sock = socket.create_connection(api.address)
    head = request_head({"Content-Type": form_type(boundary), "Transfer-Encoding": "chunked"})
    sock.sendall(head + b"%x\r\n" % len(part) + part + b"\r\n")  # and no last chunk
    since = time.monotonic()
    message = assert_closed_with(read_answer(sock, since), 408, "body_timeout")
    assert message.startswith(
        f"the request body stopped arriving: no byte for {BODY_TIMEOUT:g} s "
        f"(SLUICE_API_BODY_TIMEOUT) after {len(part)} bytes read"
    )
    assert await stored(db) == before


def test_a_request_head_that_never_ends_is_cut_off(api: Api) -> None:
    """A deadline for the whole head: sending it a byte at a time does not buy more time."""
    sock = socket.create_connection(api.address)
    since = time.monotonic()
    sock.settimeout(0.5)
    answer = None
    for byte in request_head({"Content-Type": form_type("x"), "Content-Length": "10"}):
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            first = sock.recv(65536)
        except TimeoutError:
            continue
        answer = read_answer(sock, since, first)
        break
    assert answer is not None, "the server waited for the head for as long as it came"
    message = assert_closed_with(answer, 408, "header_timeout")
    assert message == (
        f"the request line and headers did not all arrive within {HEADER_TIMEOUT:g} s "
        f"(SLUICE_API_HEADER_TIMEOUT): send the whole request head at once"
    )
    assert HEADER_TIMEOUT * 0.8 <= answer.elapsed < PATIENCE, answer.elapsed

    # A connection that sends nothing at all is closed at the same deadline, without a word.
    idle = socket.create_connection(api.address)
    quiet = read_answer(idle, time.monotonic())
    assert quiet.status is None and quiet.closed, quiet
    assert HEADER_TIMEOUT * 0.8 <= quiet.elapsed < PATIENCE, quiet.elapsed


async def test_an_upload_that_ends_early_is_refused_and_nothing_is_stored(
    api: Api, db: asyncpg.Connection
) -> None:
    before = await stored(db)
    boundary = uuid.uuid4().hex
    body = multipart(boundary)
    content = form_type(boundary)

    # The client stops before its Content-Length and closes its side, still listening.
    sock = socket.create_connection(api.address)
    sock.sendall(request_head({"Content-Type": content, "Content-Length": str(len(body))}))
    sock.sendall(body[:100])
    sock.shutdown(socket.SHUT_WR)
    message = assert_closed_with(read_answer(sock, time.monotonic()), 400, "incomplete_upload")
    assert message == (
        f"the upload ended before its declared length (Content-Length: {len(body)} bytes): the "
        f"client closed its side of the connection in the middle of the body. Send the whole "
        f"file again"
    )

    # The same in the middle of a chunked body.
    sock = socket.create_connection(api.address)
    sock.sendall(request_head({"Content-Type": content, "Transfer-Encoding": "chunked"}))
    sock.sendall(b"%x\r\n" % len(body) + body[:100])
    sock.shutdown(socket.SHUT_WR)
    message = assert_closed_with(read_answer(sock, time.monotonic()), 400, "incomplete_upload")
    assert message.startswith("the upload ended before its last chunk")

    # A body complete as HTTP sees it, whose multipart stops before its closing boundary: in
    # the file part's headers (this used to be 422 "body.file: Field required"), in the file
    # (which used to be imported, cut short), in the closing boundary; sent with a
    # Content-Length, or chunked with its last chunk.
    in_headers = body.index(b'name="file"') + 5
    in_file = body.index(CSV) + 10
    in_closing = body.index(b"\r\n--" + boundary.encode() + b"--") + 5
    for cut in (in_headers, in_file, in_closing):
        for chunked in (False, True):
            sock = socket.create_connection(api.address)
            if chunked:
                framing = {"Transfer-Encoding": "chunked"}
                payload = b"%x\r\n" % cut + body[:cut] + b"\r\n0\r\n\r\n"
            else:
                framing = {"Content-Length": str(cut)}
                payload = body[:cut]
            sock.sendall(request_head({"Content-Type": content, **framing}) + payload)
            answer = read_answer(sock, time.monotonic())
            message = assert_closed_with(answer, 400, "incomplete_upload")
            assert message == (
                f"the upload ended before its closing multipart boundary: the body stops after "
                f"{cut} bytes, so the file in it is cut short. Send the whole file again"
            ), (cut, chunked)

    # A client that goes away altogether cannot be answered: the refusal is logged.
    sock = socket.create_connection(api.address)
    sock.sendall(request_head({"Content-Type": content, "Content-Length": str(len(body))}))
    sock.sendall(body[:100])
    time.sleep(0.5)  # the server reads those bytes before the close
    sock.close()
    expected = (
        f"the upload ended before its declared length (100 of {len(body)} bytes read): the "
        f"client closed the connection. Send the whole file again"
    )
    deadline = time.monotonic() + PATIENCE
    while expected not in api.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert expected in api.log.read_text(), api.log.read_text()[-2000:]

    assert await stored(db) == before

    # The same connection rules leave a whole upload alone.
    with httpx.Client(base_url=api.url, timeout=PATIENCE) as http:
        response = http.post(
            UPLOAD,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content},
            content=body,
            params={"wait": "true"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
