"""The dashboard's pages: server-rendered HTML (Jinja2) with a little JavaScript that follows
runs live through Server-Sent Events and calls the JSON API for actions.

A page requested without a valid session cookie redirects to ``/ui/login``. The cookie holds
the API token itself (HttpOnly, SameSite=Strict, Secure behind https), so the API's own check
accepts the pages' ``fetch()`` calls; the token is only ever sent in a POST body or the cookie,
never in a URL.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from sluice.config import Settings
from sluice.errors import RunNotFound
from sluice.schemas.formats import delimiter_name, reading_text
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from sluice.storage.runs import RUN_COLUMNS, run_from_record

log = logging.getLogger(__name__)

SESSION_COOKIE = "sluice_session"
HERE = Path(__file__).resolve().parent
RUNS_PER_PAGE = 50

# No inline script or style: the pages' data travels in <script type="application/json">.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    media_type: str
    version: str


def load_static(folder: Path = HERE / "static") -> dict[str, StaticFile]:
    """The stylesheets and scripts, read once; each URL carries its content hash, so browsers
    may cache it for good."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in STATIC_TYPES:
            body = path.read_bytes()
            version = hashlib.sha256(body).hexdigest()[:12]
            found[path.name] = StaticFile(body, STATIC_TYPES[path.suffix], version)
    return found


