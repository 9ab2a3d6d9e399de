"""The API's errors: every one is answered ``{"error": {"code": ..., "message": ...}}`` with
its status, whichever part of the app raised it.

- :class:`ApiError`: raised by the routes for what only HTTP knows (a missing token, a file
  type refused before it is stored);
- Sluice's own errors (:mod:`sluice.errors`): a status and a code by their type;
- FastAPI's and Starlette's: the request's invalid parameters, unknown paths, bodies refused
  by :mod:`sluice.api.body` (:class:`BodyProblem`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class BodyProblem(StarletteHTTPException):
    """A request body that cannot be used, answered with ``status`` and the error ``code``
    (raised by :mod:`sluice.api.body`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 408, 409, 413, 415, 422, 429, 503)
}
"""The error answers every operation may give, for the OpenAPI document."""

# Sluice's errors by type, the first that matches: (types, status, code). Any other is 422.
SLUICE_ERRORS: tuple[tuple[tuple[type[SluiceError], ...], int, str], ...] = (
    ((ImporterNotFound, RunNotFound), 404, "not_found"),
    ((RunNotCancellable, NothingToRetry), 409, "conflict"),
    ((FileTooLarge,), 413, "too_large"),
    ((InvalidRequest,), 400, "invalid_request"),
    ((NoPullSource,), 422, "no_pull_source"),
    ((SourceError,), 422, "source_refused"),
    ((TransientError,), 503, "unavailable"),
)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_content(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_content(code, message), status_code=status)


def error_body(code: str, message: str) -> bytes:
    """The body of an error answered without the app: by a middleware or the server."""
    return orjson.dumps(error_content(code, message))


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = error(exc.status, exc.code, exc.message)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def sluice_error(request: Request, exc: SluiceError) -> JSONResponse:
    for types, status, code in SLUICE_ERRORS:
        if isinstance(exc, types):
            return error(status, code, str(exc))
    return error(422, "unprocessable", str(exc))


async def format_error(request: Request, exc: FileFormatError) -> JSONResponse:
    return error(422, "unprocessable", str(exc))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return error(422, "invalid_parameters", "; ".join(parts) or "invalid request")


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = exc.code if isinstance(exc, BodyProblem) else HTTP_CODES.get(exc.status_code, "error")
    return error(exc.status_code, code, str(exc.detail))


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
HANDLERS: dict[int | type[Exception], Handler] = {
    ApiError: api_error,
    SluiceError: sluice_error,
    FileFormatError: format_error,
    RequestValidationError: validation_error,
    StarletteHTTPException: http_error,
}
"""The exception handlers of the app (``FastAPI(exception_handlers=HANDLERS)``)."""
