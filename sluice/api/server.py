"""Serving the API: uvicorn, with its h11 protocol given two guards it lacks.

- **A deadline for each request's head.** uvicorn waits for a request line and headers for as
  long as a client takes (its keep-alive timeout starts only after a first response): a client
  that connects and sends nothing, or a header a byte at a time, holds the connection. Here a
  connection must deliver a complete head within ``SLUICE_API_HEADER_TIMEOUT`` seconds of
  being opened or of its previous response; else it is answered ``408 header_timeout`` (when
  part of a head came) and closed. A connection that is still sending a body nobody reads
  after its response (the route answered without it) is closed at the same deadline.
- **A client that stops sending mid-body but still listens** (it closed its side of the
  connection, a half-close) is answered ``400 incomplete_upload``, "the upload ended before its
  declared length", and the request stops. uvicorn would close the connection without an
  answer.

Reading a body slowly is :class:`sluice.api.body.RequestBodyGuard`'s to bound: only the
app knows when it waits for one.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sluice.api.app import create_api
from sluice.api.errors import error_body
from sluice.config import Settings

__all__ = ["protocol_with_timeouts", "serve"]


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve the API until the process is stopped (``sluice api``); ``host`` and ``port``
    default to ``SLUICE_API_HOST`` and ``SLUICE_API_PORT``."""
    uvicorn.run(
        create_api(settings),
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level="warning",
        http=protocol_with_timeouts(settings.api.header_timeout),
    )


def protocol_with_timeouts(header_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (``http=``), with this deadline for request heads."""
    return type("SluiceH11Protocol", (_GuardedH11Protocol,), {"header_timeout": header_timeout})


def _error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the API's error body, for a connection about to close."""
    body = error_body(code, message)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _GuardedH11Protocol(H11Protocol):
    header_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self.conn.their_state is h11.IDLE:
            self._head_started = True
        super().data_received(data)
        if self._serving():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self._head_started = False
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and not self._serving():
            self._arm_head_timer()

    # asyncio.Protocol's signature: True keeps the transport open to write the answer.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        cycle = self.cycle
        if (
            cycle is None
            or cycle.response_started
            or cycle.disconnected
            or self.conn.their_state is not h11.SEND_BODY
        ):
            return super().eof_received()  # None: the transport closes itself
        # The client will send no more of the body but may read an answer.
        headers = dict(self.headers or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            what = (
                f"the upload ended before its declared length (Content-Length: "
                f"{declared.decode('latin-1')} bytes)"
            )
        else:
            what = "the upload ended before its last chunk (a chunked body ends with an empty one)"
        self.transport.write(
            _error_response(
                400,
                "incomplete_upload",
                f"{what}: the client closed its side of the connection in the middle of the "
                f"body. Send the whole file again",
            )
        )
        # The app stops: its next receive() is a disconnect, and what it sends is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()  # once the answer is written
        return True

    def _serving(self) -> bool:
        """A request is being answered (its head is in, its response is not complete)."""
        cycle = self.cycle
        return (
            cycle is not None
            and not cycle.response_complete
            and self.conn.their_state is not h11.IDLE
        )

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = asyncio.get_running_loop().call_later(
            self.header_timeout, self._head_timed_out
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._serving():
            return
        if self._head_started and self.conn.their_state is h11.IDLE:
            self.transport.write(
                _error_response(
                    408,
                    "header_timeout",
                    f"the request line and headers did not all arrive within "
                    f"{self.header_timeout:g} s (SLUICE_API_HEADER_TIMEOUT): send the whole "
                    f"request head at once",
                )
            )
        self.transport.close()
