"""The paginated API source's HTTP side: list pages and fetch item details under the cluster's
rate limit, retrying what may pass and never giving up on a 429. Every request and redirect
goes through the host policy of ``SLUICE_URL_*`` (``sluice.agents.fetch.guard``).

    ApiClient.list_page(state)   -> Page (items, next state, done)
    ApiClient.fetch_detail(id)   -> DetailResult (the detail, or why not this time)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from sluice.agents.fetch.base import Secrets, dig, secret
from sluice.agents.fetch.guard import GuardedClient, Origin, origin
from sluice.config import UrlSettings
from sluice.errors import SourceError, SourceUnavailable
from sluice.retries import Policy, retrying
from sluice.schemas.sources import ApiSource
from sluice.storage.ratelimit import RateLimiter, RateStats

log = logging.getLogger(__name__)


async def limited_get(
    http: GuardedClient,
    limiter: RateLimiter,
    limit: tuple[str, float, int],
    stats: RateStats,
    url: str | httpx.URL,
    **request: Any,
) -> httpx.Response:
    """One GET under the cluster's rate limit ``limit`` (key, per second, burst): where the
    pull sources' HTTP answers are classified. Returns an answer that is final (a success, or
    a 4xx that asking again cannot change); raises SourceUnavailable for what may pass (no
    answer, a timeout, a status that may pass: ``status`` set; a 429: ``retry_after`` set,
    and the source blocked for that long for the whole cluster) and SourceError when the host
    policy refuses the URL or a redirect (the classification is GuardedClient's)."""
    key, per_second, burst = limit
    await limiter.acquire(key, per_second, burst, stats)
    try:
        return await http.get(url, **request)
    except SourceUnavailable as exc:
        if exc.status == 429 and exc.retry_after is not None:
            stats.hits += 1
            await limiter.block(key, exc.retry_after)
        raise


def source_unavailable(exc: BaseException) -> bool:
    """What the pull sources' own retries ask again for (``retry_on``); anything else goes
    up to the agent's retries."""
    return isinstance(exc, SourceUnavailable)


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_state: dict[str, Any]
    done: bool


@dataclass
class DetailResult:
    """One attempt at an item's detail: the detail, or why not (``transient``: it may pass if
    asked again later; ``failures``: 1 when the source answered with a failure)."""

    detail: dict[str, Any] | None
    error: str | None = None
    failures: int = 0
    transient: bool = False


@dataclass
class ApiClient:
    """One per (worker, importer): keeps its connections between requests. The source's
    headers go only to the origin of its base URL; a redirect elsewhere gets none of them."""

    source: ApiSource
    limiter: RateLimiter
    secrets: Secrets
    policy: UrlSettings
    _http: GuardedClient | None = None
    _headers: dict[str, str] | None = None

    @property
    def base_url(self) -> str:
        url = self.source.base_url or secret(self.secrets, self.source.base_url_env, "API source")
        assert url is not None
        return url.rstrip("/")

    @property
    def limiter_key(self) -> str:
        return self.source.limiter_key or (urlsplit(self.base_url).netloc or self.base_url)

    def url(self, path: str) -> httpx.URL:
        """``path`` under the base URL (an absolute URL stays as it is, as with httpx)."""
        given = httpx.URL(path)
        if not given.is_relative_url:
            return given
        base = httpx.URL(self.base_url + "/")
        return base.copy_with(raw_path=base.raw_path + given.raw_path.lstrip(b"/"))

    def http(self) -> GuardedClient:
        if self._http is None:
            headers = dict(self.source.headers)
            for name, env in self.source.secret_headers.items():
                value = secret(self.secrets, env, f"header {name}")
                assert value is not None
                headers[name] = value
            self._headers = headers
            self._http = GuardedClient(
                self.policy,
                # The worker's pid in the User-Agent lets an API's operator (and our tests)
                # tell the workers of a cluster apart.
                headers={"User-Agent": f"sluice/0.1 pid/{os.getpid()}"},
                timeout=self.source.timeout,
                max_connections=max(4, self.source.concurrency),
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _get(
        self, path: str, stats: RateStats, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One GET under the rate limit (see ``limited_get``)."""
        rate = self.source.rate
        return await limited_get(
            self.http(),
            self.limiter,
            (self.limiter_key, rate.per_second, rate.burst),
            stats,
            self.url(path),
            params=params,
            headers=self._headers,
            trusted=self.base_url,
        )

    @property
    def retries(self) -> Policy:
        """Transient failures are asked again ``max_attempts`` times in all; a 429 waits its
        Retry-After and is asked again, forever."""
        return Policy(
            attempts=self.source.max_attempts,
            first=self.source.backoff,
            cap=self.source.backoff_max,
            retry_on=source_unavailable,
        )

    def first_state(self, since: Any = None) -> dict[str, Any]:
        """Where the listing starts; an incremental source's listing asks for what changed
        since ``since`` (None: everything)."""
        p = self.source.pagination
        state: dict[str, Any]
        if p.style == "page":
            state = {"page": 1 if p.start is None else p.start}
        elif p.style == "offset":
            state = {"offset": 0 if p.start is None else p.start}
        elif p.follows_urls:
            state = {"url": None}
        else:
            state = {"cursor": None}
        if self.source.incremental is not None:
            state.update(since=since, reached=since)
        return state

    async def list_page(self, state: dict[str, Any], stats: RateStats) -> Page:
        """The page at ``state`` (from ``first_state`` or a previous page's ``next_state``).
        SourceError when the answer is not a listing or names a next page on another host;
        SourceUnavailable after the retries."""
        p = self.source.pagination
        path, params = self._page_request(state)
        response = await self._get_ok(path, params, stats)
        body = _json(path, response)
        items = dig(body, self.source.items_path)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise SourceError(
                f"the list answer of {path} has no list of objects at "
                f"{self.source.items_path!r}; set ApiSource.items_path to where the items are"
            )
        done = not items or len(items) < p.size
        if p.style == "page":
            nxt: dict[str, Any] = {"page": state["page"] + 1}
        elif p.style == "offset":
            nxt = {"offset": state["offset"] + len(items)}
        elif p.follows_urls:
            url = self._next_url(path, response, body)
            nxt = {"url": url}
            done = not items or url is None
        else:
            cursor = dig(body, p.cursor_path)
            nxt = {"cursor": cursor}
            done = not items or cursor in (None, "")
        if self.source.incremental is not None:
            path_ = self.source.incremental.cursor_path
            nxt["since"] = state.get("since")
            nxt["reached"] = highest(state.get("reached"), (dig(i, path_) for i in items))
        if p.total_path is not None:
            total = dig(body, p.total_path)
            listed = state.get("listed", 0) + len(items)
            nxt["listed"] = listed
            if isinstance(total, int) and listed >= total:
                done = True
        return Page(items=items, next_state=nxt, done=done)

    def _page_request(self, state: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The path (or next page's URL) and query parameters of the page at ``state``."""
        p = self.source.pagination
        if p.follows_urls and state.get("url"):
            return state["url"], None  # the next URL carries its own query
        params: dict[str, Any] = dict(self.source.params)
        if p.size_param:
            params[p.size_param] = p.size
        if p.style == "page":
            params[p.param] = state["page"]
        elif p.style == "offset":
            params[p.param] = state["offset"]
        elif p.style == "cursor" and state.get("cursor") is not None:
            params[p.param] = state["cursor"]
        incremental = self.source.incremental
        if incremental is not None and state.get("since") is not None:
            since = state["since"]
            params[incremental.param] = since if isinstance(since, str) else str(since)
        return self.source.list_path, params

    def _next_url(self, path: str, response: httpx.Response, body: Any) -> str | None:
        """The next page's absolute URL named by the answer, or None on the last page.
        SourceError when it is not a URL, or not on the source's own host."""
        p = self.source.pagination
        if p.style == "next_url":
            given = dig(body, p.next_path)
            where = f"at {p.next_path!r} of the answer"
        else:
            given = response.links.get("next", {}).get("url")
            where = 'in its Link: rel="next" header'
        if given in (None, ""):
            return None
        if not isinstance(given, str):
            raise SourceError(
                f"GET {path}: the next page's URL {where} is {given!r}, not a URL; set "
                "Pagination.next_path to where the answer has it"
            )
        try:
            url = response.url.join(given)
        except httpx.InvalidURL as exc:
            raise SourceError(f"GET {path}: the next page's URL {given!r} {where}: {exc}") from None
        own = origin(httpx.URL(self.base_url))
        if origin(url) != own:
            raise SourceError(
                f"GET {path}: the next page's URL {where} is {url}, on "
                f"{_spelled(origin(url))}, not on the source's own host {_spelled(own)}; the "
                "listing was stopped there. If the API really pages through another host, "
                "make that host the importer's ApiSource.base_url"
            )
        if url == response.url:
            raise SourceError(
                f"GET {path}: the next page's URL {where} is the page itself ({url}); the "
                "listing would never end"
            )
        return str(url)

    async def _get_ok(
        self, path: str, params: dict[str, Any] | None, stats: RateStats
    ) -> httpx.Response:
        """A successful answer to GET ``path``, with the retries; SourceError for a final
        failure, SourceUnavailable when the retries ran out."""

        async def get() -> httpx.Response:
            try:
                return await self._get(path, stats, params)
            except SourceError as exc:
                raise SourceError(f"GET {path}: {exc}") from exc

        try:
            response = await retrying(f"GET {path}", get, self.retries)
        except SourceUnavailable as exc:
            reason = f"HTTP {exc.status}" if exc.status is not None else str(exc)
            raise SourceUnavailable(
                f"GET {path} failed {self.source.max_attempts} times, last with {reason}"
            ) from exc
        if not response.is_success:
            raise SourceError(
                f"GET {path} answered HTTP {response.status_code}; check the "
                "importer's ApiSource settings and credentials"
            )
        return response

    async def fetch_detail(self, external_id: str, stats: RateStats) -> DetailResult:
        """One attempt at the item's detail. A 429 is not the item's: the source is blocked for
        the cluster and the item asked again after the wait. A failure that may pass (a 5xx, a
        timeout) comes back ``transient``, for the caller to reschedule without holding other
        items; a 4xx, a refused host or an answer without the detail is final."""
        assert self.source.detail_path is not None
        path = self.source.detail_path.format(id=external_id)
        result = DetailResult(detail=None)
        while True:
            try:
                response = await self._get(path, stats)
                break
            except SourceUnavailable as exc:
                if exc.retry_after is not None:
                    continue  # a 429: limited_get has blocked the source for its Retry-After
                result.failures, result.transient = 1, True
                result.error = (
                    f"GET {path} answered HTTP {exc.status}"
                    if exc.status is not None
                    else f"GET {path}: {exc}"
                )
                return result
            except SourceError as exc:
                # A refused host or redirect: asking again cannot help.
                result.failures = 1
                result.error = f"GET {path}: {exc}"
                return result
        if not response.is_success:
            result.failures = 1
            result.error = f"GET {path} answered HTTP {response.status_code}"
            return result
        try:
            body = response.json()
        except ValueError as exc:
            result.error = f"GET {path} answered with invalid JSON: {exc}"
            return result
        detail = dig(body, self.source.detail_data_path)
        if not isinstance(detail, dict):
            result.error = (
                f"GET {path}: no object at {self.source.detail_data_path!r} in the "
                "answer; set ApiSource.detail_data_path"
            )
            return result
        result.detail = detail
        return result


def highest(start: Any, values: Iterable[Any]) -> Any:
    """The highest of ``start`` and ``values`` as cursors (None and missing values left out):
    numbers as numbers, ISO 8601 times as times (UTC when they name no offset), other strings
    as strings. SourceError for a value that is none of these, or cursors of two kinds."""
    best, best_key = start, None if start is None else _cursor_key(start)
    for value in values:
        if value is None:
            continue
        key = _cursor_key(value)
        if best_key is not None and key[0] != best_key[0]:
            raise SourceError(
                f"the cursor values {best!r} and {value!r} are not of one kind (numbers, ISO "
                "8601 times or strings); check Incremental.cursor_path"
            )
        if best_key is None or key > best_key:
            best, best_key = value, key
    return best


def _cursor_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return (2, value)
        return (1, moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    raise SourceError(
        f"the cursor value {value!r} is not a number, an ISO 8601 time or a string; check "
        "Incremental.cursor_path"
    )


def _json(path: str, response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise SourceError(f"GET {path} answered with invalid JSON: {exc}") from None


def _spelled(where: Origin) -> str:
    """scheme://host:port of an origin (the default port spelled out)."""
    scheme, host, port = where
    return f"{scheme}://{host.decode()}:{port}"


class ApiClients:
    """One ApiClient per API importer and process, all under the cluster's rate limiter."""

    def __init__(self, limiter: RateLimiter, secrets: Secrets, policy: UrlSettings) -> None:
        self.limiter = limiter
        self.secrets = secrets
        self.policy = policy
        self._clients: dict[str, ApiClient] = {}

    def get(self, slug: str, source: ApiSource) -> ApiClient:
        client = self._clients.get(slug)
        if client is None:
            client = self._clients[slug] = ApiClient(
                source, self.limiter, self.secrets, self.policy
            )
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
