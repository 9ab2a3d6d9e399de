"""The HTTP API's request rate limit: a token bucket per client, in the memory of each API process.

A client is its API token, known by the token's SHA-256 (the token text is never kept), or,
for a request without a valid token, its address. Each bucket holds up to ``burst`` requests and
refills at ``rate`` per second; a request that finds it empty is answered
``429 rate_limited`` with ``Retry-After``, before authentication or body parsing. Several API
processes each keep their own buckets: the limit is per process.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Collection, Sequence

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.api.errors import error_body

__all__ = ["RateLimitMiddleware", "TokenBuckets"]


class TokenBuckets:
    """Token buckets by key. ``take(key)`` spends one token and returns 0, or returns how many
    seconds until the next token when the bucket is empty.

    At most ``max_keys`` buckets are kept, least recently used first out: a client that was
    evicted starts again with a full bucket, which only matters under a flood of new keys.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        # key -> (tokens, time of that count); dict order is the order of last use
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def _digest(token: str | bytes) -> str:
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


class RateLimitMiddleware:
    """ASGI middleware that applies :class:`TokenBuckets` to every HTTP request but ``exempt``
    paths. ``tokens`` are the API's tokens; a request carries one as ``Authorization: Bearer``
    or in the cookie ``cookie``. With no tokens configured, every client is keyed by address."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        buckets: TokenBuckets,
        tokens: Sequence[bytes],
        exempt: Collection[str] = (),
        cookie: str = "",
        hint: str = "",
    ) -> None:
        self.app = app
        self.buckets = buckets
        self._known = [_digest(t) for t in tokens]
        self._exempt = frozenset(exempt)
        self._cookie = cookie
        self._hint = hint

    def client_key(self, scope: Scope) -> str:
        """``token:<sha256>`` for a valid token, else ``addr:<client address>``."""
        given = self._token(scope)
        if given and self._known:
            digest = _digest(given)
            # compare_digest with every token: the time taken says nothing about which matched
            match = False
            for known in self._known:
                match |= hmac.compare_digest(digest, known)
            if match:
                return f"token:{digest}"
        client = scope.get("client")
        return f"addr:{client[0] if client else 'unknown'}"

    def _token(self, scope: Scope) -> bytes | None:
        cookie_header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer" and credentials.strip():
                    return bytes(credentials.strip())
            elif name == b"cookie":
                cookie_header = value
        if cookie_header is not None and self._cookie:
            found = cookie_parser(cookie_header.decode("latin-1")).get(self._cookie)
            if found:
                return found.encode("utf-8", "surrogateescape")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(self.client_key(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        body = error_body(
            "rate_limited",
            f"too many requests: the limit is {self.buckets.rate:g} per second with bursts of "
            f"{self.buckets.burst} per API token (per address without one){self._hint}. "
            f"Retry after {retry_after} s",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
