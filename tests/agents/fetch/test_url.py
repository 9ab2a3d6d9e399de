"""The URL source against a real local HTTP server (stdlib, in a thread): redirects, the SSRF
guard, size limits, status codes, secrets kept out of errors, file names."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sluice.agents.fetch.guard import check_address, check_url
from sluice.agents.fetch.url import CHUNK_BYTES, fetch_url, url_request_parts
from sluice.config import UrlSettings
from sluice.errors import SourceError, SourceUnavailable
from sluice.schemas.sources import UrlSource

FILE = random.Random(7).randbytes(2 * CHUNK_BYTES + 12345)
BIG = 64 * 2**20  # far more than the socket buffers between server and client can hold
SECRET = "s3cr3t-token-value"
LOCAL = UrlSettings(allow_hosts="127.0.0.1", read_timeout=5.0, connect_timeout=5.0)

Route = Callable[["Handler"], None]


@dataclass
class State:
    """What the server saw, for the tests to check."""

    hits: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    sent: int = 0
    aborted: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes = routes
        self.state = State()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.state.hits.append((path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def body(self, data: bytes, content_type: str = "application/octet-stream", **extra: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def status(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def stream_big(h: Handler) -> None:
    """BIG bytes without a Content-Length; notes whether the client hung up first."""
    state = h.server.state
    h.close_connection = True
    h.send_response(200)
    h.end_headers()
    block = b"x" * 65536
    try:
        while state.sent < BIG:
            h.wfile.write(block)
            state.sent += len(block)
    except OSError:
        state.aborted = True
    finally:
        state.done.set()


def declare_big(h: Handler) -> None:
    """Announce 10 MiB, then send nothing until the test is over."""
    h.close_connection = True
    h.send_response(200)
    h.send_header("Content-Length", str(10 * 2**20))
    h.end_headers()
    h.wfile.flush()
    h.server.state.release.wait(10)


def stall(h: Handler) -> None:
    h.close_connection = True
    h.send_response(200)
    h.end_headers()
    h.wfile.write(b"first bytes")
    h.server.state.release.wait(10)


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Route]], Server]]:
    servers: list[Server] = []

    def start(routes: dict[str, Route]) -> Server:
        server = Server(routes)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.state.release.set()
        server.shutdown()
        server.server_close()


def resolver_for(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


async def fetch_all(url: str, policy: UrlSettings = LOCAL, **kwargs) -> tuple[bytes, list[int]]:
    async with fetch_url(url, policy, **kwargs) as fetched:
        sizes = []
        data = bytearray()
        async for chunk in fetched.chunks:
            sizes.append(len(chunk))
            data += chunk
    return bytes(data), sizes


def chain_text(exc: BaseException) -> str:
    """The text of an exception and of everything it was raised from or during."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        # What a traceback shows: the cause, else the context unless suppressed (from None).
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(parts)


# -- fetching ------------------------------------------------------------------------------


async def test_file_behind_a_redirect_lands_in_chunks(serve) -> None:
    server = serve(
        {
            "/start": lambda h: h.redirect("/files/data.bin"),
            "/files/data.bin": lambda h: h.body(FILE, "text/csv"),
        }
    )
    async with fetch_url(server.url("/start"), LOCAL) as fetched:
        chunks = [chunk async for chunk in fetched.chunks]
        assert fetched.name == "data.bin"
        assert fetched.content_type == "text/csv"
        assert fetched.location == server.url("/files/data.bin")
    assert b"".join(chunks) == FILE
    assert len(chunks) >= 3
    assert all(len(chunk) <= CHUNK_BYTES for chunk in chunks)


async def test_redirect_to_the_metadata_address_is_refused(serve) -> None:
    server = serve({"/go": lambda h: h.redirect("http://169.254.169.254/latest/meta-data")})
    with pytest.raises(SourceError, match=r"169\.254\.169\.254"):
        await fetch_all(server.url("/go"))
    assert [path for path, _ in server.state.hits] == ["/go"]


