"""The HTTP API, versioned under ``/api/v1``. OpenAPI at ``/api/v1/openapi.json``, interactive
docs at ``/api/v1/docs``.

Every endpoint but the health checks (and, when configured, the metrics) needs
``Authorization: Bearer <token>``; a run started through the API records the token's name
(``SLUICE_API_TOKENS=name:token``) as ``requested_by``. Errors are
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from fastapi import Body, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.agents.schedule import ScheduleInfo
from sluice.config import DEFAULT_TOKEN_NAME, Settings
from sluice.errors import (
    FileFormatError,
    FileTooLarge,
    ImporterNotFound,
    InvalidRequest,
    NoPullSource,
    NothingToRetry,
    RunNotCancellable,
    RunNotFound,
    SluiceError,
    SourceError,
    TransientError,
)
from sluice.metrics import TEXT_FORMAT, ApiMetrics
from sluice.ratelimit_http import RateLimitMiddleware, TokenBuckets
from sluice.request_body import BodyProblem, RequestBodyGuard
from sluice.schemas.firehose import DID_PATTERN, BackfillState, BackfillStatus
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from sluice.web import SESSION_COOKIE, create_web_router

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ItemStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class ItemState(BaseModel):
    external_id: str
    status: ItemStatus
    failure_count: int
    last_error: str | None
    last_failed_at: datetime | None
    completed_at: datetime | None
    metadata: dict[str, Any] = Field(description="the item as the list endpoint gave it")


class ItemPageResponse(BaseModel):
    data: list[ItemState]
    counts: dict[str, int]
    pagination: Pagination


class BackfillBody(BaseModel):
    dids: list[Annotated[str, Field(pattern=DID_PATTERN)]] = Field(
        min_length=1, max_length=10_000, description="did:plc:... or did:web:..."
    )
    collections: list[str] = Field(default=[], description="NSIDs; empty: all the repo has")
    reset: bool = False


class TriggerBody(BaseModel):
    """A trigger's parameters. Sources read the fields they know; others pass through."""

    model_config = ConfigDict(extra="allow")

    url: str | None = Field(default=None, description="URL sources: the file to fetch")
    file: str | None = Field(default=None, description="FTP/SFTP: a file name in the folder")
    pattern: str | None = Field(
        default=None, description="FTP/SFTP: a glob; the newest matching file is imported"
    )
    path: str | None = Field(default=None, description="filesystem: a path under the roots")
    dry_run: bool = False
    fresh: bool = Field(
        default=False,
        description="full refresh: once the run completed, delete the rows it did not contain",
    )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Pagination(BaseModel):
    page: int
    limit: int
    total: int
    totalPages: int


class RunPage(BaseModel):
    data: list[Run]
    pagination: Pagination


class FailedRow(BaseModel):
    row_number: int
    sub: int
    raw: Any
    reason: str


class FailedRowPage(BaseModel):
    data: list[FailedRow]
    pagination: Pagination


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 408, 409, 413, 415, 422, 429, 503)
}

# Not rate limited: load balancers and scrapers call these often, and they cost nothing.
UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics")
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


