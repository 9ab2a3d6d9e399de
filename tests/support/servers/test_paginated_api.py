"""The fake paginated API, exercised with a real HTTP client over a real socket."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import pytest

from tests.support.servers.paginated_api import FakeApi, Hit, decode_cursor, most_in_window


def _walk(api: FakeApi, client: httpx.Client, size: int) -> tuple[list[str], list[str]]:
    """List every page in the API's style; return the ids seen and the page values asked."""
    ids: list[str] = []
    asked: list[str] = []
    value: str = {"page": "1", "offset": "0", "cursor": ""}[api.page_style]
    while True:
        if api.page_style == "page":
            params = {"page": value, "per_page": str(size)}
        elif api.page_style == "offset":
            params = {"offset": value, "limit": str(size)}
        else:
            params = {"limit": str(size)} | ({"cursor": value} if value else {})
        response = client.get("/items", params=params)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        asked.append(value)
        assert body["meta"]["total"] == len(api.ids)
        page_ids = [row["id"] for row in body["data"]]
        assert all(row["name"] == f"name of {row['id']}" for row in body["data"])
        ids.extend(page_ids)
        if api.page_style == "cursor":
            if body["meta"]["next_cursor"] is None:
                return ids, asked
            value = body["meta"]["next_cursor"]
            assert decode_cursor(value) == len(ids)
        else:
            if not page_ids:
                assert body["meta"]["next_cursor"] is None
                return ids, asked
            value = (
                str(int(value) + 1) if api.page_style == "page" else str(int(value) + len(page_ids))
            )


@pytest.mark.parametrize("style", ["page", "offset", "cursor"])
def test_pagination_lists_every_id_once(style: str) -> None:
    with (
        FakeApi(250, page_style=style, page_size_max=40) as api,
        httpx.Client(base_url=api.url) as client,
    ):
        ids, asked = _walk(api, client, size=100)  # capped at 40 by the server
        assert ids == api.ids
        assert len(set(ids)) == 250
        assert api.ids[0] == "item-00001" and api.ids[-1] == "item-00250"
        # 7 pages of 40/10; page and offset styles also fetch the empty page past the end.
        assert len(asked) == (7 if style == "cursor" else 8)
        assert api.served_pages() == asked
        assert api.count(kind="list") == api.count(kind="list", status=200) == len(asked)
        assert api.count(kind="detail") == 0


def test_page_past_the_end_and_bad_params() -> None:
    with FakeApi(3) as api, httpx.Client(base_url=api.url) as client:
        body = client.get("/items", params={"page": "9"}).json()
        assert body == {"data": [], "meta": {"total": 3, "next_cursor": None}}
        assert client.get("/items", params={"page": "0"}).status_code == 400
        assert client.get("/items", params={"page": "x"}).status_code == 400
        assert client.get("/nowhere").status_code == 404
        assert api.served_pages() == ["9"]


def test_details_flaky_broken_missing() -> None:
    flaky = {"item-00002": 2, "item-00003": 1}
    with FakeApi(5, flaky=flaky, broken=["item-00004"], missing=["item-00005"]) as api:
        with httpx.Client(base_url=api.url) as client:
            response = client.get("/items/item-00001")
            assert response.status_code == 200
            assert response.json() == {"data": api.item("item-00001")}
            item = api.item("item-00001")
            assert item["name"] == "name of item-00001"
            assert isinstance(item["price"], str) and "." in item["price"]
            datetime.fromisoformat(item["updated_at"])
            assert item == api.item("item-00001")  # deterministic
            assert api.item("item-00002")["price"] != item["price"]

            for id_, k in flaky.items():
                codes = [client.get(f"/items/{id_}").status_code for _ in range(k + 2)]
                assert codes == [503] * k + [200, 200]
            assert [client.get("/items/item-00004").status_code for _ in range(3)] == [500] * 3
            missing = client.get("/items/item-00005")
            assert missing.status_code == 404 and missing.json() == {"error": "not found"}
            assert client.get("/items/item-99999").status_code == 404

        assert api.served_details() == ["item-00001"] + ["item-00002"] * 2 + ["item-00003"] * 2
        assert api.count(kind="detail", status=503) == 3
        assert api.count(kind="detail", status=500) == 3
        assert api.count(kind="detail", status=404) == 2
        assert api.throttled() == 0
        assert all(isinstance(hit, Hit) for hit in api.hits)
        with pytest.raises(KeyError):
            api.item("item-99999")


