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
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape
from markupsafe import Markup

from sluice.config import Settings
from sluice.errors import RunNotFound
from sluice.schemas.formats import delimiter_name, reading_text
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client

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


@dataclass(frozen=True, slots=True)
class Pages:
    """What every page handler shares, built once per router so the templates and static files
    are read at start-up, not per request."""

    settings: Settings
    client: Client
    tokens: Sequence[bytes]
    static: dict[str, StaticFile]
    env: Environment
    provenance_fragment: Template

    @classmethod
    def build(cls, settings: Settings, client: Client, tokens: Sequence[bytes]) -> Pages:
        static = load_static()
        env = _environment(static)
        fragment = env.from_string(
            '{% from "_macros.html" import provenance_card %}{{ provenance_card(p) }}'
        )
        return cls(settings, client, tokens, static, env, fragment)

    def signed_in(self, request: Request) -> bool:
        """Without API tokens the API is open, and so are the pages."""
        return not self.tokens or token_matches(
            request.cookies.get(SESSION_COOKIE, ""), self.tokens
        )

    def render(
        self, name: str, section: str, *, http_status: int = 200, **context: Any
    ) -> HTMLResponse:
        html = self.env.get_template(name).render(
            section=section, can_sign_out=bool(self.tokens), **context
        )
        return HTMLResponse(html, status_code=http_status, headers=PAGE_HEADERS)


def create_web_router(settings: Settings, client: Client, tokens: Sequence[bytes]) -> APIRouter:
    """The pages under ``/ui``. ``tokens`` are the API's."""
    pages = Pages.build(settings, client, tokens)
    router = APIRouter(include_in_schema=False)
    _add_entry_routes(router, pages)
    _add_sign_in_routes(router, pages)
    _add_run_routes(router, pages)
    _add_upload_routes(router, pages)
    _add_importer_routes(router, pages)
    return router


def _to_login(request: Request) -> RedirectResponse:
    """Back to the page asked for once signed in."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(here, safe='/')}", status_code=303)


def _add_entry_routes(router: APIRouter, pages: Pages) -> None:
    @router.get("/")
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/ui")
    @router.get("/ui/")
    async def ui_home() -> RedirectResponse:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/ui/static/{name}")
    async def static_file(name: str) -> Response:
        found = pages.static.get(name)
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


def _sign_in_error(token: str) -> str:
    if token.strip():
        return (
            "That token is not valid. Use a token from SLUICE_API_TOKEN or SLUICE_API_TOKENS"
            " (`sluice env` prints it)."
        )
    return "Enter an API token."


def _set_session(response: Response, request: Request, token: str) -> None:
    """The cookie holds the token itself, so the API accepts the pages' ``fetch()`` calls."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _add_sign_in_routes(router: APIRouter, pages: Pages) -> None:
    tokens = pages.tokens

    @router.get("/ui/login", response_model=None)
    async def login_form(request: Request, next: str | None = None) -> Response:
        if tokens and pages.signed_in(request):
            return RedirectResponse(safe_next(next), status_code=303)
        return pages.render(
            "login.html", "login", next=safe_next(next), error=None, open=not tokens
        )

    @router.post("/ui/login", response_model=None)
    async def login(
        request: Request,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "",
    ) -> Response:
        if tokens and not token_matches(token.strip(), tokens):
            log.info("dashboard sign-in refused from %s", request.client)
            return pages.render(
                "login.html",
                "login",
                http_status=401,
                next=safe_next(next),
                error=_sign_in_error(token),
                open=False,
            )
        response = RedirectResponse(safe_next(next), status_code=303)
        if tokens:
            _set_session(response, request, token.strip())
        return response

    @router.get("/ui/logout")
    @router.post("/ui/logout")
    async def logout() -> RedirectResponse:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response


async def _runs_listing(
    client: Client, status: str | None, importer: str | None, page_number: int
) -> dict[str, Any]:
    """The runs page's context. An unknown status shows every run; an importer that is no
    longer registered stays selectable, so its old runs can still be found."""
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
    return {
        "runs": found,
        "status": state,
        "importer": importer,
        "importers": slugs,
        "page": number,
        "pages": max(1, math.ceil(total / RUNS_PER_PAGE)),
        "total": total,
        "data": {"status": state, "importer": importer, "page": number, "limit": RUNS_PER_PAGE},
    }


