"""The URL pull source: a file behind an http(s) URL, streamed, behind the SSRF guard of
``sluice.agents.fetch.guard`` (every hop checked, the connection made to the checked address).

    fetch_url          stream a URL's body as a ``Fetched``, following redirects by hand
    url_request_parts  the URL, headers and basic auth a ``UrlSource`` asks for
"""

from __future__ import annotations

import email.message
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import unquote

import httpx

from sluice.agents.fetch.base import Fetched, Secrets, secret
from sluice.agents.fetch.guard import GuardedClient, Resolver, system_resolver, translating
from sluice.config import UrlSettings
from sluice.errors import SourceError
from sluice.schemas.sources import UrlSource

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


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
    ``policy.max_bytes``) is a SourceError; so are 4xx answers and refused hosts. Answers that
    may pass (``guard.may_pass``: 408, 425, 429, 5xx), timeouts and connection failures are
    SourceUnavailable."""
    limit = policy.max_bytes if max_bytes is None else max_bytes
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(GuardedClient(policy, resolver=resolver))
        answer = await stack.enter_async_context(http.stream(url, headers=headers, auth=auth))
        response, final = answer.response, answer.url
        _check_status(response, final)
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


def _check_status(response: httpx.Response, url: httpx.URL) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    what = f"HTTP {status} {response.reason_phrase} from {url}"
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
            with translating(url):
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
