"""Who calls: every endpoint but the health checks (and, when configured, the metrics) needs
``Authorization: Bearer <token>`` with one of the API's tokens, or the dashboard's session
cookie holding one. The caller is known by the token's name (``SLUICE_API_TOKENS=name:token``;
``api`` for a token without one), which runs it starts record as ``requested_by``."""

from __future__ import annotations

import hmac
from typing import Annotated, cast

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sluice.api.errors import ApiError
from sluice.config import DEFAULT_TOKEN_NAME, ApiSettings
from sluice.web import SESSION_COOKIE

bearer = HTTPBearer(auto_error=False)


class ApiTokens:
    """The API's tokens by name; none configured: the API is open to anyone."""

    def __init__(self, settings: ApiSettings) -> None:
        self.named = [
            (t.name, t.secret.get_secret_value().encode()) for t in settings.named_tokens()
        ]
        self.secrets = [secret for _, secret in self.named]

    def name_of(self, given: bytes) -> str | None:
        """The name of the token ``given``, or None when it is none of them."""
        # compare_digest against every token, so the time taken says nothing about any of them
        matched = [name for name, secret in self.named if hmac.compare_digest(given, secret)]
        return matched[0] if matched else None

    def attach(self, app: FastAPI) -> None:
        app.state.tokens = self

    @staticmethod
    def of(request: Request) -> ApiTokens:
        return cast(ApiTokens, request.app.state.tokens)


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The name of the caller's token (``api`` when the API has none)."""
    tokens = ApiTokens.of(request)
    if not tokens.secrets:
        return DEFAULT_TOKEN_NAME
    # The dashboard's pages call the API with the session cookie set at sign-in.
    cookie = None if credentials else request.cookies.get(SESSION_COOKIE)
    given = (credentials.credentials if credentials else cookie or "").encode()
    name = tokens.name_of(given)
    if name is None:
        what = "wrong API token" if credentials or cookie else "missing API token"
        raise ApiError(
            401,
            "unauthorized",
            f"{what}: send the header 'Authorization: Bearer <token>'"
            " with a token from SLUICE_API_TOKEN (`sluice env` prints it)",
        )
    return name


Caller = Annotated[str, Depends(caller)]
"""A route's parameter: the caller's token name, once the token is checked."""
TOKEN_REQUIRED = [Depends(caller)]
"""A router's (or a route's) dependencies: a valid token, or 401."""