async def test_redirect_loop_is_refused(serve) -> None:
    server = serve({"/loop": lambda h: h.redirect("/loop")})
    with pytest.raises(SourceError, match="more than 5 redirects"):
        await fetch_all(server.url("/loop"))
    assert len(server.state.hits) == LOCAL.max_redirects + 1


async def test_body_over_the_limit_stops_the_download(serve) -> None:
    server = serve({"/big": stream_big})
    received = 0
    with pytest.raises(SourceError, match=f"limit of {2**20} bytes"):
        async with fetch_url(server.url("/big"), LOCAL, max_bytes=2**20) as fetched:
            async for chunk in fetched.chunks:
                received += len(chunk)
    assert received <= 2**20
    assert await asyncio.to_thread(server.state.done.wait, 10)
    assert server.state.aborted, "the server should see the connection closed"
    assert server.state.sent < BIG


async def test_content_length_over_the_limit_is_refused_before_reading(serve) -> None:
    server = serve({"/declared": declare_big})
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"Content-Length.*limit of 1048576 bytes"):
        # The server never sends the body: reading it would wait for the read timeout.
        await fetch_all(server.url("/declared"), max_bytes=2**20)
    assert time.monotonic() - started < 3


async def test_policy_max_bytes_is_the_default_limit(serve) -> None:
    server = serve({"/f": lambda h: h.body(FILE)})
    policy = UrlSettings(allow_hosts="127.0.0.1", max_bytes=1000)
    with pytest.raises(SourceError, match="limit of 1000 bytes"):
        await fetch_all(server.url("/f"), policy)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, SourceError),
        (410, SourceError),
        (400, SourceError),
        (503, SourceUnavailable),
        (500, SourceUnavailable),
        (429, SourceUnavailable),
        (408, SourceUnavailable),
        (501, SourceError),
    ],
)
async def test_status_codes(serve, status: int, error: type[Exception]) -> None:
    server = serve({"/x": lambda h: h.status(status)})
    with pytest.raises(error, match=f"HTTP {status}.*/x") as caught:
        await fetch_all(server.url("/x"))
    assert type(caught.value) is error
    if isinstance(caught.value, SourceUnavailable):
        # What sluice.retries reads: the status, and for a 429 how long to wait (1 s without a
        # Retry-After), which is waited out without using a try.
        assert caught.value.status == status
        assert caught.value.retry_after == (1.0 if status == 429 else None)


async def test_missing_file_is_a_source_error(serve) -> None:
    server = serve({})
    with pytest.raises(SourceError, match="404"):
        await fetch_all(server.url("/nothing.csv"))


async def test_read_timeout_is_transient(serve) -> None:
    server = serve({"/slow": stall})
    policy = UrlSettings(allow_hosts="127.0.0.1", read_timeout=0.3)
    with pytest.raises(SourceUnavailable, match="timed out"):
        await fetch_all(server.url("/slow"), policy)


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        await fetch_all(f"http://127.0.0.1:{port}/x")


async def test_secrets_stay_out_of_errors_and_logs(serve, caplog) -> None:
    server = serve({"/private.csv": lambda h: h.status(401)})
    caplog.set_level(logging.DEBUG, logger="sluice")
    with pytest.raises(SourceError, match="401") as caught:
        await fetch_all(server.url("/private.csv"), headers={"Authorization": f"Bearer {SECRET}"})
    ((_, seen),) = server.state.hits
    assert seen["authorization"] == f"Bearer {SECRET}"  # it was sent
    assert SECRET not in chain_text(caught.value)
    with pytest.raises(SourceError, match="401") as caught:
        await fetch_all(server.url("/private.csv"), auth=("user", SECRET))
    assert SECRET not in chain_text(caught.value)
    assert SECRET not in caplog.text


@pytest.mark.parametrize("value", [f"{SECRET}\r\nX-Evil: 1", f"{SECRET}\u20ac", f"{SECRET}\x00"])
async def test_invalid_secret_header_value_is_not_echoed(serve, value: str) -> None:
    server = serve({"/f": lambda h: h.body(b"x")})
    with pytest.raises(SourceError, match="X-Token") as caught:
        await fetch_all(server.url("/f"), headers={"X-Token": value})
    assert SECRET not in chain_text(caught.value)
    assert server.state.hits == []