def test_per_second_limit_throttles_a_burst() -> None:
    with FakeApi(60, per_second=20) as api, httpx.Client(base_url=api.url) as client:
        start = time.time()
        responses = [client.get(f"/items/{id_}") for id_ in api.ids]
        took = time.time() - start
        limited = [r for r in responses if r.status_code == 429]
        ok = [r for r in responses if r.status_code == 200]
        assert limited and all(r.headers["retry-after"] == "1" for r in limited)
        assert len(ok) + len(limited) == 60
        if took < 1.0:
            assert len(ok) == 20
            assert api.max_in_window(1.0) == 60
        accepted = [h.time for h in api.snapshot() if h.status != 429]
        assert most_in_window(accepted, 1.0) <= 20
        assert api.count() == 60
        assert api.throttled() == len(limited)
        assert api.count(status=200) == len(ok)
        assert len(api.served_details()) == len(ok)
        assert api.count(since=time.time() + 10) == 0
        assert api.served_details(since=time.time() + 10) == []

        time.sleep(1.05)  # the window has passed: accepted again
        assert client.get("/items/item-00001").status_code == 200


def test_throttle_every_rotates_three_forms() -> None:
    with FakeApi(20, throttle_every=5) as api, httpx.Client(base_url=api.url) as client:
        responses = [client.get("/items" if i % 2 else f"/items/{api.ids[i]}") for i in range(15)]
        codes = [r.status_code for r in responses]
        assert [i for i, c in enumerate(codes) if c == 429] == [4, 9, 14]
        first, second, third = responses[4], responses[9], responses[14]
        assert first.headers["retry-after"] == "1"
        when = parsedate_to_datetime(second.headers["retry-after"])
        ahead = (when - datetime.now(UTC)).total_seconds()
        assert 0.0 < ahead <= 2.5
        assert "retry-after" not in third.headers
        assert third.headers["ratelimit-reset"] == "1"
        assert api.throttled() == 3
        assert api.count(status=200) == 12
        assert api.count(kind="list") == 7


def test_concurrent_clients_are_all_recorded() -> None:
    with (
        FakeApi(40, per_second=150) as api,
        httpx.Client(base_url=api.url, limits=httpx.Limits(max_connections=16)) as client,
    ):

        def fetch(i: int) -> int:
            return client.get(f"/items/{api.ids[i % 40]}").status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            codes = list(pool.map(fetch, range(300)))
        assert api.count() == 300
        assert api.throttled() == codes.count(429)
        assert api.count(status=200) == codes.count(200)
        assert codes.count(200) + codes.count(429) == 300
        accepted = [h.time for h in api.snapshot() if h.status != 429]
        assert most_in_window(accepted, 1.0) <= 150
        assert api.max_in_window(5.0) == 300


def test_latency_and_stop() -> None:
    api = FakeApi(2, latency=0.1, list_latency=0.05).start()
    try:
        with httpx.Client(base_url=api.url) as client:
            start = time.perf_counter()
            assert client.get("/items/item-00001").status_code == 200
            assert time.perf_counter() - start >= 0.1
            start = time.perf_counter()
            assert client.get("/items").status_code == 200
            assert time.perf_counter() - start >= 0.05
            url = api.url
    finally:
        api.stop()
    with pytest.raises(RuntimeError):
        _ = api.url
    with httpx.Client(base_url=url) as client, pytest.raises(httpx.ConnectError):
        client.get("/items")