class UploadBodyLimit:
    """Counts the bytes of an upload's body as they arrive, and stops a body without a
    Content-Length (chunked) at the size limit, before more of it is spooled to disk."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        received = 0
        limit = self.limit

        async def counted() -> Message:
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

        await self.app(scope, counted, send)


def _page(page: int, limit: int, total: int) -> Pagination:
    return Pagination(page=page, limit=limit, total=total, totalPages=math.ceil(total / limit))


def create_api(settings: Settings) -> FastAPI:
    client = Client(settings)
    named = [(t.name, t.secret.get_secret_value().encode()) for t in settings.api.named_tokens()]
    tokens = [secret for _, secret in named]
    if not tokens:
        log.warning("no API token configured (SLUICE_API_TOKEN): the API is open to anyone")
    bearer = HTTPBearer(auto_error=False)

    # A default, not Annotated[...]: `bearer` is local, and annotations are strings here.
    async def authorized(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> str:
        """The name of the caller's token (``api`` when the API has none)."""
        if not tokens:
            return DEFAULT_TOKEN_NAME
        # The dashboard's pages call the API with the session cookie set at sign-in.
        cookie = None if credentials else request.cookies.get(SESSION_COOKIE)
        given = (credentials.credentials if credentials else cookie or "").encode()
        # compare_digest against every token, so the time taken says nothing about any of them
        matched = [name for name, secret in named if hmac.compare_digest(given, secret)]
        if not matched:
            what = "wrong API token" if credentials or cookie else "missing API token"
            raise ApiError(
                401,
                "unauthorized",
                f"{what}: send the header 'Authorization: Bearer <token>'"
                " with a token from SLUICE_API_TOKEN (`sluice env` prints it)",
            )
        return matched[0]

    auth = [Depends(authorized)]
    health_auth = [] if settings.api.public_health else auth
    metrics_auth = [] if settings.api.public_metrics else auth
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.close()

    app = FastAPI(
        title="Sluice",
        version="1",
        description="Import files into PostgreSQL through Kafka; follow and manage the runs.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
    )

    # Innermost: the routes read every body through it (timeouts, bodies cut short, RFC 5987
    # file names), and its errors reach the exception handlers unwrapped.
    app.add_middleware(RequestBodyGuard, timeout=settings.api.body_timeout)
    # Added before the middleware below, so it sits inside it: the route reads the body through
    # it directly, and its 413 reaches the exception handlers unwrapped.
    app.add_middleware(UploadBodyLimit, limit=settings.api.max_upload_bytes)

    @app.middleware("http")
    async def uploads_are_multipart(request: Request, call_next: Any) -> Response:
        # Checked before the body is parsed, so a JSON or raw body gets 415, not a 422 about
        # a missing field.
        if _is_upload(request.method, request.url.path):
            kind = request.headers.get("content-type", "")
            if not kind.startswith("multipart/form-data"):
                return error(
                    415,
                    "unsupported_media_type",
                    f"send the file as multipart/form-data with a field 'file' (got {kind!r})",
                )
            declared = request.headers.get("content-length", "")
            limit = settings.api.max_upload_bytes
            if declared.isdigit() and int(declared) > limit + MULTIPART_FRAMING:
                return error(
                    413,
                    "too_large",
                    f"the upload is {int(declared)} bytes; the limit is {limit} bytes "
                    "(SLUICE_API_MAX_UPLOAD_BYTES): split the file or raise the limit",
                )
        response: Response = await call_next(request)
        return response

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        # Outermost: counts every answer, the 401s, 413s and 429s included. The route template
        # (not the path) keeps the label values few.
        status = 500
        try:
            response: Response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            api_metrics.request_done(request.method, route, status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        response = error(exc.status, exc.code, exc.message)
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(SluiceError)
    async def sluice_error(request: Request, exc: SluiceError) -> JSONResponse:
        if isinstance(exc, (ImporterNotFound, RunNotFound)):
            return error(404, "not_found", str(exc))
        if isinstance(exc, (RunNotCancellable, NothingToRetry)):
            return error(409, "conflict", str(exc))
        if isinstance(exc, FileTooLarge):
            return error(413, "too_large", str(exc))
        if isinstance(exc, InvalidRequest):
            return error(400, "invalid_request", str(exc))
        if isinstance(exc, NoPullSource):
            return error(422, "no_pull_source", str(exc))
        if isinstance(exc, SourceError):
            return error(422, "source_refused", str(exc))
        if isinstance(exc, TransientError):
            return error(503, "unavailable", str(exc))
        return error(422, "unprocessable", str(exc))

    @app.exception_handler(FileFormatError)
    async def format_error(request: Request, exc: FileFormatError) -> JSONResponse:
        return error(422, "unprocessable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return error(422, "invalid_parameters", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = exc.code if isinstance(exc, BodyProblem) else codes.get(exc.status_code, "error")
        return error(exc.status_code, code, str(exc.detail))

    # ------------------------------------------------------------------ health and metrics

    @app.get("/healthz", dependencies=health_auth, tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        dependencies=health_auth,
        tags=["health"],
        responses={503: {"model": ErrorResponse}},
    )
    async def readyz() -> JSONResponse:
        """The broker and the database are reachable."""
        try:
            pool = (await client.deps()).pool
            await pool.fetchval("SELECT 1")
            await client.producer()
        except Exception as exc:
            return error(503, "not_ready", f"broker or database unreachable: {exc}")
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        dependencies=metrics_auth,
        tags=["health"],
        response_class=PlainTextResponse,
    )
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: runs queued and running, the outbox backlog, this process's
        requests. The pipeline's counters are the workers' (SLUICE_METRICS_PORT)."""
        runs = (await client.deps()).runs
        api_metrics.set_runs(await runs.count_active())
        api_metrics.outbox.set(await runs.count_unrelayed_events())
        return PlainTextResponse(api_metrics.render(), media_type=TEXT_FORMAT)

    # ------------------------------------------------------------------ importers and imports

    @app.get("/api/v1/importers", dependencies=auth, tags=["importers"])
    async def importers() -> dict[str, Any]:
        """The registered importers: table, key, policy, fields."""
        return {"data": [i.describe() for i in client.registry.all()]}

    @app.post(
        "/api/v1/imports/{slug}/upload",
        status_code=202,
        dependencies=auth,
        tags=["imports"],
        responses={200: {"model": Run, "description": "with ?wait=true: the finished run"}},
    )
    async def upload(
        slug: str,
        file: Annotated[UploadFile, File(description="the file to import")],
        dry_run: Annotated[bool, Form()] = False,
        fresh: Annotated[
            bool,
            Form(
                description="full refresh: once the run completed, delete the rows it did not "
                "contain"
            ),
        ] = False,
        wait: Annotated[bool, Query(description="answer when the run finishes")] = False,
        caller: str = Depends(authorized),
    ) -> Response:
        """Upload a file and start its import. The body is streamed to the file store."""
        if unsupported_type(file.content_type):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"the file is declared as {file.content_type!r}, which is not a format Sluice "
                "imports: upload delimited text (CSV, TSV, ...), JSON Lines or a JSON array "
                "(plain or gzip-compressed), an XLSX workbook or a Parquet file",
            )

        async def chunks() -> AsyncIterator[bytes]:
            while data := await file.read(1 << 20):
                yield data

        run = await client.submit_stream(
            slug,
            chunks(),
            name=safe_filename(file.filename),
            dry_run=dry_run,
            options={"fresh": True} if fresh else None,
            content_type=file.content_type,
            max_bytes=settings.api.max_upload_bytes,
            source="upload",
            requested_by=caller,
        )
        status = 202
        if wait:
            run = await client.wait(run.id, timeout=settings.api.wait_timeout)
            status = 200 if run.status.terminal else 202
        return Response(run.model_dump_json(), status_code=status, media_type="application/json")

    @app.post(
        "/api/v1/imports/{slug}/trigger",
        status_code=202,
        dependencies=auth,
        tags=["imports"],
        responses={200: {"model": Run, "description": "with ?wait=true: the finished run"}},
    )
    async def trigger(
        slug: str,
        body: Annotated[
            TriggerBody | None,
            Body(
                openapi_examples={
                    "url": {"value": {"url": "https://example.com/products.csv"}},
                    "ftp": {"value": {"pattern": "orders-*.csv"}},
                    "api": {"value": {"dry_run": True}},
                }
            ),
        ] = None,
        wait: Annotated[bool, Query(description="answer when the run finishes")] = False,
        caller: str = Depends(authorized),
    ) -> Response:
        """Start an import that pulls its data: a URL (``url``), an FTP/SFTP file (``file`` or
        ``pattern``), a file under the configured roots (``path``), or the importer's paginated
        API. Every other field is passed to the source as a parameter."""
        params = (body or TriggerBody()).model_dump(exclude_none=True)
        dry_run = bool(params.pop("dry_run", False))
        fresh = bool(params.pop("fresh", False))
        run = await client.trigger(
            slug,
            params,
            dry_run=dry_run,
            requested_by=caller,
            options={"fresh": True} if fresh else None,
        )
        status = 202
        if wait:
            run = await client.wait(run.id, timeout=settings.api.wait_timeout)
            status = 200 if run.status.terminal else 202
        return Response(run.model_dump_json(), status_code=status, media_type="application/json")

    # ------------------------------------------------------------------ runs

    @app.get("/api/v1/runs", dependencies=auth, tags=["runs"])
    async def list_runs(
        status: RunStatus | None = None,
        importer: str | None = None,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> RunPage:
        """Runs, newest first, with pagination."""
        runs = (await client.deps()).runs
        state = status.value if status else None
        total = await runs.count(status=state, importer=importer)
        data = await runs.list(
            status=state, importer=importer, limit=limit, offset=(page - 1) * limit
        )
        return RunPage(data=data, pagination=_page(page, limit, total))

    @app.get("/api/v1/runs/recent", dependencies=auth, tags=["runs"])
    async def recent_runs(limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, list[Run]]:
        """The latest runs."""
        return {"data": await client.list_runs(limit=limit)}

    @app.get("/api/v1/runs/{run_id}", dependencies=auth, tags=["runs"])
    async def get_run(run_id: uuid.UUID) -> Run:
        """One run: status, counters, times."""
        return await client.get_run(run_id)

    @app.post("/api/v1/runs/{run_id}/cancel", dependencies=auth, tags=["runs"])
    async def cancel_run(run_id: uuid.UUID) -> Run:
        """Stop a queued or running run (409 otherwise). Rows already applied stay."""
        return await client.cancel(run_id)

    @app.post("/api/v1/runs/{run_id}/retry", status_code=202, dependencies=auth, tags=["runs"])
    async def retry_run(
        run_id: uuid.UUID, dry_run: bool = False, caller: str = Depends(authorized)
    ) -> Run:
        """A child run with the rows this run rejected (409 when it rejected none)."""
        return await client.retry(run_id, dry_run=dry_run, requested_by=caller)

    @app.get(
        "/api/v1/runs/{run_id}/failed-rows",
        dependencies=auth,
        tags=["runs"],
        responses={200: {"content": {"text/csv": {}}, "model": FailedRowPage}},
    )
    async def failed_rows(
        run_id: uuid.UUID,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    ) -> Response:
        """The rejected rows with their reasons: paginated JSON, or all of them as CSV."""
        from sluice.service import failed_rows_csv

        await client.get_run(run_id)
        runs = (await client.deps()).runs
        if format == "csv":
            rows = await runs.failed_rows(run_id)
            out = io.StringIO()
            failed_rows_csv(rows, out)
            return Response(
                out.getvalue(),
                media_type="text/csv",
                headers={"Content-Disposition": f'attachment; filename="failed-{run_id}.csv"'},
            )
        total = await runs.count_failed_rows(run_id)
        rows = await runs.failed_rows(run_id, limit=limit, offset=(page - 1) * limit)
        body = FailedRowPage(
            data=[
                FailedRow(row_number=f.row_number, sub=f.sub, raw=f.raw, reason=f.reason)
                for f in rows
            ],
            pagination=_page(page, limit, total),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/api/v1/runs/{run_id}/items", dependencies=auth, tags=["runs"])
    async def run_items(
        run_id: uuid.UUID,
        status: ItemStatus | None = None,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ItemPageResponse:
        """The items of a paginated API run with their states, failures and last errors."""
        await client.get_run(run_id)
        repo = (await client.deps()).items
        counts = await repo.counts(run_id)
        state = status.value if status else None
        total = counts[state] if state else sum(counts.values())
        found = await repo.list(run_id, status=state, limit=limit, offset=(page - 1) * limit)
        return ItemPageResponse(
            data=[ItemState.model_validate(i) for i in found],
            counts=counts,
            pagination=_page(page, limit, total),
        )

    @app.get("/api/v1/schedules", dependencies=auth, tags=["importers"])
    async def list_schedules() -> dict[str, list[ScheduleInfo]]:
        """The importers' schedules: cron, paused or not, next and last scheduled time."""
        from sluice.agents.schedule import schedules

        found = await schedules(await client.deps())
        return {"data": found}

    @app.post("/api/v1/backfill", status_code=202, dependencies=auth, tags=["firehose"])
    async def queue_backfill(
        body: BackfillBody, caller: str = Depends(authorized)
    ) -> dict[str, list[str]]:
        """Queue the backfill of AT Protocol repositories for the workers. A backfill continues
        from its stored cursors; ``reset`` starts over."""
        dids = await client.backfill(
            body.dids, collections=body.collections, reset=body.reset, requested_by=caller
        )
        return {"queued": dids}

    @app.get("/api/v1/backfill", dependencies=auth, tags=["firehose"])
    async def backfill_status(
        did: str | None = None, status: BackfillStatus | None = None
    ) -> dict[str, list[BackfillState]]:
        """Backfill state per repository and collection."""
        from sluice.agents.firehose.backfill import Backfiller

        backfiller = Backfiller((await client.deps()).pool, settings.firehose, settings.url)
        try:
            states = await backfiller.states(did, status.value if status else None)
        finally:
            await backfiller.close()
        return {"data": states}

    @app.get(
        "/api/v1/runs/{run_id}/events",
        dependencies=auth,
        tags=["runs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def run_events(run_id: uuid.UUID, request: Request) -> StreamingResponse:
        """The run's lifecycle events as Server-Sent Events, from its first event (or after
        ``Last-Event-ID``); the stream ends after the run's final event."""
        await client.get_run(run_id)
        try:
            after = int(request.headers.get("last-event-id", "0"))
        except ValueError:
            after = 0
        runs = (await client.deps()).runs

        async def stream() -> AsyncIterator[bytes]:
            nonlocal after
            idle = 0.0
            while True:
                events = await runs.events(run_id, after=after)
                for event_id, payload in events:
                    after = event_id
                    yield (
                        f"id: {event_id}\nevent: {payload['type']}\n".encode()
                        + b"data: "
                        + orjson.dumps(payload)
                        + b"\n\n"
                    )
                    if payload["type"] in FINAL_EVENTS:
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)
                idle = 0.0 if events else idle + 0.25
                if idle >= 15:  # a comment keeps proxies from closing a quiet stream
                    idle = 0.0
                    yield b": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.include_router(create_web_router(settings, client, tokens, api_auth=auth))
    if settings.api.rate_limit > 0:
        # Added last, so it runs first: a flood is turned away before any other work.
        app.add_middleware(
            RateLimitMiddleware,
            buckets=TokenBuckets(settings.api.rate_limit, settings.api.rate_burst),
            tokens=tokens,
            exempt=UNLIMITED_PATHS,
            cookie=SESSION_COOKIE,
            hint=" (SLUICE_API_RATE_LIMIT, SLUICE_API_RATE_BURST)",
        )
    return app


FINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled"})
