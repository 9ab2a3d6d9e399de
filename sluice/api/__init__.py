"""The HTTP API, versioned under ``/api/v1``. OpenAPI at ``/api/v1/openapi.json``, interactive
docs at ``/api/v1/docs``.

Every endpoint but the health checks (and, when configured, the metrics) needs
``Authorization: Bearer <token>``; a run started through the API records the token's name
(``SLUICE_API_TOKENS=name:token``) as ``requested_by``. Errors are
``{"error": {"code": ..., "message": ...}}``.

One module per resource, each with its ``APIRouter``: ``imports`` (importers, uploads,
triggers), ``runs``, ``schedules``, ``backfill``, ``events`` (Server-Sent Events), ``health``
and ``metrics``; beside them ``auth`` (the token check and the caller's name), ``errors`` (the
error body and the exception handlers), ``deps`` (what the routes receive: settings, the
service client), ``models`` (the bodies), ``uploads``, ``body``, ``ratelimit`` (the middleware)
and ``server`` (uvicorn's connections, and serving the app). ``app.create_api`` wires them.
"""

from sluice.api.app import create_api

__all__ = ["create_api"]
