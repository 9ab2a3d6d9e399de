"""Pull sources: where an importer's data comes from when nobody uploads it.

An importer names at most one pull source (``Importer.pull``). A trigger (HTTP API, CLI, Python
API or a schedule) creates a run; a worker fetches the data and imports it like an upload.

    UrlSource        a file behind an http(s) URL, streamed into the file store
    FtpSource        a named file, or the newest matching a pattern, on an FTP or SFTP server
    FilesystemSource a file on a disk the workers share, confined to configured roots
    ApiSource        a paginated HTTP API: list pages, then one detail request per item

Secrets are never written here: a source names the environment variables that hold them, and
the entry point resolves those names (``Secrets``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class UrlSource:
    """A file behind a URL. ``url`` is the default; a trigger may name another URL when
    ``url_from_trigger`` is true (the host policy of ``SLUICE_URL_*`` applies to both).

    ``headers`` are sent as they are; ``secret_headers`` maps a header to the environment
    variable holding its value (for ``Authorization``); ``basic_auth_env`` is a pair of
    variables (user, password)."""

    kind: Literal["url"] = field(default="url", init=False)
    url: str | None = None
    url_from_trigger: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)
    secret_headers: Mapping[str, str] = field(default_factory=dict)
    basic_auth_env: tuple[str, str] | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class FtpSource:
    """A file on an FTP (``protocol="ftp"``) or SFTP (``"sftp"``) server, in ``folder``:
    ``file`` names it, or ``pattern`` (a glob such as ``"orders-*.csv"``) picks the newest
    match by modification time. A trigger may give ``file`` or ``pattern`` instead.

    ``after``: what happens to the remote file once its run completed (``keep``, ``move`` into
    ``move_to``, or ``delete``). Credentials come from the variables ``user_env`` and
    ``password_env``; for SFTP, ``known_hosts`` is a known_hosts file (``None`` accepts any host
    key only with ``insecure_any_host_key=True``)."""

    host: str
    protocol: Literal["ftp", "sftp"] = "ftp"
    port: int | None = None
    folder: str = "/"
    file: str | None = None
    pattern: str | None = None
    user_env: str | None = None
    password_env: str | None = None
    after: Literal["keep", "move", "delete"] = "keep"
    move_to: str | None = None
    known_hosts: str | None = None
    insecure_any_host_key: bool = False
    timeout: float = 30.0

    @property
    def kind(self) -> str:
        return self.protocol

    def __post_init__(self) -> None:
        if self.protocol not in ("ftp", "sftp"):
            raise ValueError(f"FtpSource protocol must be 'ftp' or 'sftp', not {self.protocol!r}")
        if self.after == "move" and not self.move_to:
            raise ValueError("FtpSource(after='move') needs move_to, the folder to move into")


@dataclass(frozen=True)
class FilesystemSource:
    """A file on a disk the workers can read. The trigger names ``path``; it must resolve
    inside one of the roots of ``SLUICE_FILE_ROOTS`` (``..``, outside absolute paths and
    symlinks that leave the roots are refused)."""

    kind: Literal["filesystem"] = field(default="filesystem", init=False)
    path: str | None = None


@dataclass(frozen=True)
class RateLimit:
    """Requests per second with a burst, shared by every worker of the cluster."""

    per_second: float
    burst: int = 1

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError("RateLimit needs per_second > 0 and burst >= 1")


@dataclass(frozen=True)
class Pagination:
    """How the list endpoint pages.

    - ``page``: ``param`` is the page number, from ``start`` (1 by default);
    - ``offset``: ``param`` is the offset of the first item, from ``start`` (0 by default);
    - ``cursor``: ``param`` carries the cursor found at ``cursor_path`` of the previous answer;
    - ``next_url``: the answer carries the next page's URL at ``next_path`` (absolute, or
      relative to the page's URL), followed as it is;
    - ``link_header``: the answer's RFC 8288 ``Link: <...>; rel="next"`` header is the next
      page's URL.

    A next page's URL must be on the source's own host (scheme, host and port of the base
    URL); one elsewhere fails the run rather than send the source's headers there.

    ``size_param``/``size`` ask for a page size (on the first page only, for ``next_url`` and
    ``link_header``: the next URL says the rest). The listing ends on an empty page, a page
    shorter than ``size`` (``page`` and ``offset``), a missing cursor or next URL, or when
    ``total_path`` says every item was listed.
    """

    style: Literal["page", "offset", "cursor", "next_url", "link_header"] = "page"
    param: str = "page"
    size_param: str | None = "per_page"
    size: int = 100
    start: int | None = None
    cursor_path: str | None = None
    total_path: str | None = None
    next_path: str | None = None

    def __post_init__(self) -> None:
        if self.style == "cursor" and not self.cursor_path:
            raise ValueError("Pagination(style='cursor') needs cursor_path")
        if self.style == "next_url" and not self.next_path:
            raise ValueError(
                "Pagination(style='next_url') needs next_path, where the answer has the next"
                " page's URL (for example next_path='next_page_url')"
            )

    @property
    def follows_urls(self) -> bool:
        """Whether each answer names the next page's URL (``next_url``, ``link_header``)."""
        return self.style in ("next_url", "link_header")


