"""The URL pull source: a file behind an http(s) URL, streamed, behind an SSRF guard.

Every hop (the URL and each redirect) is parsed, its host resolved and every address checked
against ``UrlSettings`` before anything is sent. The connection then goes to the checked
address itself, with the Host header and TLS server name (SNI, certificate check) of the real
host, so DNS cannot answer differently between the check and the connect.

    check_url          refuse a URL the policy does not allow (scheme, host, every address)
    fetch_url          stream a URL's body as a ``Fetched``, following redirects by hand
    url_request_parts  the URL, headers and basic auth a ``UrlSource`` asks for
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import unquote

import httpx

from sluice.config import UrlSettings
from sluice.sources.base import Fetched, Secrets, SourceError, SourceUnavailable, UrlSource, secret

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the host resolves to, as strings."""

CHUNK_BYTES = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
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
    await _checked_addresses(_parse_url(url), policy, resolver)


@asynccontextmanager
async def fetch_url(
    url: str,
    policy: UrlSettings,
    *,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    max_bytes: int | None = None,
    resolver: Resolver = system_resolver,
) -> AsyncIterator[Fetched]:
    """Stream the body of ``url`` (GET) as a ``Fetched`` of chunks of at most 1 MiB.

    Redirects are followed up to ``policy.max_redirects``, each hop checked like the first.
    ``headers`` and ``auth`` go only to the scheme, host and port of ``url``: a redirect
    elsewhere is followed without them. More than ``max_bytes`` (default
    ``policy.max_bytes``) is a SourceError; so are 4xx answers and refused hosts. 408, 429,
    5xx, timeouts and connection failures are SourceUnavailable."""
    limit = policy.max_bytes if max_bytes is None else max_bytes
    sent = dict(headers or {})
    _check_headers(sent)
    async with AsyncExitStack() as stack:
        response, final = await _follow(stack, _parse_url(url), policy, sent, auth, resolver)
        length = _content_length(response)
        if length is not None and length > limit:
            raise SourceError(
                f"{final} is {length} bytes (Content-Length), over the limit of {limit} bytes; "
                "raise UrlSource.max_bytes or SLUICE_URL_MAX_BYTES to fetch it"
            )
        chunks = _read_chunks(response, final, limit)
        stack.push_async_callback(chunks.aclose)
        yield Fetched(
            name=_file_name(response, final),
            chunks=chunks,
            content_type=response.headers.get("content-type"),
            location=str(final),
        )


def url_request_parts(
    source: UrlSource, params: Mapping[str, Any], secrets: Secrets
) -> tuple[str, dict[str, str], tuple[str, str] | None]:
    """What to fetch for a run of ``source``: the URL (the trigger's ``url`` parameter when
    the source takes one, else ``source.url``), the headers with the secret ones resolved,
    and the basic auth pair or None."""
    given = params.get("url")
    if given is not None and given != "":
        if not source.url_from_trigger:
            raise SourceError(
                "this importer fetches its configured URL only (UrlSource.url_from_trigger is "
                "false); trigger it without a url"
            )
        if not isinstance(given, str):
            raise SourceError(f"the trigger's url must be a string, not {type(given).__name__}")
        url = given
    elif source.url:
        url = source.url
    elif source.url_from_trigger:
        raise SourceError(
            "no URL to fetch: give one with the trigger (url=...) or set UrlSource.url"
        )
    else:
        raise SourceError("no URL to fetch: set UrlSource.url")

    secret_names = {name.lower() for name in source.secret_headers}
    headers = {k: v for k, v in source.headers.items() if k.lower() not in secret_names}
    for name, env in source.secret_headers.items():
        headers[name] = _required_secret(secrets, env, f"header {name}")
    auth = None
    if source.basic_auth_env is not None:
        user_env, password_env = source.basic_auth_env
        auth = (
            _required_secret(secrets, user_env, "basic auth user"),
            _required_secret(secrets, password_env, "basic auth password"),
        )
    return url, headers, auth


