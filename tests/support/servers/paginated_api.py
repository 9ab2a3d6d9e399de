"""A real local HTTP server playing a rate-limited, paginated JSON API, for source tests.

Stdlib only: a ``ThreadingHTTPServer`` in a daemon thread on 127.0.0.1, port 0. Every request
is recorded as a :class:`Hit` (under a lock), so tests can check what a client really did.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

PAGE_STYLES = ("page", "offset", "cursor", "next_url", "link_header")
"""``next_url`` answers with ``next_page_url``; ``link_header`` with ``Link: <...>; rel="next"``."""
DEFAULT_PAGE_SIZE = 100
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)

Headers = list[tuple[str, str]]


@dataclass
class Hit:
    """One request as the server saw it."""

    time: float  # time.time() when the request arrived
    kind: str  # "list", "detail" (or "other" for an unknown path)
    what: str  # list: the page/offset/cursor asked for ("" = no cursor); detail: the item id
    status: int  # what the server answered
    agent: str = ""  # the client's User-Agent (Sluice names its worker process there)


@dataclass
class _Answer:
    status: int
    body: Any
    headers: Headers
    delay: float = 0.0


def encode_cursor(offset: int) -> str:
    """The opaque cursor that points at ``offset``."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def decode_cursor(cursor: str) -> int:
    """The offset behind a cursor; ``ValueError`` when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"bad cursor {cursor!r}") from exc
    prefix, _, number = text.partition(":")
    if prefix != "offset" or not number.isdigit():
        raise ValueError(f"bad cursor {cursor!r}")
    return int(number)


class _Server(ThreadingHTTPServer):
    """The HTTP server, holding a reference to its :class:`FakeApi`."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        super().__init__(("127.0.0.1", api.port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up; report anything else."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Turns each request into a call to :meth:`FakeApi._answer`."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeApi/1.0"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def setup(self) -> None:
        super().setup()
        cast(_Server, self.server).api._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            cast(_Server, self.server).api._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request logging."""

    def do_GET(self) -> None:
        """Answer a GET."""
        self._discard_body()
        answer = cast(_Server, self.server).api._answer(
            self.path, self.headers.get("User-Agent", "")
        )
        if answer.delay > 0:
            time.sleep(answer.delay)
        payload = json.dumps(answer.body).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)


class FakeApi:
    """A rate-limited paginated API: ``GET /items`` lists, ``GET /items/{id}`` details."""

    def __init__(
        self,
        n_items: int,
        *,
        per_second: float | None = None,
        burst: int | None = None,
        throttle_every: int = 0,
        flaky: Mapping[str, int] | None = None,
        broken: Iterable[str] = (),
        missing: Iterable[str] = (),
        latency: float = 0.0,
        page_style: str = "page",
        page_size_max: int = DEFAULT_PAGE_SIZE,
        list_latency: float = 0.0,
        port: int = 0,
        next_base: str | None = None,
    ) -> None:
        """``per_second``: at most that many accepted requests in any second; with ``burst``, a
        token bucket instead (``burst`` tokens, ``per_second`` more each second), as many APIs
        document their limit. ``next_base``: for the ``next_url`` and ``link_header`` styles,
        the scheme and host the next page's URL is given under (``http://localhost:PORT`` for
        another host than 127.0.0.1); None gives it relative to the server, as
        ``/items?offset=...``."""
        if page_style not in PAGE_STYLES:
            raise ValueError(f"page_style must be one of {PAGE_STYLES}, not {page_style!r}")
        if n_items < 0 or page_size_max < 1 or throttle_every < 0:
            raise ValueError("n_items >= 0, page_size_max >= 1 and throttle_every >= 0 please")
        self.n_items = n_items
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst or 0)
        self._filled = time.time()
        self.throttle_every = throttle_every
        self.flaky: dict[str, int] = dict(flaky or {})
        self.broken: frozenset[str] = frozenset(broken)
        self.missing: frozenset[str] = frozenset(missing)
        self.latency = latency
        self.page_style = page_style
        self.page_size_max = page_size_max
        self.list_latency = list_latency
        self.port = port
        self.next_base = next_base
        self.ids: list[str] = [f"item-{i:05d}" for i in range(1, n_items + 1)]
        self._index: dict[str, int] = {id_: i for i, id_ in enumerate(self.ids, start=1)}
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._accepted: deque[float] = deque()
        self._arrivals = 0
        self._scripted = 0
        self._flaky_seen: dict[str, int] = {}
        self._versions: dict[str, int] = {}  # id -> how often it was changed (see change)
        self._changes = 0
        self._changed_at: dict[str, int] = {}
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeApi:
        """Bind to 127.0.0.1 on a free port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeApi already started")
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and hang up on open connections."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeApi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("FakeApi not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- data -----------------------------------------------------------------------------

    def item(self, id: str) -> dict[str, Any]:
        """The detail body for ``id`` (deterministic); ``KeyError`` for an unknown id."""
        i = self._index[id]
        version = self._versions.get(id, 0)
        return {
            "id": id,
            "name": f"name of {id}" + (f" v{version + 1}" if version else ""),
            "price": f"{(i * 1234) % 100000 / 100:.2f}",
            "updated_at": self._updated_at(id).isoformat(),
            "tags": ["even" if i % 2 == 0 else "odd", f"group-{i % 7}"],
        }

    def change(self, ids: Iterable[str]) -> None:
        """The items ``ids`` change: a new name, and an ``updated_at`` later than any item's so
        far (the list answers ``?updated_since=T`` with the items updated after T)."""
        with self._lock:
            for id_ in ids:
                self._changes += 1
                self._versions[id_] = self._versions.get(id_, 0) + 1
                self._changed_at[id_] = self._changes

    def _updated_at(self, id_: str) -> datetime:
        """Item i was last updated i hours after EPOCH; a changed item after every unchanged
        one, in the order of the changes."""
        changed = self._changed_at.get(id_)
        hours = self._index[id_] if changed is None else self.n_items + changed
        return EPOCH + timedelta(hours=hours)

    # -- bookkeeping ----------------------------------------------------------------------

    def snapshot(self) -> list[Hit]:
        """A copy of every hit so far, in arrival order."""
        with self._lock:
            return list(self._hits)

    @property
    def hits(self) -> list[Hit]:
        """Same as :meth:`snapshot`."""
        return self.snapshot()

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most requests (any status, any kind) that arrived within any ``seconds`` window."""
        return most_in_window([hit.time for hit in self.snapshot()], seconds)

    def count(
        self, *, kind: str | None = None, status: int | None = None, since: float | None = None
    ) -> int:
        """How many hits match every filter given."""
        return sum(
            1
            for hit in self.snapshot()
            if (kind is None or hit.kind == kind)
            and (status is None or hit.status == status)
            and (since is None or hit.time >= since)
        )

    def throttled(self) -> int:
        """How many 429 answers were sent."""
        return self.count(status=429)

    def served_pages(self) -> list[str]:
        """``what`` of the list hits answered 200, in arrival order."""
        return [h.what for h in self.snapshot() if h.kind == "list" and h.status == 200]

    def served_details(self, since: float | None = None) -> list[str]:
        """Ids of the detail hits answered 200, in arrival order."""
        return [
            h.what
            for h in self.snapshot()
            if h.kind == "detail" and h.status == 200 and (since is None or h.time >= since)
        ]

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- answering ------------------------------------------------------------------------

    def _answer(self, raw_path: str, agent: str = "") -> _Answer:
        """Decide the answer to one request and record it, all under the lock."""
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path == "/items":
            kind, what = "list", self._list_what(query)
        elif path.startswith("/items/") and path.count("/") == 2:
            kind, what = "detail", unquote(path.removeprefix("/items/"))
        else:
            kind, what = "other", path
        with self._lock:
            now = time.time()
            answer = self._rate_limit(now)
            if answer is None:
                if kind == "list":
                    answer = self._list(query)
                    answer.delay = self.list_latency
                elif kind == "detail":
                    answer = self._detail(what)
                    answer.delay = self.latency
                else:
                    answer = _Answer(404, {"error": "not found"}, [])
            self._hits.append(
                Hit(time=now, kind=kind, what=what, status=answer.status, agent=agent)
            )
        return answer

    def _rate_limit(self, now: float) -> _Answer | None:
        """A 429 answer when this request is throttled, else ``None`` (and it is accepted)."""
        self._arrivals += 1
        if self.throttle_every > 0 and self._arrivals % self.throttle_every == 0:
            form = self._scripted % 3
            self._scripted += 1
            headers: Headers
            if form == 0:
                headers = [("Retry-After", "1")]
            elif form == 1:
                ahead = datetime.fromtimestamp(math.ceil(now) + 1, tz=UTC)
                headers = [("Retry-After", format_datetime(ahead, usegmt=True))]
            else:
                headers = [("RateLimit-Reset", "1")]
            return _Answer(429, {"error": "rate limited"}, headers)
        if self.per_second is not None and self.burst is not None:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._filled) * self.per_second
            )
            self._filled = now
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.per_second
                return _Answer(429, {"error": "rate limited"}, [("Retry-After", _seconds(wait))])
            self._tokens -= 1
        elif self.per_second is not None:
            while self._accepted and self._accepted[0] <= now - 1.0:
                self._accepted.popleft()
            if len(self._accepted) + 1 > self.per_second:
                return _Answer(429, {"error": "rate limited"}, [("Retry-After", "1")])
            self._accepted.append(now)
        return None

    def _list_what(self, query: Mapping[str, str]) -> str:
        key = {"page": "page", "cursor": "cursor"}.get(self.page_style, "offset")
        return query.get(key, "1" if key == "page" else "0" if key == "offset" else "")

    def _list(self, query: Mapping[str, str]) -> _Answer:
        size_key = "per_page" if self.page_style == "page" else "limit"
        try:
            size = int(query.get(size_key, DEFAULT_PAGE_SIZE))
            if self.page_style == "page":
                page = int(query.get("page", "1"))
                if page < 1:
                    raise ValueError("page starts at 1")
                offset = (page - 1) * min(max(size, 1), self.page_size_max)
            elif self.page_style != "cursor":  # offset, next_url, link_header
                offset = int(query.get("offset", "0"))
            else:
                cursor = query.get("cursor", "")
                offset = decode_cursor(cursor) if cursor else 0
            if size < 1 or offset < 0:
                raise ValueError("size >= 1 and offset >= 0 please")
        except ValueError as exc:
            return _Answer(400, {"error": str(exc)}, [])
        ids = self.ids
        if "updated_since" in query:
            try:
                since = datetime.fromisoformat(query["updated_since"])
            except ValueError as exc:
                return _Answer(400, {"error": f"updated_since: {exc}"}, [])
            ids = [i for i in ids if self._updated_at(i) > since]
        size = min(size, self.page_size_max)
        chunk = ids[offset : offset + size]
        end = offset + len(chunk)
        more = bool(chunk) and end < len(ids)
        next_cursor = encode_cursor(end) if more else None
        body: dict[str, Any] = {
            "data": [
                {
                    "id": id_,
                    "name": self.item(id_)["name"],
                    "updated_at": self.item(id_)["updated_at"],
                }
                for id_ in chunk
            ],
            "meta": {"total": len(ids), "next_cursor": next_cursor},
        }
        headers: Headers = []
        next_url = f"{self.next_base or ''}/items?offset={end}&limit={size}" if more else None
        if self.page_style == "next_url":
            body["next_page_url"] = next_url
        elif self.page_style == "link_header" and next_url is not None:
            headers.append(("Link", f'<{next_url}>; rel="next", </items?offset=0>; rel="first"'))
        return _Answer(200, body, headers)

    def _detail(self, id_: str) -> _Answer:
        if id_ in self.missing or id_ not in self._index:
            return _Answer(404, {"error": "not found"}, [])
        if id_ in self.broken:
            return _Answer(500, {"error": "internal error"}, [])
        seen = self._flaky_seen.get(id_, 0)
        if seen < self.flaky.get(id_, 0):
            self._flaky_seen[id_] = seen + 1
            return _Answer(503, {"error": "temporarily unavailable"}, [])
        return _Answer(200, {"data": self.item(id_)}, [])


def _seconds(wait: float) -> str:
    """A Retry-After in whole seconds (as HTTP has it), never 0 for a wait."""
    return str(max(1, math.ceil(wait)))


def most_in_window(times: Iterable[float], seconds: float = 1.0) -> int:
    """The largest number of ``times`` inside any half-open window ``[t, t + seconds)``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best