async def test_credentials_go_only_to_the_original_origin(serve) -> None:
    other = serve({"/elsewhere.csv": lambda h: h.body(b"a,b\n")})
    first = serve(
        {
            "/same": lambda h: h.redirect("/data.csv"),
            "/data.csv": lambda h: h.body(b"a,b\n"),
            "/away": lambda h: h.redirect(other.url("/elsewhere.csv")),
        }
    )
    kwargs = {"headers": {"X-Token": SECRET}, "auth": ("user", "pw")}
    assert (await fetch_all(first.url("/same"), **kwargs))[0] == b"a,b\n"
    assert (await fetch_all(first.url("/away"), **kwargs))[0] == b"a,b\n"
    for path, seen in first.state.hits:
        assert seen.get("x-token") == SECRET, path
        assert seen["authorization"].startswith("Basic "), path
    ((_, seen),) = other.state.hits
    assert "x-token" not in seen
    assert "authorization" not in seen


@pytest.mark.parametrize(
    ("disposition", "name"),
    [
        ('attachment; filename="../x.csv"', "x.csv"),
        ('attachment; filename="..\\\\..\\\\evil.csv"', "evil.csv"),
        ("attachment; filename*=UTF-8''%E2%82%ACuro.csv", "\u20acuro.csv"),
        ('attachment; filename=".."', "report.csv"),
        ("inline", "report.csv"),
    ],
)
async def test_file_name_is_safe(serve, disposition: str, name: str) -> None:
    server = serve({"/dl/report.csv": lambda h: h.body(b"a\n", content_disposition=disposition)})
    async with fetch_url(server.url("/dl/report.csv"), LOCAL) as fetched:
        assert fetched.name == name
        assert b"".join([c async for c in fetched.chunks]) == b"a\n"


async def test_file_name_falls_back_to_download(serve) -> None:
    server = serve({"/": lambda h: h.body(b"a\n")})
    async with fetch_url(server.url("/"), LOCAL) as fetched:
        assert fetched.name == "download"


async def test_leaving_the_context_early_closes_everything(serve) -> None:
    server = serve({"/f": lambda h: h.body(FILE)})
    async with fetch_url(server.url("/f"), LOCAL) as fetched:
        first = await anext(fetched.chunks)
    assert first == FILE[:CHUNK_BYTES]


# -- the SSRF guard ------------------------------------------------------------------------

INTRANET = resolver_for(
    {
        "intranet.test": ["10.1.2.3"],
        "mixed.test": ["93.184.216.34", "10.0.0.1"],
        "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
        "metadata.google.internal": ["169.254.169.254"],
    }
)
REFUSED_BY_DEFAULT = [
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("http://10.0.0.5/file.csv", "10.0.0.5"),
    ("http://192.168.1.1/", "192.168.1.1"),
    ("http://[::1]/x", "::1"),
    ("https://intranet.test/file.csv", "intranet.test"),
]


@pytest.mark.parametrize(("url", "host"), REFUSED_BY_DEFAULT)
async def test_private_addresses_are_refused_by_default(url: str, host: str) -> None:
    with pytest.raises(SourceError) as caught:
        await check_url(url, UrlSettings(), INTRANET)
    message = str(caught.value)
    assert host in message
    assert "SLUICE_URL_ALLOW_PRIVATE" in message
    assert "SLUICE_URL_ALLOW_HOSTS" in message
    if host == "intranet.test":
        assert "10.1.2.3" in message


@pytest.mark.parametrize(("url", "host"), REFUSED_BY_DEFAULT)
async def test_private_addresses_pass_with_allow_private(url: str, host: str) -> None:
    await check_url(url, UrlSettings(allow_private=True), INTRANET)


@pytest.mark.parametrize(("url", "host"), REFUSED_BY_DEFAULT)
async def test_private_addresses_pass_on_the_allow_list(url: str, host: str) -> None:
    await check_url(url, UrlSettings(allow_hosts=f"example.com, {host}"), INTRANET)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://mixed.test/",
    ],
)
async def test_other_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(SourceError, match="refused"):
        await check_url(url, UrlSettings(), INTRANET)