def _required_secret(secrets: Secrets, name: str, what: str) -> str:
    value = secret(secrets, name, what)
    if value is None:  # secret() returns None only for a None name
        raise SourceError(f"{what}: no environment variable named")
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _check_headers(headers: Mapping[str, str]) -> None:
    """Refuse headers httpx or h11 would reject: their errors quote the value, maybe a secret."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise SourceError(
                f"the header name {name!r} is not valid HTTP; check UrlSource.headers"
            )
        if not _FIELD_VALUE.fullmatch(value):
            raise SourceError(
                f"the value of the header {name} holds a line break, a control or a non-ASCII "
                "character; check UrlSource.headers and the secret header variables"
            )


def _parse_url(url: str) -> httpx.URL:
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
            "credentials in UrlSource.basic_auth_env or secret_headers instead"
        )
    if not parsed.raw_host:
        raise SourceError(f"the URL {url!r} names no host; give a full http(s) link")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _origin(url: httpx.URL) -> tuple[str, bytes, int]:
    return url.scheme, url.raw_host.lower(), _port(url)


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
            logger.warning("URL source refused %s: %s", url, exc)
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


@contextmanager
def _translating(url: httpx.URL) -> Iterator[None]:
    """httpx failures as SourceError (the request is wrong) or SourceUnavailable (may pass)."""
    try:
        yield
    except httpx.LocalProtocolError:
        # h11's message can quote a header value, which may be a secret (_check_headers
        # should have refused it first).
        raise SourceError(
            f"the request to {url} is not valid HTTP; check UrlSource.headers and the values "
            "of the secret header variables"
        ) from None
    except (httpx.InvalidURL, httpx.DecodingError) as exc:
        raise SourceError(f"cannot fetch {url}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise SourceUnavailable(f"timed out fetching {url} ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise SourceUnavailable(f"fetching {url} failed: {exc!r}") from exc


async def _follow(
    stack: AsyncExitStack,
    url: httpx.URL,
    policy: UrlSettings,
    headers: dict[str, str],
    auth: tuple[str, str] | None,
    resolver: Resolver,
) -> tuple[httpx.Response, httpx.URL]:
    """The first non-redirect answer, open for streaming until ``stack`` closes, and its URL."""
    origin = _origin(url)
    for _ in range(policy.max_redirects + 1):
        # Credentials are for the origin the importer names, not wherever it redirects to.
        trusted = _origin(url) == origin
        async with AsyncExitStack() as hop:
            response = await _send(
                hop, url, policy, headers if trusted else {}, auth if trusted else None, resolver
            )
            if response.status_code not in _REDIRECTS:
                _check_status(response, url)
                stack.push_async_callback(hop.pop_all().aclose)
                return response, url
            location = response.headers.get("location")
        if not location:
            raise SourceError(f"HTTP {response.status_code} from {url} without a Location header")
        try:
            target = url.join(location)
        except httpx.InvalidURL as exc:
            raise SourceError(f"{url} redirects to an invalid URL: {exc}") from None
        logger.info("URL source: %s redirects (%d) to %s", url, response.status_code, target)
        url = _parse_url(str(target))
    raise SourceError(
        f"more than {policy.max_redirects} redirects fetching {url}; link to the file "
        "directly or raise SLUICE_URL_MAX_REDIRECTS"
    )


async def _send(
    hop: AsyncExitStack,
    url: httpx.URL,
    policy: UrlSettings,
    headers: dict[str, str],
    auth: tuple[str, str] | None,
    resolver: Resolver,
) -> httpx.Response:
    """GET ``url`` at one of its checked addresses; the response is open until ``hop`` closes.

    A client per hop: its pool is keyed by address, and a connection opened with one host's
    TLS name must not be reused for another host at the same address."""
    addresses = await _checked_addresses(url, policy, resolver)
    host = url.raw_host.decode("ascii")
    # A caller's Host header would send the request to a host nobody checked.
    sent = {k: v for k, v in headers.items() if k.lower() != "host"}
    sent["Host"] = url.netloc.decode("ascii")
    extensions = {} if _is_ip(host) else {"sni_hostname": host}
    client = await hop.enter_async_context(
        httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            ),
            follow_redirects=False,
            # No proxies or certificate files from the environment: the checked address must
            # be the one connected to.
            trust_env=False,
        )
    )
    failures: list[str] = []
    for ip in addresses:
        logger.debug("URL source: GET %s at %s", url, ip)
        with _translating(url):
            try:
                return await hop.enter_async_context(
                    client.stream(
                        "GET",
                        url.copy_with(host=ip),
                        headers=sent,
                        auth=auth,
                        extensions=extensions,
                    )
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The next address may answer (a host with both IPv4 and IPv6, say).
                failures.append(f"{ip}: {exc!r}")
    raise SourceUnavailable(f"cannot connect to {host} for {url} ({'; '.join(failures)})")


def _check_status(response: httpx.Response, url: httpx.URL) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    what = f"HTTP {status} {response.reason_phrase} from {url}"
    if status in (408, 429) or status >= 500:
        raise SourceUnavailable(f"{what}; the server may answer later")
    if status in (401, 403):
        hint = "check the credentials (UrlSource.secret_headers or basic_auth_env)"
    elif status in (404, 410):
        hint = "check the URL: the file is not there"
    elif 400 <= status < 500:
        hint = "the server refuses the request as sent"
    else:
        hint = "only 2xx answers and redirects can be fetched"
    raise SourceError(f"{what}; {hint}")


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("content-length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


async def _read_chunks(
    response: httpx.Response, url: httpx.URL, limit: int
) -> AsyncGenerator[bytes, None]:
    """The body in chunks of at most CHUNK_BYTES; SourceError as soon as it passes ``limit``."""
    received = 0
    buffer = bytearray()
    pieces = response.aiter_bytes()
    try:
        while True:
            with _translating(url):
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    break
            received += len(piece)
            if received > limit:
                raise SourceError(
                    f"{url} sent more than the limit of {limit} bytes; raise "
                    "UrlSource.max_bytes or SLUICE_URL_MAX_BYTES to fetch it"
                )
            buffer += piece
            while len(buffer) >= CHUNK_BYTES:
                yield bytes(buffer[:CHUNK_BYTES])
                del buffer[:CHUNK_BYTES]
        if buffer:
            yield bytes(buffer)
    finally:
        # Close httpx's generator now, not whenever it is garbage collected.
        if isinstance(pieces, AsyncGenerator):
            await pieces.aclose()
    logger.debug("URL source: fetched %d bytes from %s", received, url)


def _file_name(response: httpx.Response, url: httpx.URL) -> str:
    """The name from Content-Disposition, else the last segment of the URL's path."""
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = email.message.Message()
        message["content-disposition"] = disposition
        name = _safe_name(message.get_filename())
        if name:
            return name
    path = url.raw_path.decode("ascii").split("?", 1)[0]
    return _safe_name(unquote(path.rsplit("/", 1)[-1])) or "download"


def _safe_name(raw: str | None) -> str | None:
    """A bare file name: no folders, no leading dots (so no '..'), no control characters."""
    if not raw:
        return None
    name = re.split(r"[/\\]", raw)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".").strip()
    return name[:255] or None