async def _find_run(client: Client, run_id: str) -> Run | None:
    """None for an id that is not a UUID as for one no run has."""
    try:
        return await client.get_run(uuid.UUID(run_id))
    except (ValueError, RunNotFound):
        return None


async def _parent_of(client: Client, run: Run) -> Run | None:
    """None as well when the parent was pruned."""
    if run.parent_run_id is None:
        return None
    try:
        return await client.get_run(run.parent_run_id)
    except RunNotFound:
        return None


async def _children_of(client: Client, run: Run) -> list[Run]:
    return await (await client.deps()).runs.children(run.id)


def _add_run_routes(router: APIRouter, pages: Pages) -> None:
    client = pages.client

    @router.get("/ui/runs", response_model=None)
    async def runs_page(
        request: Request,
        status: str | None = None,
        importer: str | None = None,
        page_number: Annotated[int, Query(alias="page")] = 1,
    ) -> Response:
        if not pages.signed_in(request):
            return _to_login(request)
        listing = await _runs_listing(client, status, importer, page_number)
        return pages.render("runs.html", "runs", **listing)

    @router.get("/ui/runs/{run_id}/provenance", response_model=None)
    async def run_provenance(request: Request, run_id: str) -> Response:
        """The run page's "What it read" card, for a page opened before the split read the
        file: 204 while the run has no provenance yet."""
        if not pages.signed_in(request):
            return Response(status_code=401)
        run = await _find_run(client, run_id)
        if run is None:
            return Response(status_code=404)
        if not run.provenance:
            return Response(status_code=204, headers=PAGE_HEADERS)
        html = pages.provenance_fragment.render(p=run.provenance)
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @router.get("/ui/runs/{run_id}", response_model=None)
    async def run_page(request: Request, run_id: str) -> Response:
        if not pages.signed_in(request):
            return _to_login(request)
        run = await _find_run(client, run_id)
        if run is None:
            return pages.render("missing.html", "runs", http_status=404, what=f"run {run_id}")
        parent = await _parent_of(client, run)
        children = await _children_of(client, run)
        return pages.render(
            "run.html",
            "runs",
            run=run,
            parent=parent,
            parent_id=run.parent_run_id,
            children=children,
            data={"run": run.model_dump(mode="json")},
        )


def _add_upload_routes(router: APIRouter, pages: Pages) -> None:
    @router.get("/ui/upload", response_model=None)
    async def upload_page(request: Request, importer: str | None = None) -> Response:
        if not pages.signed_in(request):
            return _to_login(request)
        choices = [i for i in pages.client.registry.all() if "upload" in i.sources]
        max_bytes = pages.settings.api.max_upload_bytes
        return pages.render(
            "upload.html",
            "upload",
            importers=choices,
            selected=importer,
            max_bytes=max_bytes,
            data={"max_bytes": max_bytes},
        )


async def _importers_with_schedules(client: Client) -> list[dict[str, Any]]:
    from sluice.agents.schedule import schedules

    by_slug = {s.importer: s for s in await schedules(await client.deps())}
    return [{**i.describe(), "schedule_state": by_slug.get(i.slug)} for i in client.registry.all()]


def _add_importer_routes(router: APIRouter, pages: Pages) -> None:
    @router.get("/ui/importers", response_model=None)
    async def importers_page(request: Request) -> Response:
        if not pages.signed_in(request):
            return _to_login(request)
        found = await _importers_with_schedules(pages.client)
        return pages.render("importers.html", "importers", importers=found)

    @router.get("/ui/backfill", response_model=None)
    async def backfill_page(
        request: Request, did: str | None = None, status: str | None = None
    ) -> Response:
        if not pages.signed_in(request):
            return _to_login(request)
        return pages.render(
            "backfill.html",
            "backfill",
            did=did or "",
            status=status or "",
            data={"did": did or None, "status": status or None},
        )
