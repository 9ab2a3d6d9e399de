"""The SSRF guard of every outbound HTTP client: URL sources, the paginated API source, and the
AT Protocol backfill's PDS, PLC and did:web requests.

Every hop (the URL asked for and each redirect) is parsed, its host resolved and every address
checked against ``UrlSettings`` before anything is sent. The connection then goes to the
checked address itself, with the Host header and TLS server name (SNI, certificate check) of
the real host, so DNS cannot answer differently between the check and the connect.

    check_address   refuse one resolved address of a host the policy does not allow
    check_url       refuse a URL the policy does not allow (scheme, host, every address)
    GuardedClient   GET under the policy: every request and every redirect hop checked,
                    credentials only to the origin they are for, connections to checked
                    addresses
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import httpx

from sluice.config import UrlSettings
from sluice.errors import SourceError, SourceUnavailable

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the host resolves to, as strings."""

REDIRECTS = frozenset({301, 302, 303, 307, 308})


def may_pass(status: int) -> bool:
    """The one classification of HTTP answers for the pull sources: an answer that may pass
    when asked again (408 timeout, 425 too early, 429 too many requests, a 5xx other than 501
    not implemented and 505 version not supported). Other 4xx are the request's fault."""
    return status in (408, 425, 429) or (status >= 500 and status not in (501, 505))


def retry_after(response: httpx.Response, default: float = 1.0) -> float:
    """Seconds to wait after a 429: ``Retry-After`` (seconds or an HTTP date), else
    ``RateLimit-Reset`` (seconds), else ``default``."""
    value = response.headers.get("retry-after")
    if value:
        value = value.strip()
        if value.replace(".", "", 1).isdigit():
            return max(0.0, float(value))
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    reset = response.headers.get("ratelimit-reset")
    if reset and reset.strip().replace(".", "", 1).isdigit():
        value_s = float(reset.strip())
        # The IETF draft sends seconds to wait; some servers (Bluesky) send an epoch time.
        return max(0.0, value_s - time.time() if value_s > 1e9 else value_s)
    return default


# Names that reach a cloud provider's instance metadata (credentials) from inside a VM.
_METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_CGNAT = IPv4Network("100.64.0.0/10")
_NAT64 = IPv6Network("64:ff9b::/96")
# getaddrinfo errors that mean "no such name" (fix the URL), not "DNS is down" (retry).
_NO_SUCH_NAME = {
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
}
_PRIVATE_HINT = (
    "add the host, its address or a CIDR to SLUICE_URL_ALLOW_HOSTS, "
    "or set SLUICE_URL_ALLOW_PRIVATE=true"
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Origin = tuple[str, bytes, int]


async def system_resolver(host: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address ``host`` resolves to, through the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(
        dict.fromkeys(
            str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)
        )
    )


def check_address(host: str, ip: str, policy: UrlSettings) -> None:
    """Refuse (SourceError) fetching from ``host`` at the resolved address ``ip``.

    The deny list always refuses; a non-empty allow list admits only what is on it (even a
    private address); otherwise loopback, private, link-local and other non-public addresses
    and cloud metadata hosts are refused unless ``policy.allow_private``."""
    name = host.lower().rstrip(".")
    try:
        address = ip_address(ip)
    except ValueError:
        raise SourceError(f"refused {name}: it resolved to {ip!r}, not an IP address") from None
    where = name if name == str(address) else f"{name} (resolved to {address})"
    denied_names, denied_nets = _split_entries(policy.denied)
    if name in denied_names or _in_networks(address, denied_nets):
        raise SourceError(f"refused {where}: it is on SLUICE_URL_DENY_HOSTS")
    if policy.allowed:
        allowed_names, allowed_nets = _split_entries(policy.allowed)
        if name in allowed_names or _in_networks(address, allowed_nets):
            return
        raise SourceError(
            f"refused {where}: SLUICE_URL_ALLOW_HOSTS is set and names neither; "
            "add the host, its address or a CIDR to it"
        )
    if policy.allow_private:
        return
    if name in _METADATA_HOSTS:
        raise SourceError(f"refused {where}: a cloud metadata host; {_PRIVATE_HINT}")
    kind = _non_public_kind(address)
    if kind is not None:
        raise SourceError(f"refused {where}: a {kind} address; {_PRIVATE_HINT}")


async def check_url(url: str, policy: UrlSettings, resolver: Resolver = system_resolver) -> None:
    """Refuse (SourceError) a URL the policy does not allow: not http(s), credentials in the
    URL, or a host any of whose addresses ``check_address`` refuses."""
    await _checked_addresses(parse_url(url), policy, resolver)


def parse_url(url: str | httpx.URL) -> httpx.URL:
    """The URL, or SourceError when it is not an http(s) URL with a host and no credentials."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise SourceError(f"not a valid URL ({exc}); give an http:// or https:// link") from None
    if parsed.scheme not in ("http", "https"):
        shown = parsed.scheme + ":" if parsed.scheme else "no scheme"
        raise SourceError(
            f"only http and https URLs can be fetched, not {shown} "
            f"({parsed.copy_with(userinfo=b'')}); give an http:// or https:// link"
        )
    if parsed.userinfo:
        raise SourceError(
            f"the URL {parsed.copy_with(userinfo=b'')} carries a user or password; put "
            "credentials in UrlSource.basic_auth_env or secret_headers (ApiSource."
            "secret_headers for an API) instead"
        )
    if not parsed.raw_host:
        raise SourceError(f"the URL {url!r} names no host; give a full http(s) link")
    return parsed


def origin(url: httpx.URL) -> Origin:
    """(scheme, host, port) with the scheme's default port filled in."""
    return url.scheme, url.raw_host.lower(), _port(url)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse headers httpx or h11 would reject: their errors quote the value, maybe a secret."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise SourceError(
                f"the header name {name!r} is not valid HTTP; check the source's headers"
            )
        if not _FIELD_VALUE.fullmatch(value):
            raise SourceError(
                f"the value of the header {name} holds a line break, a control or a non-ASCII "
                "character; check the source's headers and the secret header variables"
            )


