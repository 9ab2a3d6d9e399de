"""The web dashboard: server-rendered pages under ``/ui`` (runs, run detail, upload, importers,
backfill). They follow runs live through the API's lifecycle streams (``GET /api/v1/events``,
``GET /api/v1/runs/{run_id}/events``: :mod:`sluice.api.events`).

Sign-in stores the API token in the HttpOnly cookie ``sluice_session``; the API accepts it in
place of the bearer header, so the pages' ``fetch()`` calls go to the same endpoints as any
other client.
"""

from sluice.web.pages import SESSION_COOKIE, create_web_router

__all__ = ["SESSION_COOKIE", "create_web_router"]
