"""How the HTTP API reads request bodies, whatever the route: an ASGI middleware.

- **A body that stops arriving** is cut off: each wait for the next part of a body is bounded
  (``SLUICE_API_BODY_TIMEOUT`` seconds without a byte), then the request is answered
  ``408 body_timeout`` and the connection closed. A client that declared a longer body than it
  sends cannot hold a connection (and the file it began) for longer.
- **A body cut short** (the client went away before its Content-Length, or before the last
  chunk of a chunked body) stops the request with ``400 incomplete_upload`` ("the upload ended
  before its declared length"), and a multipart body that ends without its closing boundary is
  refused the same way: the file in it is incomplete, and nothing is stored.
- **RFC 5987 file names.** A multipart part whose Content-Disposition names its file only with
  ``filename*=UTF-8''pr%C3%BCfung.csv`` is a file like any other: the parser underneath
  (python-multipart) ignores ``filename*`` and would take the part for a plain field, so the
  middleware writes the decoded name as ``filename="..."`` into the part's headers as they
  stream through (``filename*`` wins over a ``filename`` beside it, as RFC 6266 says).

The server (:mod:`sluice.api.server`) bounds the time to receive a request's head, and
answers a client that half-closes its connection in the middle of a body.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from urllib.parse import unquote

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.errors import BodyProblem, error_body

__all__ = ["BodyProblem", "RequestBodyGuard"]

log = logging.getLogger(__name__)

# The headers of one part are a few hundred bytes; past this much, the middleware leaves the
# part as it is and lets the parser judge it.
_MAX_PART_HEADERS = 64 * 1024


class RequestBodyGuard:
    """See the module's docstring. `timeout`: seconds to wait for each part of a body."""

    def __init__(self, app: ASGIApp, *, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body(scope, receive, self.timeout)
        started = False

        async def send_closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if body.problem is not None:  # the rest of the body will not be read
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, body.receive, send_closing)
        except BodyProblem as exc:
            # The routes' exception handlers answer it; a part of the app without them
            # (another middleware) lets it through to here.
            if exc is not body.problem or started:
                raise
            await send_closing(
                {
                    "type": "http.response.start",
                    "status": exc.status_code,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send_closing(
                {"type": "http.response.body", "body": error_body(exc.code, exc.detail)}
            )


class _Body:
    """The request's body as the app receives it, checked and bounded as it arrives."""

    def __init__(self, scope: Scope, receive: Receive, timeout: float) -> None:
        self._receive = receive
        self._timeout = timeout
        self._received = 0
        self._done = False
        self.problem: BodyProblem | None = None
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        declared = headers.get(b"content-length", b"")
        self._declared = int(declared) if declared.isdigit() else None
        self._client = scope.get("client")
        self._multipart = _MultipartScanner.for_content_type(headers.get(b"content-type"))

    async def receive(self) -> Message:
        if self.problem is not None:
            return {"type": "http.disconnect"}
        if self._done:  # the body is all in: what comes now is the disconnect
            return await self._receive()
        try:
            async with asyncio.timeout(self._timeout):
                message = await self._receive()
        except TimeoutError:
            raise self._fail(
                408,
                "body_timeout",
                f"the request body stopped arriving: no byte for {self._timeout:g} s "
                f"(SLUICE_API_BODY_TIMEOUT) after {self._progress()}. Send the request again, "
                f"without pausing in the middle",
            ) from None
        if message["type"] == "http.disconnect":
            if self._declared is not None:
                what = f"the upload ended before its declared length ({self._progress()})"
            else:
                what = f"the upload ended before its last chunk ({self._progress()})"
            raise self._fail(
                400,
                "incomplete_upload",
                f"{what}: the client closed the connection. Send the whole file again",
            )
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        self._received += len(chunk)
        if not more:
            self._done = True
        if self._multipart is not None:
            chunk = self._multipart.feed(chunk, final=not more)
            if self._done and not self._multipart.closed:
                raise self._fail(
                    400,
                    "incomplete_upload",
                    f"the upload ended before its closing multipart boundary: the body stops "
                    f"after {self._received} bytes, so the file in it is cut short. Send the "
                    f"whole file again",
                )
        return {**message, "body": chunk}

    def _progress(self) -> str:
        if self._declared is not None:
            return f"{self._received} of {self._declared} bytes read"
        return f"{self._received} bytes read"

    def _fail(self, status: int, code: str, message: str) -> BodyProblem:
        self.problem = BodyProblem(status, code, message)
        log.warning("request body from %s refused (%d %s): %s", self._client, status, code, message)
        return self.problem


class _MultipartScanner:
    """Follows the part delimiters of a multipart body as it streams through: rewrites the
    Content-Disposition of parts named with ``filename*`` and notes the closing delimiter.

    Bytes that may be the start of a delimiter are held back until the next chunk tells."""

    def __init__(self, boundary: bytes, charset: str) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._charset = charset
        # The first delimiter may open the body: a virtual line break before it, not passed on.
        self._buffer = b"\r\n"
        self._skip = 2
        self._in_headers = False
        self.closed = False

    @classmethod
    def for_content_type(cls, content_type: bytes | None) -> _MultipartScanner | None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            return None
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:  # the charset the form parser will decode the file name with
            charset = codecs.lookup(charset).name
        except LookupError:
            charset = "latin-1"
        return cls(boundary, charset)

    def feed(self, chunk: bytes, *, final: bool) -> bytes:
        """The bytes to pass on for `chunk`; all that is left when `final`."""
        self._buffer += chunk
        out: list[bytes] = []
        while not self.closed:
            if self._in_headers:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) <= _MAX_PART_HEADERS:
                        break
                    self._in_headers = False  # not a part's headers: not ours to judge
                    continue
                out.append(_rfc5987_filename(self._buffer[:end], self._charset))
                self._buffer = self._buffer[end:]
                self._in_headers = False
                continue
            at = self._buffer.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) + 1  # a delimiter may begin in the last bytes
                if len(self._buffer) > keep:
                    out.append(self._buffer[:-keep])
                    self._buffer = self._buffer[-keep:]
                break
            after = at + len(self._delimiter)
            if len(self._buffer) < after + 2:  # "--" after it closes the body
                out.append(self._buffer[:at])
                self._buffer = self._buffer[at:]
                break
            if self._buffer[after : after + 2] == b"--":
                self.closed = True
            else:
                self._in_headers = True
            out.append(self._buffer[:after])
            self._buffer = self._buffer[after:]
        if self.closed or final:
            out.append(self._buffer)
            self._buffer = b""
        data = b"".join(out)
        if self._skip:
            cut = min(self._skip, len(data))
            data, self._skip = data[cut:], self._skip - cut
        return data