@dataclass(frozen=True)
class Answer:
    """The first answer that is not a redirect, open for streaming, and the URL it came from
    (``response.url`` names the checked address the request went to, not the host)."""

    response: httpx.Response
    url: httpx.URL


class GuardedClient:
    """GET under the host policy, following redirects by hand.

    ``headers`` go with every request to every host (a User-Agent, not credentials). The
    ``headers`` and ``auth`` given to a request go only to ``trusted``'s scheme, host and port
    (default: the URL asked for): a redirect elsewhere is followed without them.

    Connections are kept per origin (scheme, host, port), each pool keyed by the checked
    address it connected to, so a connection made with one host's TLS name is never reused for
    another host at the same address. Refusals are SourceError; timeouts, connection failures
    and answers that may pass (``may_pass``: 5xx, 408, 425, 429 with its ``retry_after``) are
    SourceUnavailable; other answers are returned, whatever their status."""

    def __init__(
        self,
        policy: UrlSettings,
        *,
        timeout: httpx.Timeout | float | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 10,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.policy = policy
        self.timeout = (
            timeout
            if timeout is not None
            else httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            )
        )
        self.headers = dict(headers or {})
        check_headers(self.headers)
        self.max_connections = max_connections
        self.resolver = resolver
        self._clients: dict[Origin, httpx.AsyncClient] = {}

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> GuardedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @asynccontextmanager
    async def stream(
        self,
        url: str | httpx.URL,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        trusted: str | httpx.URL | None = None,
    ) -> AsyncIterator[Answer]:
        """GET ``url`` (with ``params`` added to its query); the first answer that is not a
        redirect, open until the context closes (SourceUnavailable if it may pass)."""
        sent = dict(headers or {})
        check_headers(sent)
        target = parse_url(url)
        if params:
            target = target.copy_merge_params(dict(params))
        home = origin(parse_url(trusted)) if trusted is not None else origin(target)
        came_from: httpx.URL | None = None
        async with AsyncExitStack() as stack:
            for _ in range(self.policy.max_redirects + 1):
                at_home = origin(target) == home
                async with AsyncExitStack() as hop:
                    try:
                        response = await self._send(
                            hop, target, sent if at_home else {}, auth if at_home else None
                        )
                    except SourceError as exc:
                        if came_from is None:
                            raise
                        raise SourceError(f"{came_from} redirects to {target}: {exc}") from exc
                    if response.status_code not in REDIRECTS:
                        stack.push_async_callback(hop.pop_all().aclose)
                        break
                    location = response.headers.get("location")
                if not location:
                    raise SourceError(
                        f"HTTP {response.status_code} from {target} without a Location header"
                    )
                try:
                    joined = target.join(location)
                except httpx.InvalidURL as exc:
                    raise SourceError(f"{target} redirects to an invalid URL: {exc}") from None
                logger.info("%s redirects (%d) to %s", target, response.status_code, joined)
                came_from, target = target, parse_url(joined)
            else:
                raise SourceError(
                    f"more than {self.policy.max_redirects} redirects fetching {target}; link "
                    "to the resource directly or raise SLUICE_URL_MAX_REDIRECTS"
                )
            if may_pass(response.status_code):
                raise SourceUnavailable(
                    f"HTTP {response.status_code} {response.reason_phrase} from {target}; the "
                    "server may answer later",
                    status=response.status_code,
                    retry_after=retry_after(response) if response.status_code == 429 else None,
                )
            yield Answer(response, target)

    async def get(
        self,
        url: str | httpx.URL,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        trusted: str | httpx.URL | None = None,
        max_bytes: int | None = None,
    ) -> httpx.Response:
        """Like ``stream``, with the body read (at most ``max_bytes``, default
        ``policy.max_bytes``; more is a SourceError)."""
        limit = self.policy.max_bytes if max_bytes is None else max_bytes
        async with self.stream(
            url, params=params, headers=headers, auth=auth, trusted=trusted
        ) as answer:
            body = bytearray()
            with translating(answer.url):
                async for piece in answer.response.aiter_bytes():
                    body += piece
                    if len(body) > limit:
                        raise SourceError(
                            f"{answer.url} sent more than the limit of {limit} bytes; raise "
                            "SLUICE_URL_MAX_BYTES to read it"
                        )
        # The body as read (decoded already), and the URL of the host, not of the address.
        headers = answer.response.headers.copy()
        for name in ("content-encoding", "content-length", "transfer-encoding"):
            headers.pop(name, None)
        return httpx.Response(
            answer.response.status_code,
            headers=headers,
            content=bytes(body),
            request=httpx.Request("GET", answer.url),
        )

    async def _send(
        self,
        hop: AsyncExitStack,
        url: httpx.URL,
        headers: Mapping[str, str],
        auth: tuple[str, str] | None,
    ) -> httpx.Response:
        """GET ``url`` at one of its checked addresses; the response is open until ``hop``
        closes."""
        addresses = await _checked_addresses(url, self.policy, self.resolver)
        host = url.raw_host.decode("ascii")
        # A caller's Host header would send the request to a host nobody checked.
        sent = {k: v for k, v in {**self.headers, **headers}.items() if k.lower() != "host"}
        sent["Host"] = url.netloc.decode("ascii")
        extensions = {} if _is_ip(host) else {"sni_hostname": host}
        client = self._client_for(url)
        failures: list[str] = []
        for ip in addresses:
            logger.debug("GET %s at %s", url, ip)
            with translating(url):
                try:
                    request = client.build_request(
                        "GET", url.copy_with(host=ip), headers=sent, extensions=extensions
                    )
                    response = await client.send(request, auth=auth, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    # The next address may answer (a host with both IPv4 and IPv6, say).
                    failures.append(f"{ip}: {exc!r}")
                    continue
            hop.push_async_callback(response.aclose)
            return response
        raise SourceUnavailable(f"cannot connect to {host} for {url} ({'; '.join(failures)})")

    def _client_for(self, url: httpx.URL) -> httpx.AsyncClient:
        key = origin(url)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=False,
                # No proxies or certificate files from the environment: the checked address
                # must be the one connected to.
                trust_env=False,
                limits=httpx.Limits(max_connections=self.max_connections),
            )
        return client


