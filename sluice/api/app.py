"""The app: the resources' routers, the middleware around them and the error handlers, wired
once for the settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.base import BaseHTTPMiddleware

from sluice.api import backfill, events, health, imports, metrics, runs, schedules
from sluice.api.auth import TOKEN_REQUIRED, ApiTokens
from sluice.api.body import RequestBodyGuard
from sluice.api.deps import ApiState
from sluice.api.errors import ERRORS, HANDLERS
from sluice.api.ratelimit import RateLimitMiddleware, TokenBuckets
from sluice.api.uploads import UploadGuard
from sluice.config import Settings
from sluice.errors import DatabaseUnavailable
from sluice.metrics import ApiMetrics
from sluice.service import Client
from sluice.storage.db import migrate_database
from sluice.web import SESSION_COOKIE, create_web_router

log = logging.getLogger(__name__)

# Not rate limited: load balancers and scrapers call these often, and they cost nothing.
UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics")


def create_api(settings: Settings) -> FastAPI:
    client = Client(settings)
    tokens = ApiTokens(settings.api)
    if not tokens.secrets:
        log.warning("no API token configured (SLUICE_API_TOKEN): the API is open to anyone")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The API may start before any worker: it brings the database's tables up to date
        # itself (idempotent, one migrator at a time), so its first upload finds them.
        try:
            await migrate_database(settings.database_url, settings.database.schemas)
        except (OSError, DatabaseUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not migrate the database at start (%s); /readyz says so", exc)
        yield
        await client.close()

    app = FastAPI(
        title="Sluice",
        version="1",
        description="Import files into PostgreSQL through Kafka; follow and manage the runs.",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # served below from the package: the docs work without internet
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
        exception_handlers=HANDLERS,
    )
    ApiState(settings=settings, client=client, metrics=ApiMetrics()).attach(app)
    tokens.attach(app)
    _add_middleware(app, settings, tokens)

    app.include_router(health.router, dependencies=_unless(settings.api.public_health))
    app.include_router(metrics.router, dependencies=_unless(settings.api.public_metrics))
    for resource in (imports, runs, schedules, backfill, events):
        app.include_router(resource.router)
    app.include_router(create_web_router(settings, client, tokens.secrets))
    _serve_docs(app)
    return app


DOCS = "/api/v1/docs"


def _serve_docs(app: FastAPI) -> None:
    """The Swagger UI at ``/api/v1/docs``, its script and styles from the ``fastapi-offline``
    package (FastAPI's default loads them from a CDN, which a server without internet, or a
    browser behind a strict proxy, cannot reach)."""
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(f"{DOCS}/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/api/v1/openapi.json",
            title="Sluice API",
            swagger_js_url=f"{DOCS}/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS}/assets/swagger-ui.css",
            swagger_favicon_url="data:,",  # no icon rather than one from another site
        )


def _unless(public: bool) -> list[Any]:
    """The dependencies of endpoints that may be public: none when they are."""
    return [] if public else list(TOKEN_REQUIRED)


def _add_middleware(app: FastAPI, settings: Settings, tokens: ApiTokens) -> None:
    """The last added runs first."""
    # Innermost: the routes read every body through it (timeouts, bodies cut short, RFC 5987
    # file names), and its errors reach the exception handlers unwrapped.
    app.add_middleware(RequestBodyGuard, timeout=settings.api.body_timeout)
    # Inside the middleware below, so the route reads the body through it directly, and its
    # 413 reaches the exception handlers unwrapped.
    app.add_middleware(UploadGuard, limit=settings.api.max_upload_bytes)
    app.add_middleware(BaseHTTPMiddleware, dispatch=metrics.count_requests)
    if settings.api.rate_limit > 0:
        # Added last, so it runs first: a flood is turned away before any other work.
        app.add_middleware(
            RateLimitMiddleware,
            buckets=TokenBuckets(settings.api.rate_limit, settings.api.rate_burst),
            tokens=tokens.secrets,
            exempt=UNLIMITED_PATHS,
            cookie=SESSION_COOKIE,
            hint=" (SLUICE_API_RATE_LIMIT, SLUICE_API_RATE_BURST)",
        )