ItemMapper = Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]]
"""(listed item, its detail or None) -> the record's fields, by target column name."""


def merge_item(item: dict[str, Any], detail: dict[str, Any] | None) -> dict[str, Any]:
    """The default mapping: the listed item's fields, overlaid by the detail's."""
    return {**item, **(detail or {})}


@dataclass(frozen=True)
class Incremental:
    """Incremental runs of an API source: a run lists only what changed since the last
    completed run. Each listed item carries its cursor at ``cursor_path`` (an update time, a
    version number); the list is asked with ``param`` set to the highest cursor value of the
    last completed (not dry) run of the importer, or ``initial`` when there is none (None: the
    first run lists everything). A failed or cancelled run does not move the cursor; a run
    triggered with ``full`` (``--full``, ``"full": true``) or a full refresh lists everything.

    Cursor values compare as numbers, or as ISO 8601 times when they are such strings (a time
    without an offset is taken as UTC), or else as strings."""

    cursor_path: str
    param: str
    initial: str | int | float | None = None


@dataclass(frozen=True)
class ApiSource:
    """A paginated HTTP API, imported in two phases: discovery lists every page and records
    each item as ``pending``; details fetches each item (``detail_path``, with ``{id}`` for
    its external id) and upserts the mapped record. Both go through the cluster-wide
    ``rate`` limit; a 429 backs the whole source off and is never a final failure."""

    base_url: str | None = None
    base_url_env: str | None = None
    list_path: str = "/items"
    items_path: str = "data"
    id_path: str = "id"
    pagination: Pagination = field(default_factory=Pagination)
    detail_path: str | None = None
    detail_data_path: str | None = None
    map: ItemMapper = merge_item
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    secret_headers: Mapping[str, str] = field(default_factory=dict)
    rate: RateLimit = field(default_factory=lambda: RateLimit(per_second=5, burst=5))
    limiter_key: str | None = None
    max_attempts: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 30.0
    concurrency: int = 8
    incremental: Incremental | None = None
    detail_batch: int = 20
    """Items per detail batch: each listed page is cut into batches of this many, which spread
    over the workers; a batch is one transaction writing its records and its items' states. A
    transient failure (a 5xx, a timeout) is not retried inside its batch: the item moves to a
    retry batch of its own, due after its backoff, so it holds neither its batch nor a worker."""

    kind = "api"

    def __post_init__(self) -> None:
        if not self.base_url and not self.base_url_env:
            raise ValueError("ApiSource needs base_url or base_url_env")
        if self.max_attempts < 1:
            raise ValueError("ApiSource.max_attempts must be at least 1")
        if self.detail_batch < 1:
            raise ValueError("ApiSource.detail_batch must be at least 1")


PullSource = UrlSource | FtpSource | FilesystemSource | ApiSource
