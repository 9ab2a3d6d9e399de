"""A scripted AT Protocol world for tests: repos, a fake PDS (XRPC + PLC) and a fake Jetstream.

:class:`World` holds repositories and their records and emits a Jetstream event for every
mutation. :class:`FakePds` serves the world's *current* state over real HTTP (stdlib
``ThreadingHTTPServer``), and :class:`FakeJetstream` streams the world's events over a real
WebSocket (``websockets`` in its own thread and event loop), so a backfill can race a live
firehose.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 100
INACTIVE_ERRORS = {
    "deleted": "RepoNotFound",
    "deactivated": "RepoDeactivated",
    "takendown": "RepoTakendown",
    "suspended": "RepoSuspended",
}

Event = dict[str, Any]
Listener = Callable[[Event], None]
PageHook = Callable[[str, str, int, int], None]


def encode_tid(micros: int, clock_id: int = 0) -> str:
    """The 13-character TID for a microsecond timestamp and a 10-bit clock id."""
    value = ((micros & ((1 << 53) - 1)) << 10) | (clock_id & 0x3FF)
    chars = []
    for _ in range(13):
        chars.append(TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def decode_tid(tid: str) -> tuple[int, int]:
    """``(micros, clock_id)`` of a TID; ``ValueError`` when it is not one."""
    if len(tid) != 13 or any(c not in TID_ALPHABET for c in tid):
        raise ValueError(f"not a TID: {tid!r}")
    value = 0
    for c in tid:
        value = value * 32 + TID_ALPHABET.index(c)
    return value >> 10, value & 0x3FF


def make_cid(uri: str, value: Mapping[str, Any]) -> str:
    """A deterministic stand-in for a record CID (unique per uri and content)."""
    blob = json.dumps([uri, value], sort_keys=True, separators=(",", ":")).encode()
    return "bafyrei" + hashlib.sha256(blob).hexdigest()[:32]


def record_uri(did: str, collection: str, rkey: str) -> str:
    """``at://{did}/{collection}/{rkey}``."""
    return f"at://{did}/{collection}/{rkey}"


def collection_wanted(collection: str, wanted: Sequence[str]) -> bool:
    """Jetstream's ``wantedCollections`` test: exact NSIDs or ``prefix.*`` patterns."""
    if not wanted:
        return True
    for pattern in wanted:
        if pattern.endswith(".*"):
            if collection.startswith(pattern[:-1]):
                return True
        elif collection == pattern:
            return True
    return False


def event_wanted(event: Mapping[str, Any], collections: Sequence[str], dids: Sequence[str]) -> bool:
    """Whether a Jetstream subscriber with these filters gets ``event``."""
    if dids and event["did"] not in dids:
        return False
    if event["kind"] != "commit":
        return True  # identity and account events pass collection filters
    return collection_wanted(event["commit"]["collection"], collections)


def did_document(did: str, handle: str, pds_url: str) -> dict[str, Any]:
    """The DID document of ``did`` pointing at ``pds_url``."""
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds_url,
            }
        ],
    }


# -- the world -----------------------------------------------------------------------------