@contextmanager
def translating(url: httpx.URL) -> Iterator[None]:
    """httpx failures as SourceError (the request is wrong) or SourceUnavailable (may pass)."""
    try:
        yield
    except httpx.LocalProtocolError:
        # h11's message can quote a header value, which may be a secret (check_headers
        # should have refused it first).
        raise SourceError(
            f"the request to {url} is not valid HTTP; check the source's headers and the "
            "values of the secret header variables"
        ) from None
    except (httpx.InvalidURL, httpx.DecodingError) as exc:
        raise SourceError(f"cannot fetch {url}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise SourceUnavailable(f"timed out fetching {url} ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise SourceUnavailable(f"fetching {url} failed: {exc!r}") from exc


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


async def _checked_addresses(url: httpx.URL, policy: UrlSettings, resolver: Resolver) -> list[str]:
    """Every address of the URL's host, each checked; the host's own when it is an IP."""
    host = url.raw_host.decode("ascii")
    if _is_ip(host):
        addresses = [host]
    else:
        try:
            addresses = await resolver(host, _port(url))
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                raise SourceError(f"the host {host} does not resolve; check the URL") from exc
            raise SourceUnavailable(f"cannot resolve {host}: {exc}") from exc
        except OSError as exc:
            raise SourceUnavailable(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise SourceError(f"the host {host} resolves to no address; check the URL")
    for ip in addresses:
        try:
            check_address(host, ip, policy)
        except SourceError as exc:
            logger.warning("refused %s: %s", url, exc)
            raise
    return addresses


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _split_entries(entries: tuple[str, ...]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.rstrip("."))
    return names, networks


def _forms(address: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 address embedded in it (mapped, 6to4, NAT64), if any."""
    forms: list[IPAddress] = [address]
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        elif address.sixtofour is not None:
            forms.append(address.sixtofour)
        elif address in _NAT64:
            forms.append(IPv4Address(int(address) & 0xFFFFFFFF))
    return forms


def _in_networks(address: IPAddress, networks: list[IPNetwork]) -> bool:
    return any(form in net for form in _forms(address) for net in networks)


def _non_public_kind(address: IPAddress) -> str | None:
    """What kind of non-public address this is, None when it is public. An IPv6 address that
    embeds an IPv4 one is judged by that: ``::ffff:0:0/96`` and ``64:ff9b::/96`` sit in
    ``::/8``, reserved as a whole, yet NAT64 networks reach public hosts through them."""
    form = _forms(address)[-1]
    if form.is_unspecified:
        return "unspecified"
    if form.is_loopback:
        return "loopback"
    if form.is_link_local:
        return "link-local (cloud metadata)"
    if form in _CGNAT:
        return "shared (carrier-grade NAT)"
    if form.is_multicast:
        return "multicast"
    if form.is_private:
        return "private"
    if form.is_reserved:
        return "reserved"
    if not form.is_global:
        return "non-public"
    return None