def token_matches(given: str, tokens: Sequence[bytes]) -> bool:
    """Constant time against every token, like the API's own check."""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token)
    return ok


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path, never another site."""
    if target and target.startswith("/ui/") and not target.startswith("/ui//"):
        return target
    return "/ui/runs"


def rows_per_second(run: Run, now: datetime | None = None) -> float | None:
    """Average rate since the run started (until it finished)."""
    if run.started_at is None or not run.processed_rows:
        return None
    seconds = ((run.completed_at or now or datetime.now(UTC)) - run.started_at).total_seconds()
    return run.processed_rows / seconds if seconds > 0 else None


def _num(value: int | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value < 100:  # rates: one decimal below 100
        return f"{value:,.1f}"
    return f"{round(value):,}"


def _time(value: datetime | None, short: bool = False) -> Markup:
    """A <time> the scripts show in the reader's time zone (``short``: the time of day when it
    is today, else the date); UTC without them."""
    if value is None:
        return Markup("—")
    utc = value.astimezone(UTC)
    return Markup('<time datetime="{}"{}>{} UTC</time>').format(
        utc.isoformat(),
        Markup(' class="short"') if short else "",
        utc.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _duration(run: Run) -> str:
    if run.started_at is None:
        return "—"
    seconds = ((run.completed_at or datetime.now(UTC)) - run.started_at).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _environment(static: dict[str, StaticFile]) -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def static_url(name: str) -> str:
        return f"/ui/static/{name}?v={static[name].version}"

    env.globals.update(static=static_url, statuses=[s.value for s in RunStatus])
    env.filters.update(
        num=_num,
        time=_time,
        duration=_duration,
        rate=rows_per_second,
        delimiter=delimiter_name,
        reading=reading_text,
    )
    return env


def create_web_router(settings: Settings, client: Client, tokens: Sequence[bytes]) -> APIRouter:
    """The pages under ``/ui``. ``tokens`` are the API's."""
    static = load_static()
    env = _environment(static)
    router = APIRouter(include_in_schema=False)

    def signed_in(request: Request) -> bool:
        return not tokens or token_matches(request.cookies.get(SESSION_COOKIE, ""), tokens)

    def to_login(request: Request) -> RedirectResponse:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(here, safe='/')}", status_code=303)

    def page(name: str, section: str, *, http_status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(section=section, can_sign_out=bool(tokens), **context)
        return HTMLResponse(html, status_code=http_status, headers=PAGE_HEADERS)

    @router.get("/")
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/ui")
    @router.get("/ui/")
    async def ui_home() -> RedirectResponse:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/ui/static/{name}")
    async def static_file(name: str) -> Response:
        found = static.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            found.body,
            media_type=found.media_type,
            headers={
                "Cache-Control": "public, max-age=31536000, immutable",
                "X-Content-Type-Options": "nosniff",
            },
        )

    # ------------------------------------------------------------------ sign-in

    @router.get("/ui/login", response_model=None)
    async def login_form(request: Request, next: str | None = None) -> Response:
        if tokens and signed_in(request):
            return RedirectResponse(safe_next(next), status_code=303)
        return page("login.html", "login", next=safe_next(next), error=None, open=not tokens)

    @router.post("/ui/login", response_model=None)
    async def login(
        request: Request,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "",
    ) -> Response:
        if tokens and not token_matches(token.strip(), tokens):
            log.info("dashboard sign-in refused from %s", request.client)
            error = (
                "That token is not valid. Use a token from SLUICE_API_TOKEN or SLUICE_API_TOKENS"
                " (`sluice env` prints it)."
                if token.strip()
                else "Enter an API token."
            )
            return page(
                "login.html",
                "login",
                http_status=401,
                next=safe_next(next),
                error=error,
                open=False,
            )
        response = RedirectResponse(safe_next(next), status_code=303)
        if tokens:
            response.set_cookie(
                SESSION_COOKIE,
                token.strip(),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    @router.get("/ui/logout")
    @router.post("/ui/logout")
    async def logout() -> RedirectResponse:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ runs

    @router.get("/ui/runs", response_model=None)
    async def runs_page(
        request: Request,
        status: str | None = None,
        importer: str | None = None,
        page_number: Annotated[int, Query(alias="page")] = 1,
    ) -> Response:
        if not signed_in(request):
            return to_login(request)
        state = status if status in {s.value for s in RunStatus} else None
        importer = importer or None
        number = max(1, min(page_number, 1_000_000))
        total = await client.count_runs(status=state, importer=importer)
        found = await client.list_runs(
            status=state,
            importer=importer,
            limit=RUNS_PER_PAGE,
            offset=(number - 1) * RUNS_PER_PAGE,
        )
        slugs = [i.slug for i in client.registry.all()]
        if importer and importer not in slugs:
            slugs.insert(0, importer)
        return page(
            "runs.html",
            "runs",
            runs=found,
            status=state,
            importer=importer,
            importers=slugs,
            page=number,
            pages=max(1, math.ceil(total / RUNS_PER_PAGE)),
            total=total,
            data={"status": state, "importer": importer, "page": number, "limit": RUNS_PER_PAGE},
        )

    provenance_fragment = env.from_string(
        '{% from "_macros.html" import provenance_card %}{{ provenance_card(p) }}'
    )

    @router.get("/ui/runs/{run_id}/provenance", response_model=None)
    async def run_provenance(request: Request, run_id: str) -> Response:
        """The run page's "What it read" card, for a page opened before the split read the
        file: 204 while the run has no provenance yet."""
        if not signed_in(request):
            return Response(status_code=401)
        try:
            run = await client.get_run(uuid.UUID(run_id))
        except (ValueError, RunNotFound):
            return Response(status_code=404)
        if not run.provenance:
            return Response(status_code=204, headers=PAGE_HEADERS)
        html = provenance_fragment.render(p=run.provenance)
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @router.get("/ui/runs/{run_id}", response_model=None)
    async def run_page(request: Request, run_id: str) -> Response:
        if not signed_in(request):
            return to_login(request)
        try:
            run = await client.get_run(uuid.UUID(run_id))
        except (ValueError, RunNotFound):
            return page("missing.html", "runs", http_status=404, what=f"run {run_id}")
        parent = None
        if run.parent_run_id is not None:
            try:
                parent = await client.get_run(run.parent_run_id)
            except RunNotFound:  # pruned
                parent = None
        pool = (await client.deps()).pool
        children = [
            run_from_record(r)
            for r in await pool.fetch(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE parent_run_id = $1 ORDER BY queued_at",
                run.id,
            )
        ]
        return page(
            "run.html",
            "runs",
            run=run,
            parent=parent,
            parent_id=run.parent_run_id,
            children=children,
            data={"run": run.model_dump(mode="json")},
        )

    # ------------------------------------------------------------------ upload

    @router.get("/ui/upload", response_model=None)
    async def upload_page(request: Request, importer: str | None = None) -> Response:
        if not signed_in(request):
            return to_login(request)
        choices = [i for i in client.registry.all() if "upload" in i.sources]
        return page(
            "upload.html",
            "upload",
            importers=choices,
            selected=importer,
            max_bytes=settings.api.max_upload_bytes,
            data={"max_bytes": settings.api.max_upload_bytes},
        )

    # ------------------------------------------------------------------ importers, backfill

    @router.get("/ui/importers", response_model=None)
    async def importers_page(request: Request) -> Response:
        if not signed_in(request):
            return to_login(request)
        from sluice.agents.schedule import schedules

        by_slug = {s.importer: s for s in await schedules(await client.deps())}
        found = [
            {**i.describe(), "schedule_state": by_slug.get(i.slug)} for i in client.registry.all()
        ]
        return page("importers.html", "importers", importers=found)

    @router.get("/ui/backfill", response_model=None)
    async def backfill_page(
        request: Request, did: str | None = None, status: str | None = None
    ) -> Response:
        if not signed_in(request):
            return to_login(request)
        return page(
            "backfill.html",
            "backfill",
            did=did or "",
            status=status or "",
            data={"did": did or None, "status": status or None},
        )

    return router
