"""The HTTP API's error shape, checked the same way by every test that expects one."""

from __future__ import annotations

import httpx


def assert_error(response: httpx.Response, status: int, code: str, says: str) -> str:
    """The response is Sluice's JSON error ``{"error": {"code", "message"}}`` with this status
    and code, and its message contains ``says`` (what the client is told to fix). Returns the
    message for further checks."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    assert says in message, message
    return message