@dataclass
class _Repo:
    did: str
    handle: str
    rev: str
    records: dict[str, dict[str, tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    ever: set[str] = field(default_factory=set)  # collections that ever held a record
    status: str | None = None  # None while active, else deleted/deactivated/...
    created: int = 0  # records created so far (numbers default values)


class RepoGone(Exception):
    """The repo is unknown or no longer active; ``error`` is the XRPC error name."""

    def __init__(self, did: str, error: str) -> None:
        super().__init__(f"{error}: {did}")
        self.did = did
        self.error = error


class World:
    """Repositories, a TID clock and the Jetstream event log; thread-safe."""

    def __init__(self, *, clock_id: int = 0) -> None:
        self._lock = threading.RLock()
        self._clock_id = clock_id & 0x3FF
        self._last_tid_us = 0
        self._last_time_us = 0
        self._seq = 0
        self._edits = 0
        self._repos: dict[str, _Repo] = {}
        self._events: list[Event] = []
        self._listeners: list[Listener] = []

    # -- clocks ----------------------------------------------------------------------------

    def next_tid(self) -> str:
        """A fresh TID, strictly greater than every TID this world handed out before."""
        with self._lock:
            micros = max(time.time_ns() // 1000, self._last_tid_us + 1)
            self._last_tid_us = micros
            return encode_tid(micros, self._clock_id)

    def _next_time_us(self) -> int:
        micros = max(time.time_ns() // 1000, self._last_time_us + 1)
        self._last_time_us = micros
        return micros

    # -- repos -----------------------------------------------------------------------------

    def add_repo(self, did: str, handle: str, records: Mapping[str, int] | None = None) -> None:
        """A repo holding ``records[collection]`` initial records (history: no events)."""
        with self._lock:
            if did in self._repos:
                raise ValueError(f"repo {did} exists")
            repo = _Repo(did=did, handle=handle, rev=self.next_tid())
            for collection, n in (records or {}).items():
                rows = repo.records.setdefault(collection, {})
                for i in range(n):
                    rkey = self.next_tid()
                    value = {"$type": collection, "text": f"{collection} #{i} of {handle}", "n": i}
                    rows[rkey] = (make_cid(record_uri(did, collection, rkey), value), value)
                if n > 0:
                    repo.ever.add(collection)
                repo.created += n
            repo.rev = self.next_tid()
            self._repos[did] = repo

    def dids(self) -> list[str]:
        """Every repo's DID (active or not), in the order they were added."""
        with self._lock:
            return list(self._repos)

    def handle(self, did: str) -> str:
        """The repo's current handle."""
        with self._lock:
            return self._repo(did, active=False).handle

    def status(self, did: str) -> str | None:
        """``None`` while active, else the status given to :meth:`delete_account`."""
        with self._lock:
            return self._repo(did, active=False).status

    def find_did(self, repo: str) -> str | None:
        """The DID for a DID or handle, ``None`` when unknown."""
        with self._lock:
            if repo in self._repos:
                return repo
            return next((r.did for r in self._repos.values() if r.handle == repo), None)

    def rev(self, did: str) -> str:
        """The repo's current rev (``RepoGone`` when inactive)."""
        with self._lock:
            return self._repo(did).rev

    def collections(self, did: str) -> list[str]:
        """Sorted collections that ever held a record in the repo."""
        with self._lock:
            return sorted(self._repo(did).ever)

    def records(self, did: str, collection: str) -> list[tuple[str, str, dict[str, Any]]]:
        """``(rkey, cid, value)`` of the live records of a collection, sorted by rkey."""
        with self._lock:
            rows = self._repo(did).records.get(collection, {})
            return [(k, cid, copy.deepcopy(v)) for k, (cid, v) in sorted(rows.items())]

    def uris_of(self, did: str) -> set[str]:
        """URIs of the repo's live records (empty once the account is gone)."""
        with self._lock:
            repo = self._repo(did, active=False)
            return {record_uri(did, c, k) for c, rows in repo.records.items() for k in rows}

    def state(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """``uri -> (cid, value)`` of every live record in the world right now."""
        with self._lock:
            return {
                record_uri(repo.did, c, k): (cid, copy.deepcopy(v))
                for repo in self._repos.values()
                for c, rows in repo.records.items()
                for k, (cid, v) in rows.items()
            }

    @property
    def events(self) -> list[Event]:
        """A copy of every event emitted so far, in order."""
        with self._lock:
            return copy.deepcopy(self._events)

    @property
    def last_time_us(self) -> int:
        """``time_us`` of the latest event (0 before any)."""
        with self._lock:
            return self._events[-1]["time_us"] if self._events else 0

    def backlog(self, cursor: int | None) -> tuple[list[Event], int]:
        """Events with ``time_us >= cursor`` (none without a cursor) and the latest time_us."""
        with self._lock:
            last = self._events[-1]["time_us"] if self._events else 0
            if cursor is None:
                return [], last
            return [e for e in self._events if e["time_us"] >= cursor], last

    def _repo(self, did: str, *, active: bool = True) -> _Repo:
        repo = self._repos.get(did)
        if repo is None:
            raise RepoGone(did, "RepoNotFound")
        if active and repo.status is not None:
            raise RepoGone(did, INACTIVE_ERRORS.get(repo.status, "RepoDeactivated"))
        return repo

    # -- listeners -------------------------------------------------------------------------

    def subscribe(self, callback: Listener) -> None:
        """Call ``callback(event)`` for every later event, under the world lock, in order.

        Callbacks must be quick and must not block on another thread using the world.
        """
        with self._lock:
            self._listeners.append(callback)

    def unsubscribe(self, callback: Listener) -> None:
        """Stop calling ``callback``; no call is running once this returns."""
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _emit(self, did: str, kind: str, body: dict[str, Any]) -> Event:
        event: Event = {"did": did, "time_us": self._next_time_us(), "kind": kind, kind: body}
        self._events.append(event)
        for listener in list(self._listeners):
            listener(event)
        return copy.deepcopy(event)

    def _meta(self, did: str) -> dict[str, Any]:
        self._seq += 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"did": did, "seq": self._seq, "time": now}

    # -- mutations -------------------------------------------------------------------------

    def create(
        self,
        did: str,
        collection: str,
        rkey: str | None = None,
        value: Mapping[str, Any] | None = None,
    ) -> Event:
        """Create a record (rkey: a fresh TID by default) and emit its commit event."""
        with self._lock:
            repo = self._repo(did)
            rkey = rkey or self.next_tid()
            rows = repo.records.setdefault(collection, {})
            if rkey in rows:
                raise ValueError(f"{record_uri(did, collection, rkey)} exists")
            if value is None:
                n = repo.created
                value = {"$type": collection, "text": f"{collection} #{n} of {repo.handle}", "n": n}
            repo.created += 1
            return self._write(repo, "create", collection, rkey, dict(value))

    def update(
        self, did: str, collection: str, rkey: str, value: Mapping[str, Any] | None = None
    ) -> Event:
        """Give a live record a new value (by default an edited one with a new cid)."""
        with self._lock:
            repo = self._repo(did)
            rows = repo.records.get(collection, {})
            if rkey not in rows:
                raise KeyError(record_uri(did, collection, rkey))
            if value is None:
                self._edits += 1
                old = rows[rkey][1]
                value = {
                    "$type": collection,
                    "text": f"{old.get('text', '')} (edit {self._edits})",
                    "n": old.get("n", 0),
                    "edit": self._edits,
                }
            return self._write(repo, "update", collection, rkey, dict(value))

    def delete(self, did: str, collection: str, rkey: str) -> Event:
        """Delete a live record and emit its delete event (no record, no cid)."""
        with self._lock:
            repo = self._repo(did)
            rows = repo.records.get(collection, {})
            if rkey not in rows:
                raise KeyError(record_uri(did, collection, rkey))
            del rows[rkey]
            repo.rev = self.next_tid()
            commit = {"rev": repo.rev, "operation": "delete", "collection": collection}
            return self._emit(did, "commit", commit | {"rkey": rkey})

    def _write(
        self, repo: _Repo, operation: str, collection: str, rkey: str, value: dict[str, Any]
    ) -> Event:
        cid = make_cid(record_uri(repo.did, collection, rkey), value)
        repo.records[collection][rkey] = (cid, value)
        repo.ever.add(collection)
        repo.rev = self.next_tid()
        commit = {
            "rev": repo.rev,
            "operation": operation,
            "collection": collection,
            "rkey": rkey,
            "record": copy.deepcopy(value),
            "cid": cid,
        }
        return self._emit(repo.did, "commit", commit)

    def delete_account(self, did: str, status: str = "deleted") -> Event:
        """Deactivate the account: its records vanish and the PDS answers 400 for it."""
        with self._lock:
            repo = self._repo(did)
            repo.records.clear()
            repo.status = status
            repo.rev = self.next_tid()
            body = {"active": False} | self._meta(did) | {"status": status}
            return self._emit(did, "account", body)

    def set_handle(self, did: str, handle: str) -> Event:
        """Change the handle and emit an identity event (the rev moves on too)."""
        with self._lock:
            repo = self._repo(did)
            repo.handle = handle
            repo.rev = self.next_tid()
            return self._emit(did, "identity", self._meta(did) | {"handle": handle})

    def random_mutation(self, rng: random.Random, dids: Sequence[str] | None = None) -> Event:
        """A create (45%), update (35%) or delete (20%) on a random active repo of ``dids``."""
        with self._lock:
            pool = [d for d in (dids if dids is not None else self._repos) if d in self._repos]
            pool = [d for d in pool if self._repos[d].status is None]
            if not pool:
                raise ValueError("no active repo to mutate")
            repo = self._repos[rng.choice(sorted(pool))]
            live = sorted((c, k) for c, rows in repo.records.items() for k in rows)
            roll = rng.random()
            if not live or roll < 0.45:
                known = sorted(repo.ever) or ["app.bsky.feed.post"]
                return self.create(repo.did, rng.choice(known))
            collection, rkey = rng.choice(live)
            if roll < 0.80:
                return self.update(repo.did, collection, rkey)
            return self.delete(repo.did, collection, rkey)


# -- the PDS -------------------------------------------------------------------------------


@dataclass
class Hit:
    """One request as the fake PDS saw it."""

    time: float
    method: str
    endpoint: str  # the XRPC NSID, "plc", "well-known", or the raw path
    params: dict[str, str]
    status: int


@dataclass
class _Answer:
    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)
    page: tuple[str, str, int, int] | None = None  # (did, collection, number, served)


def _error(status: int, error: str, message: str) -> _Answer:
    return _Answer(status, {"error": error, "message": message})


class _Fail(Exception):
    """Carries an error answer out of a handler."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.body)
        self.answer = answer


class _PdsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, pds: FakePds) -> None:
        self.pds = pds
        super().__init__(("127.0.0.1", pds.port), _PdsHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up; report anything else."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _PdsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakePds/1.0"
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        cast(_PdsServer, self.server).pds._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            cast(_PdsServer, self.server).pds._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request logging."""

    def do_GET(self) -> None:
        """Answer a GET."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        pds = cast(_PdsServer, self.server).pds
        answer = pds._answer(self.path)
        payload = json.dumps(answer.body).encode()
        if answer.page is not None:
            pds._after_page(*answer.page)
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class FakePds:
    """A PDS (and PLC directory at ``/plc``) over HTTP, answering from the world's state."""

    def __init__(
        self,
        world: World,
        *,
        port: int = 0,
        throttle_every: int = 0,
        on_page: PageHook | None = None,
        page_delay: float = 0.0,
    ) -> None:
        if throttle_every < 0 or page_delay < 0:
            raise ValueError("throttle_every >= 0 and page_delay >= 0 please")
        self.world = world
        self.port = port
        self.throttle_every = throttle_every
        self.on_page = on_page
        self.page_delay = page_delay
        self.hook_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._list_requests = 0
        self._pages: dict[tuple[str, str], int] = {}
        self._connections: set[socket.socket] = set()
        self._server: _PdsServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakePds:
        """Bind to 127.0.0.1 (port 0: a free one) and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakePds already started")
        self._server = _PdsServer(self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-pds",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and hang up; re-raises the first exception an ``on_page`` hook raised."""
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
        if self.hook_errors:
            raise self.hook_errors[0]

    def __enter__(self) -> FakePds:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.hook_errors.clear()  # do not mask the test's own failure
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("FakePds not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def plc_url(self) -> str:
        """The PLC directory this server doubles as: ``url + "/plc"``."""
        return self.url + "/plc"

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def hits(self) -> list[Hit]:
        """A copy of every hit so far, in arrival order."""
        with self._lock:
            return list(self._hits)

    def count(self, *, endpoint: str | None = None, status: int | None = None) -> int:
        """How many hits match every filter given."""
        return sum(
            1
            for hit in self.hits
            if (endpoint is None or hit.endpoint == endpoint)
            and (status is None or hit.status == status)
        )

    def throttled(self) -> int:
        """How many 429 answers were sent."""
        return self.count(status=429)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- answering -------------------------------------------------------------------------

    def _answer(self, raw_path: str) -> _Answer:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/") or "/"
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path.startswith("/xrpc/"):
            endpoint = path.removeprefix("/xrpc/")
        elif path.startswith("/plc/"):
            endpoint = "plc"
            params = params | {"did": unquote(path.removeprefix("/plc/"))}
        elif path == "/.well-known/did.json":
            endpoint = "well-known"
        else:
            endpoint = path
        now = time.time()
        answer = self._throttle(endpoint, now)
        if answer is None:
            try:
                answer = self._route(endpoint, params)
            except RepoGone as exc:
                answer = _error(400, exc.error, f"Could not find repo: {exc.did}")
            except _Fail as exc:
                answer = exc.answer
        with self._lock:
            self._hits.append(Hit(now, "GET", endpoint, params, answer.status))
        return answer

    def _throttle(self, endpoint: str, now: float) -> _Answer | None:
        if endpoint != "com.atproto.repo.listRecords" or self.throttle_every <= 0:
            return None
        with self._lock:
            self._list_requests += 1
            if self._list_requests % self.throttle_every != 0:
                return None
        answer = _error(429, "RateLimitExceeded", "Rate Limit Exceeded")
        answer.headers = [
            ("Retry-After", "1"),
            ("RateLimit-Limit", "3000"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", str(math.ceil(now) + 1)),
            ("RateLimit-Policy", "3000;w=300"),
        ]
        return answer

    def _route(self, endpoint: str, params: Mapping[str, str]) -> _Answer:
        world = self.world
        if endpoint == "plc":
            did = params["did"]
            if world.find_did(did) != did:
                return _error(404, "NotFound", f"DID not registered: {did}")
            return _Answer(200, did_document(did, world.handle(did), self.url))
        if endpoint == "well-known":
            web = next((d for d in world.dids() if d.startswith("did:web:")), None)
            if web is None:
                return _error(404, "NotFound", "no did:web here")
            return _Answer(200, did_document(web, world.handle(web), self.url))
        if endpoint == "com.atproto.sync.getLatestCommit":
            did = self._did(params, "did")
            rev = world.rev(did)
            return _Answer(200, {"cid": make_cid(f"at://{did}", {"rev": rev}), "rev": rev})
        if endpoint == "com.atproto.repo.describeRepo":
            did = self._did(params, "repo")
            collections = world.collections(did)
            handle = world.handle(did)
            body = {
                "handle": handle,
                "did": did,
                "didDoc": did_document(did, handle, self.url),
                "collections": collections,
                "handleIsCorrect": True,
            }
            return _Answer(200, body)
        if endpoint == "com.atproto.repo.listRecords":
            return self._list_records(params)
        if endpoint.count(".") >= 2 and "/" not in endpoint:
            return _error(501, "MethodNotImplemented", f"Method Not Implemented: {endpoint}")
        return _error(404, "NotFound", f"no such path: {endpoint}")

    def _did(self, params: Mapping[str, str], name: str) -> str:
        value = params.get(name, "")
        if not value:
            raise _Fail(
                _error(400, "InvalidRequest", f"Error: Params must have the property {name}")
            )
        did = self.world.find_did(value)
        if did is None:
            raise RepoGone(value, "RepoNotFound")
        return did

    def _list_records(self, params: Mapping[str, str]) -> _Answer:
        collection = params.get("collection", "")
        if not collection:
            return _error(400, "InvalidRequest", "Error: Params must have the property collection")
        try:
            limit = int(params.get("limit", LIST_LIMIT_DEFAULT))
        except ValueError:
            return _error(400, "InvalidRequest", "limit must be an integer")
        if not 1 <= limit <= LIST_LIMIT_MAX:
            return _error(400, "InvalidRequest", f"limit must be in 1..{LIST_LIMIT_MAX}")
        did = self._did(params, "repo")
        cursor = params.get("cursor", "")
        rows = [r for r in self.world.records(did, collection) if r[0] > cursor]
        page = rows[:limit]
        body: dict[str, Any] = {
            "records": [
                {"uri": record_uri(did, collection, rkey), "cid": cid, "value": value}
                for rkey, cid, value in page
            ]
        }
        if len(page) == limit:
            body["cursor"] = page[-1][0]
        with self._lock:
            number = self._pages.get((did, collection), 0) + 1
            self._pages[(did, collection)] = number
        return _Answer(200, body, page=(did, collection, number, len(page)))

    def _after_page(self, did: str, collection: str, number: int, served: int) -> None:
        """Run the ``on_page`` hook (outside every lock), then wait ``page_delay``."""
        if self.on_page is not None:
            try:
                self.on_page(did, collection, number, served)
            except Exception as exc:
                self.hook_errors.append(exc)
        if self.page_delay > 0:
            time.sleep(self.page_delay)


# -- the Jetstream -------------------------------------------------------------------------


@dataclass(eq=False)
class _Client:
    ws: ServerConnection
    collections: list[str]
    dids: list[str]
    after: int  # skip live events with time_us <= after (already replayed or from before)
    info: dict[str, Any]
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)


class FakeJetstream:
    """A Jetstream-like WebSocket server at ``/subscribe``, in its own thread and loop."""

    def __init__(self, world: World, *, port: int = 0) -> None:
        self.world = world
        self.port = port
        self.sent = 0
        self._lock = threading.Lock()
        self._connections: list[dict[str, Any]] = []
        self._clients: set[_Client] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeJetstream:
        """Start the server thread; returns once it is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeJetstream already started")
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name="fake-jetstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("FakeJetstream did not start")
        if self._failure is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise RuntimeError("FakeJetstream failed to start") from self._failure
        return self

    def stop(self) -> None:
        """Close every connection and the server, and join the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeJetstream:
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
        """``ws://127.0.0.1:PORT/subscribe``."""
        if self._thread is None:
            raise RuntimeError("FakeJetstream not started")
        return f"ws://127.0.0.1:{self.port}/subscribe"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server: Server
        async with serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._check,
            close_timeout=1,
            ping_interval=None,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.world.subscribe(self._on_event)
            try:
                self._ready.set()
                await self._stopping.wait()
            finally:
                self.world.unsubscribe(self._on_event)

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def connections(self) -> list[dict[str, Any]]:
        """One dict per accepted subscription, in order (recorded once it is live)."""
        with self._lock:
            return [dict(c) for c in self._connections]

    @property
    def active(self) -> int:
        """How many subscriptions are open now."""
        with self._lock:
            return sum(1 for c in self._connections if c["closed"] is None)

    def wait_connected(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block (sync code only) until ``count`` subscriptions are open; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.active < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- serving ---------------------------------------------------------------------------

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path.rstrip("/") != "/subscribe":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        cursor = parse_qs(parts.query).get("cursor", [""])[-1]
        if cursor and not cursor.isdigit():
            return connection.respond(HTTPStatus.BAD_REQUEST, "invalid cursor\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        cursor_text = query.get("cursor", [""])[-1]
        cursor = int(cursor_text) if cursor_text else None
        info: dict[str, Any] = {
            "wantedCollections": query.get("wantedCollections", []),
            "wantedDids": query.get("wantedDids", []),
            "cursor": cursor,
            "params": {k: list(v) for k, v in query.items()},
            "time": time.time(),
            "closed": None,
            "sent": 0,
        }
        # Snapshot and registration happen in one loop step: any event dispatched later
        # either is in the backlog (skipped by ``after``) or came after it.
        backlog, last = self.world.backlog(cursor)
        client = _Client(ws, info["wantedCollections"], info["wantedDids"], last, info)
        for event in backlog:
            if event_wanted(event, client.collections, client.dids):
                client.queue.put_nowait(json.dumps(event))
        self._clients.add(client)
        with self._lock:
            self._connections.append(info)
        sender = asyncio.create_task(self._send(client))
        closed = asyncio.create_task(ws.wait_closed())
        try:
            await asyncio.wait({sender, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._clients.discard(client)
            for task in (sender, closed):
                task.cancel()
            await asyncio.gather(sender, closed, return_exceptions=True)
            with self._lock:
                info["closed"] = time.time()

    async def _send(self, client: _Client) -> None:
        try:
            while True:
                frame = await client.queue.get()
                await client.ws.send(frame)
                with self._lock:
                    client.info["sent"] += 1
                    self.sent += 1
        except ConnectionClosed:
            return

    def _on_event(self, event: Event) -> None:
        """World listener (any thread, under the world lock): hand the event to the loop."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._dispatch, event["time_us"], json.dumps(event), event)

    def _dispatch(self, time_us: int, frame: str, event: Event) -> None:
        for client in self._clients:
            if time_us > client.after and event_wanted(event, client.collections, client.dids):
                client.queue.put_nowait(frame)

    def _dispatch_raw(self, frame: str) -> None:
        for client in self._clients:
            client.queue.put_nowait(frame)

    def inject(self, raw: str) -> None:
        """Send ``raw`` as a text frame to every connected client, in order with events."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeJetstream not started")
        loop.call_soon_threadsafe(self._dispatch_raw, raw)

    def drop_connections(self, *, abrupt: bool = False) -> int:
        """Close every client connection (1001, or abort the TCP stream); returns how many."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeJetstream not started")
        return asyncio.run_coroutine_threadsafe(self._drop(abrupt), loop).result(timeout=5)

    async def _drop(self, abrupt: bool) -> int:
        clients = list(self._clients)
        self._clients.clear()
        for client in clients:
            if abrupt:
                client.ws.transport.abort()
            else:
                task = asyncio.create_task(client.ws.close(1001, "dropped by test"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        return len(clients)
