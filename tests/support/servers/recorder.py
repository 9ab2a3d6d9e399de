"""A small real HTTP server that records every request and answers from a route function, on any
local address (Linux routes all of 127.0.0.0/8 to the loopback interface, so a test can serve on
127.0.0.2, an address the host policy refuses, and see whether anything reached it)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # sent as JSON
    headers: tuple[tuple[str, str], ...] = ()


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status, None, (("Location", location),))


Route = Callable[[Request], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        super().__init__((recorder.host, recorder.port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        request = Request(
            parts.path,
            {k: v[-1] for k, v in parse_qs(parts.query).items()},
            {k.lower(): v for k, v in self.headers.items()},
        )
        recorder = self.server.recorder
        with recorder._lock:
            recorder._requests.append(request)
        reply = recorder.route(request)
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class Recorder:
    """``with Recorder(route, host=..., port=...) as server:`` serves in a daemon thread."""

    def __init__(self, route: Route, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.route = route
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def start(self) -> Recorder:
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
