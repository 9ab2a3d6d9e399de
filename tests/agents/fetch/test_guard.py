"""The SSRF guard every outbound HTTP client shares (``GuardedClient``), against real local
servers: one on 127.0.0.1 (allowed) and a trap on 127.0.0.2 (loopback too, but not on the
allow list) that records whether anything reached it. The policy checks themselves
(``check_url``, ``check_address``) are covered in test_url.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sluice.agents.fetch.guard import GuardedClient
from sluice.config import UrlSettings
from sluice.errors import SourceError
from tests.conftest import TRAP_HOST
from tests.support.servers.recorder import Recorder, Reply, Request, redirect

LOCAL = UrlSettings(allow_hosts="127.0.0.1", connect_timeout=5, read_timeout=5)
SECRET = "guard-secret-value"


def resolver_for(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


@pytest.fixture
def trap() -> Iterator[Recorder]:
    with Recorder(lambda r: Reply(200, {"reached": "the trap"}), host=TRAP_HOST) as server:
        yield server


async def test_the_request_goes_to_the_checked_address_with_the_real_host_name() -> None:
    # No resolver but the test's knows guarded.test: only the checked address can be used.
    resolve = resolver_for({"guarded.test": ["127.0.0.1"]})
    with Recorder(lambda r: Reply(200, {"host": r.headers["host"]})) as server:
        async with GuardedClient(LOCAL, resolver=resolve) as http:
            answer = await http.get(f"http://guarded.test:{server.port}/where")
    assert answer.status_code == 200
    assert answer.json() == {"host": f"guarded.test:{server.port}"}
    assert str(answer.url) == f"http://guarded.test:{server.port}/where"


async def test_a_name_that_resolves_to_a_refused_address_is_never_contacted(
    trap: Recorder,
) -> None:
    resolve = resolver_for({"rebound.test": [TRAP_HOST]})
    async with GuardedClient(LOCAL, resolver=resolve) as http:
        with pytest.raises(SourceError) as refused:
            await http.get(f"http://rebound.test:{trap.port}/")
    assert f"rebound.test (resolved to {TRAP_HOST})" in str(refused.value)
    assert "SLUICE_URL_ALLOW_HOSTS" in str(refused.value)
    assert trap.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_every_redirect_hop_is_checked(trap: Recorder, status: int) -> None:
    with Recorder(lambda r: redirect(f"{trap.url}/inside?x=1", status)) as server:
        async with GuardedClient(LOCAL) as http:
            with pytest.raises(SourceError, match=f"refused {TRAP_HOST}: SLUICE_URL_ALLOW_HOSTS"):
                await http.get(f"{server.url}/out")
        assert [r.path for r in server.requests] == ["/out"]
    assert trap.requests == []


async def test_with_the_default_policy_loopback_is_refused_and_the_fix_is_named() -> None:
    with Recorder(lambda r: Reply(200, {})) as server:
        async with GuardedClient(UrlSettings()) as http:
            with pytest.raises(SourceError) as refused:
                await http.get(f"{server.url}/x")
        assert server.requests == []
    message = str(refused.value)
    assert "loopback" in message
    assert "SLUICE_URL_ALLOW_HOSTS" in message and "SLUICE_URL_ALLOW_PRIVATE=true" in message


async def test_credentials_go_only_to_the_trusted_origin() -> None:
    with (
        Recorder(lambda r: Reply(200, {"ok": True})) as elsewhere,
        Recorder(
            lambda r: redirect(f"{elsewhere.url}/away") if r.path == "/leave" else Reply(200, {})
        ) as home,
    ):
        async with GuardedClient(LOCAL, headers={"User-Agent": "guard-test"}) as http:
            sent = {"X-Api-Key": SECRET}
            await http.get(f"{home.url}/stay", headers=sent, auth=("user", SECRET))
            await http.get(f"{home.url}/leave", headers=sent, auth=("user", SECRET))
            # An absolute URL outside the trusted origin gets no credentials either.
            await http.get(f"{elsewhere.url}/direct", headers=sent, trusted=home.url)
        for seen in home.requests:
            assert seen.headers["x-api-key"] == SECRET and "authorization" in seen.headers
        assert [r.path for r in elsewhere.requests] == ["/away", "/direct"]
        for seen in elsewhere.requests:
            assert "x-api-key" not in seen.headers and "authorization" not in seen.headers
            assert seen.headers["user-agent"] == "guard-test"


async def test_redirect_loops_and_big_bodies_are_refused() -> None:
    def route(request: Request) -> Reply:
        if request.path == "/loop":
            return redirect("/loop")
        return Reply(200, {"padding": "x" * 5000})

    with Recorder(route) as server:
        async with GuardedClient(LOCAL) as http:
            with pytest.raises(SourceError, match="more than 5 redirects"):
                await http.get(f"{server.url}/loop")
            with pytest.raises(SourceError, match="more than the limit of 1000 bytes"):
                await http.get(f"{server.url}/big", max_bytes=1000)
            assert (await http.get(f"{server.url}/big")).json()["padding"] == "x" * 5000
