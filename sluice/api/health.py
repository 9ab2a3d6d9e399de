"""``/healthz`` and ``/readyz``: for load balancers and orchestrators, without a token unless
``SLUICE_API_PUBLIC_HEALTH`` is false."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from sluice.api.deps import ClientDep
from sluice.api.errors import ErrorResponse, error

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(client: ClientDep) -> JSONResponse:
    """The broker and the database are reachable."""
    try:
        pool = (await client.deps()).pool
        await pool.fetchval("SELECT 1")
        await client.producer()
    except Exception as exc:
        return error(503, "not_ready", f"broker or database unreachable: {exc}")
    return JSONResponse({"status": "ready"})