async def test_public_addresses_pass() -> None:
    await check_url("https://93.184.216.34/data.csv", UrlSettings(), INTRANET)
    await check_url("https://public.test/data.csv", UrlSettings(), INTRANET)
    await check_url("http://[2606:2800:220:1::1]:8080/x", UrlSettings(), INTRANET)


async def test_localhost_is_refused_with_the_system_resolver() -> None:
    with pytest.raises(SourceError, match=r"localhost \(resolved to .*loopback"):
        await check_url("http://localhost:8000/x.csv", UrlSettings())


async def test_a_cidr_on_the_allow_list() -> None:
    policy = UrlSettings(allow_hosts="10.0.0.0/8")
    await check_url("http://intranet.test/", policy, INTRANET)
    with pytest.raises(SourceError, match="SLUICE_URL_ALLOW_HOSTS"):
        await check_url("http://93.184.216.34/", policy, INTRANET)


async def test_deny_list_beats_allow_private_and_the_allow_list() -> None:
    with pytest.raises(SourceError, match="SLUICE_URL_DENY_HOSTS"):
        await check_url(
            "http://intranet.test/",
            UrlSettings(allow_private=True, deny_hosts="10.0.0.0/8"),
            INTRANET,
        )
    with pytest.raises(SourceError, match="SLUICE_URL_DENY_HOSTS"):
        await check_url(
            "http://127.0.0.1/", UrlSettings(allow_hosts="127.0.0.1", deny_hosts="127.0.0.1")
        )
    with pytest.raises(SourceError, match="SLUICE_URL_DENY_HOSTS"):
        check_address(
            "files.example.com", "93.184.216.34", UrlSettings(deny_hosts="files.example.com")
        )


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://ftp.example.com/file.csv", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("example.com/file.csv", "only http and https"),
        ("http:///file.csv", "no host"),
        ("http://user:hunter2@example.com/f.csv", "basic_auth_env"),
    ],
)
async def test_bad_urls_are_refused(url: str, fix: str) -> None:
    with pytest.raises(SourceError, match=fix) as caught:
        await check_url(url, UrlSettings(allow_private=True))
    assert "hunter2" not in str(caught.value)
    with pytest.raises(SourceError, match=fix):
        await fetch_all(url, UrlSettings(allow_private=True))


# -- the request a source asks for ---------------------------------------------------------


def test_url_request_parts() -> None:
    source = UrlSource(
        url="https://example.com/default.csv",
        headers={"Accept": "text/csv", "authorization": "placeholder"},
        secret_headers={"Authorization": "FEED_TOKEN"},
        basic_auth_env=("FEED_USER", "FEED_PASSWORD"),
    )
    secrets = {"FEED_TOKEN": "Bearer t", "FEED_USER": "u", "FEED_PASSWORD": "p"}
    url, headers, auth = url_request_parts(source, {"url": "https://example.com/x.csv"}, secrets)
    assert url == "https://example.com/x.csv"
    assert headers == {"Accept": "text/csv", "Authorization": "Bearer t"}
    assert auth == ("u", "p")
    assert url_request_parts(source, {}, secrets)[0] == "https://example.com/default.csv"
    assert url_request_parts(UrlSource(url="https://e.com/a"), {}, {}) == (
        "https://e.com/a",
        {},
        None,
    )


def test_url_request_parts_refusals() -> None:
    with pytest.raises(SourceError, match="no URL to fetch"):
        url_request_parts(UrlSource(), {}, {})
    fixed = UrlSource(url="https://example.com/a.csv", url_from_trigger=False)
    with pytest.raises(SourceError, match="url_from_trigger"):
        url_request_parts(fixed, {"url": "https://elsewhere.example/b.csv"}, {})
    with pytest.raises(SourceError, match="FEED_TOKEN is not set"):
        url_request_parts(
            UrlSource(url="https://e.com/a", secret_headers={"Authorization": "FEED_TOKEN"}), {}, {}
        )