def _rfc5987_filename(headers: bytes, charset: str) -> bytes:
    """A part's header lines, its Content-Disposition rewritten when it has ``filename*``."""
    lines = headers.split(b"\r\n")
    for i, line in enumerate(lines):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-disposition" and b"filename*" in value:
            lines[i] = _with_plain_filename(name, value, charset)
    return b"\r\n".join(lines)


def _with_plain_filename(name: bytes, value: bytes, charset: str) -> bytes:
    disposition, *params = _split_params(value.decode("latin-1"))
    extended = None
    kept = []
    for param in params:
        key = param.partition("=")[0].strip().lower()
        if key == "filename*":
            extended = param.partition("=")[2].strip()
        elif key != "filename":
            kept.append(param.strip())
    filename = _decode_ext_value(extended) if extended is not None else None
    if filename is None:  # not an RFC 5987 value: left as it came
        return name + b":" + value
    # Printable characters only (a CR or LF would end the header), quoted as the parser reads.
    text = "".join(c for c in filename if c.isprintable())
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    head = "; ".join([disposition.strip(), *kept]).encode("latin-1")
    return name + b": " + head + b'; filename="' + quoted.encode(charset, "replace") + b'"'


def _split_params(value: str) -> list[str]:
    """``form-data; name="a;b"; filename*=...`` split at the semicolons outside quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _decode_ext_value(value: str) -> str | None:
    """RFC 5987: ``charset'language'percent-encoded``, e.g. ``UTF-8''pr%C3%BCfung.csv``."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':  # quoted, though it should not be
        value = value[1:-1]
    charset, sep, rest = value.partition("'")
    _language, sep2, encoded = rest.partition("'")
    if not (sep and sep2 and charset):
        return None
    try:
        codecs.lookup(charset)
    except LookupError:
        return None
    return unquote(encoded, encoding=charset, errors="replace")
