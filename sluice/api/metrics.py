"""``/metrics`` in the Prometheus text format, and the count of every request the API answers.
Without a token only when ``SLUICE_API_PUBLIC_METRICS`` is true."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from sluice.api.deps import ApiState, ClientDep
from sluice.metrics import TEXT_FORMAT

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, client: ClientDep) -> PlainTextResponse:
    """Prometheus text format: runs queued and running, the outbox backlog, this process's
    requests. The pipeline's counters are the workers' (SLUICE_METRICS_PORT)."""
    api_metrics = ApiState.of(request).metrics
    runs = (await client.deps()).runs
    api_metrics.set_runs(await runs.count_active())
    api_metrics.outbox.set(await runs.count_unrelayed_events())
    return PlainTextResponse(api_metrics.render(), media_type=TEXT_FORMAT)


async def count_requests(request: Request, call_next: Any) -> Response:
    """Middleware (outermost): counts every answer, the 401s, 413s and 429s included. The
    route template (not the path) keeps the label values few."""
    status = 500
    try:
        response: Response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = getattr(request.scope.get("route"), "path", None) or "unmatched"
        ApiState.of(request).metrics.request_done(request.method, route, status)
