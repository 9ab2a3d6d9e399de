"""What an upload (``POST /api/v1/imports/{slug}/upload``) must be before it is stored:
multipart, within ``SLUICE_API_MAX_UPLOAD_BYTES`` (declared or counted as it arrives), of a
type Sluice may read; and the name it is stored under."""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.errors import error

# Room for the multipart framing around the file, on top of SLUICE_API_MAX_UPLOAD_BYTES.
MULTIPART_FRAMING = 65536
# Declared types of files that are surely not delimited text, JSON, XLSX or Parquet: refused
# with 415 before they are stored. Anything else (text/*, JSON, gzip, octet-stream, the XLSX
# type, none) is judged by its bytes.
_BINARY_TYPES = ("image/", "audio/", "video/", "font/", "model/")
_BINARY_SUBTYPES = frozenset(
    {
        "application/pdf",
        "application/zip",
        "application/x-zip-compressed",
        "application/x-7z-compressed",
        "application/x-rar-compressed",
        "application/vnd.rar",
        "application/x-tar",
        "application/x-bzip2",
        "application/x-xz",
        "application/zstd",
        "application/x-msdownload",
        "application/x-executable",
        "application/x-sharedlib",
        "application/java-archive",
        "application/msword",
        "application/wasm",
    }
)
_XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_MAX_NAME_CHARS = 255


def safe_filename(name: str | None) -> str:
    """The name an upload is stored under: its last path component (``../../etc/passwd`` is
    ``passwd``, ``a\\b.csv`` is ``b.csv``) without control characters, at most 255 characters.
    The name is only ever a label: no file is created with it."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    if base in ("", ".", ".."):
        return "upload"
    return base[:_MAX_NAME_CHARS]


def unsupported_type(content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.startswith(_BINARY_TYPES) or kind in _BINARY_SUBTYPES:
        return True
    if kind == _XLSX_TYPE:
        return False
    # Other office documents (docx, pptx, ods, odt, ...), but not the .csv that Windows labels
    # application/vnd.ms-excel (an .xls declared so is refused by its bytes, with a fix).
    return kind.startswith(("application/vnd.openxmlformats", "application/vnd.oasis"))


def _is_upload(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/api/v1/imports/") and path.endswith("/upload")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers, the first of each name (as Starlette's ``Headers.get``)."""
    found: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        found.setdefault(name.lower(), value)
    return found


class UploadGuard:
    """An upload that is not multipart is answered 415, and one that declares a length over
    the limit 413, before its body is read. A body without a Content-Length (chunked) is
    counted as it arrives and stopped at the limit, before more of it is spooled to disk."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        refusal = self.refuse_head(_headers(scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self.counted(receive), send)

    def refuse_head(self, headers: dict[bytes, bytes]) -> ASGIApp | None:
        # Checked before the body is parsed, so a JSON or raw body gets 415, not a 422 about
        # a missing field.
        kind = headers.get(b"content-type", b"").decode("latin-1")
        if not kind.startswith("multipart/form-data"):
            return error(
                415,
                "unsupported_media_type",
                f"send the file as multipart/form-data with a field 'file' (got {kind!r})",
            )
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit + MULTIPART_FRAMING:
            return error(
                413,
                "too_large",
                f"the upload is {int(declared)} bytes; the limit is {self.limit} bytes "
                "(SLUICE_API_MAX_UPLOAD_BYTES): split the file or raise the limit",
            )
        return None

    def counted(self, receive: Receive) -> Receive:
        received = 0
        limit = self.limit

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit + MULTIPART_FRAMING:
                    # FastAPI passes its HTTPException raised while the body is parsed on
                    # to the exception handlers (any other error becomes a 400).
                    raise HTTPException(
                        413,
                        f"the upload is over the limit of {limit} bytes "
                        "(SLUICE_API_MAX_UPLOAD_BYTES): split the file or raise the limit",
                    )
            return message

        return counting
