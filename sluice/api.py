"""The HTTP API, versioned under ``/api/v1``. OpenAPI at ``/api/v1/openapi.json``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from schemas.runs import Run
from sluice.client import Client
from sluice.config import Settings
from sluice.errors import (
    FileTooLarge,
    ImporterNotFound,
    InvalidRequest,
    NothingToRetry,
    RunNotCancellable,
    RunNotFound,
    SluiceError,
)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_api(settings: Settings) -> FastAPI:
    client = Client(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.close()

    app = FastAPI(
        title="Sluice",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        lifespan=lifespan,
    )

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
        return error(422, "unprocessable", str(exc))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            pool = await client.rt.pool()
            await pool.fetchval("SELECT 1")
            await client.producer()
        except Exception as exc:
            return error(503, "not_ready", f"broker or database unreachable: {exc}")
        return JSONResponse({"status": "ready"})

    @app.get("/api/v1/importers")
    async def importers() -> dict[str, Any]:
        return {"data": [i.describe() for i in client.rt.registry.all()]}

    @app.post("/api/v1/imports/{slug}/upload", status_code=202)
    async def upload(slug: str, file: UploadFile = File(...), dry_run: bool = Form(False)) -> Run:
        async def chunks() -> AsyncIterator[bytes]:
            while data := await file.read(1 << 20):
                yield data

        return await client.submit_stream(
            slug,
            chunks(),
            name=(file.filename or "upload").replace("/", "_").replace("\\", "_"),
            dry_run=dry_run,
            content_type=file.content_type,
            max_bytes=settings.api.max_upload_bytes,
            source="upload",
        )

    @app.get("/api/v1/runs/{run_id}")
    async def get_run(run_id: uuid.UUID) -> Run:
        return await client.get_run(run_id)

    @app.post("/api/v1/runs/{run_id}/cancel")
    async def cancel_run(run_id: uuid.UUID) -> Run:
        return await client.cancel(run_id)

    @app.post("/api/v1/runs/{run_id}/retry", status_code=202)
    async def retry_run(run_id: uuid.UUID, dry_run: bool = False) -> Run:
        return await client.retry(run_id, dry_run=dry_run)

    return app
