"""The API source's list side over a real local server: every pagination style lists every
item once, a next page's URL is followed (relative or absolute, from the body or the Link
header) only on the source's own host, and a misconfigured listing says what to set."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sluice.agents.fetch.api import ApiClient
from sluice.config import UrlSettings
from sluice.errors import SourceError
from sluice.schemas.sources import ApiSource, Pagination
from sluice.storage.db import create_pool
from sluice.storage.ratelimit import RateLimiter, RateStats
from tests.conftest import Stack, unique
from tests.support.importers import api_importer
from tests.support.servers.paginated_api import FakeApi

LOOPBACK = UrlSettings(allow_private=True)

STYLES = {
    "page": Pagination(style="page", param="page", size_param="per_page", size=40),
    "offset": Pagination(style="offset", param="offset", size_param="limit", size=40),
    "cursor": Pagination(
        style="cursor", param="cursor", size_param="limit", size=40, cursor_path="meta.next_cursor"
    ),
    "next_url": Pagination(
        style="next_url", next_path="next_page_url", size_param="limit", size=40
    ),
    "link_header": Pagination(style="link_header", size_param="limit", size=40),
}


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack.postgres.url, max_size=2)
    yield pool
    await pool.close()


def client(pool: asyncpg.Pool, base_url: str, pagination: Pagination) -> ApiClient:
    """The test importers' source of the fake API, on this server and paged by ``pagination``."""
    pull = api_importer("t_pages", per_second=500, burst=50, pagination=pagination).pull
    assert isinstance(pull, ApiSource)
    source = dataclasses.replace(
        pull, base_url=base_url, limiter_key=unique("pages"), max_attempts=2, backoff=0.01
    )
    return ApiClient(source, RateLimiter(pool), {}, LOOPBACK)


async def list_all(api: ApiClient) -> tuple[list[str], list[dict[str, Any]]]:
    """Every listed id and every state the listing went through, as discovery walks it."""
    state = api.first_state()
    ids: list[str] = []
    states = [state]
    for _ in range(100):
        page = await api.list_page(state, RateStats())
        ids.extend(item["id"] for item in page.items)
        state = page.next_state
        states.append(state)
        if page.done:
            return ids, states
    raise AssertionError(f"the listing never ended: {states[-3:]}")


@pytest.mark.parametrize("style", list(STYLES))
async def test_every_style_lists_every_item_once(pool: asyncpg.Pool, style: str) -> None:
    with FakeApi(130, page_style=style, page_size_max=100) as server:
        api = client(pool, server.url, STYLES[style])
        try:
            ids, _ = await list_all(api)
        finally:
            await api.close()
        assert ids == server.ids
        # 40 + 40 + 40 + 10: the last page is short, or names no next page.
        assert server.count(kind="list", status=200) == 4


@pytest.mark.parametrize("style", ["next_url", "link_header"])
async def test_absolute_next_urls_on_the_own_host_are_followed(
    pool: asyncpg.Pool, style: str
) -> None:
    with FakeApi(90, page_style=style) as server:
        base = server.next_base = server.url
        api = client(pool, base, STYLES[style])
        try:
            ids, states = await list_all(api)
        finally:
            await api.close()
    assert ids == server.ids
    # The state discovery stores is the next page's absolute URL, then nothing.
    assert [s["url"] for s in states] == [
        None,
        f"{base}/items?offset=40&limit=40",
        f"{base}/items?offset=80&limit=40",
        None,
    ]
    assert server.served_pages() == ["0", "40", "80"]


@pytest.mark.parametrize("style", ["next_url", "link_header"])
async def test_a_next_url_on_another_host_is_refused(pool: asyncpg.Pool, style: str) -> None:
    with FakeApi(90, page_style=style) as server:
        port = server.url.rsplit(":", 1)[1]
        # The same server by another name: still another host, so it gets no request.
        server.next_base = f"http://localhost:{port}"
        api = client(pool, server.url, STYLES[style])
        with pytest.raises(SourceError) as refused:
            await api.list_page(api.first_state(), RateStats())
        await api.close()
        message = str(refused.value)
        where = (
            "at 'next_page_url' of the answer"
            if style == "next_url"
            else 'in its Link: rel="next" header'
        )
        assert message == (
            f"GET /items: the next page's URL {where} is "
            f"http://localhost:{port}/items?offset=40&limit=40, on http://localhost:{port}, "
            f"not on the source's own host http://127.0.0.1:{port}; the listing was stopped "
            "there. If the API really pages through another host, make that host the "
            "importer's ApiSource.base_url"
        )
        assert server.served_pages() == ["0"]


async def test_a_next_url_that_is_not_a_string_says_what_to_set(pool: asyncpg.Pool) -> None:
    with FakeApi(90, page_style="next_url") as server:
        pagination = Pagination(style="next_url", next_path="meta.total", size_param="limit")
        api = client(pool, server.url, pagination)
        with pytest.raises(SourceError) as caught:
            await api.list_page(api.first_state(), RateStats())
        await api.close()
    assert str(caught.value) == (
        "GET /items: the next page's URL at 'meta.total' of the answer is 90, not a URL; "
        "set Pagination.next_path to where the answer has it"
    )


def test_next_url_style_needs_next_path() -> None:
    with pytest.raises(ValueError) as caught:
        Pagination(style="next_url")
    assert str(caught.value) == (
        "Pagination(style='next_url') needs next_path, where the answer has the next page's"
        " URL (for example next_path='next_page_url')"
    )
