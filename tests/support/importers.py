"""Importers used by the pipeline tests, loaded by the workers through ``SLUICE_IMPORTERS``.

Each test gets its own importer and table, so tests do not depend on each other's data.
"""

from __future__ import annotations

import dataclasses
import os

from sluice.schemas.importers import Field, Importer, Lookup, Schedule, UriKey
from sluice.schemas.runs import DuplicatePolicy
from sluice.schemas.sources import (
    ApiSource,
    FilesystemSource,
    FtpSource,
    Incremental,
    Pagination,
    RateLimit,
    UrlSource,
)

# Where the tests serve the sources (tests/conftest.py picks the ports).
API_URL = os.environ.get("SLUICE_TEST_API_URL", "http://127.0.0.1:9")
HTTP_URL = os.environ.get("SLUICE_TEST_HTTP_URL", "http://127.0.0.1:9")
GUARD_URL = os.environ.get("SLUICE_TEST_GUARD_URL", "http://127.0.0.1:9")
TRAP_URL = os.environ.get("SLUICE_TEST_TRAP_URL", "http://127.0.0.2:9")
FTP_PORT = int(os.environ.get("SLUICE_TEST_FTP_PORT", "21"))
SFTP_PORT = int(os.environ.get("SLUICE_TEST_SFTP_PORT", "22"))
KNOWN_HOSTS = os.environ.get("SLUICE_TEST_SFTP_KNOWN_HOSTS", "/nonexistent")


def items(
    slug: str, policy: DuplicatePolicy = DuplicatePolicy.UPSERT, batch_size: int | None = None
) -> Importer:
    return Importer(
        slug=slug,
        table=slug,
        key=("id",),
        fields=(
            Field("id", "bigint", aliases=("item id", "ID")),
            Field("name", "text", aliases=("item name", "title"), required=True),
            Field("price", "numeric", aliases=("unit price",)),
            Field("qty", "integer", aliases=("quantity",)),
            Field("day", "date", aliases=("date",)),
            Field("version", "integer"),
        ),
        policy=policy,
        version_column="version" if policy is DuplicatePolicy.UPDATE_IF_NEWER else None,
        batch_size=batch_size,
    )


exact = items("t_exact")
dups = items("t_dups", batch_size=200)
killed = items("t_killed", batch_size=100)
malformed = items("t_malformed")
failing = items("t_failing")
dry = items("t_dry")
delims = items("t_delims")
skip = items("t_skip", DuplicatePolicy.SKIP)
newer = items("t_newer", DuplicatePolicy.UPDATE_IF_NEWER)
# The same rows in one batch, and in a batch each: ties of versions must end the same way.
newer_ties = items("t_newer_ties", DuplicatePolicy.UPDATE_IF_NEWER)
newer_apart = items("t_newer_apart", DuplicatePolicy.UPDATE_IF_NEWER, batch_size=1)
strict = items("t_strict", DuplicatePolicy.FAIL)
cli_items = items("t_cli")
cancelled = items("t_cancel", batch_size=100)
retried = items("t_retry")
api_items = items("t_api")
sdk_items = items("t_sdk", batch_size=200)
hooked = items("t_hook")
# tests/storage/test_objectstore.py: the same import from each file store, side by side.
s3_from_pg = items("t_s3_pg")
s3_from_objects = items("t_s3_obj")
s3_killed = items("t_s3_killed", batch_size=100)
s3_items = items("t_s3")
# tests/storage/test_local_store.py: the same import from PostgreSQL and from a directory.
local_from_pg = items("t_local_pg")
local_from_disk = items("t_local_disk")
# tests/sluice/test_metrics.py: small batches into one table, under two policies.
metered = items("t_metrics", batch_size=20)
metered_skip = dataclasses.replace(items("t_metrics_skip", DuplicatePolicy.SKIP), table="t_metrics")
dates = items("t_dates")


# ---------------------------------------------------------------- pull sources


def pulled(slug: str, pull: object, schedule: Schedule | None = None) -> Importer:
    """The items table, filled from a pull source."""
    base = items(slug)
    return Importer(
        slug=slug,
        table=slug,
        key=base.key,
        fields=base.fields,
        pull=pull,  # type: ignore[arg-type]
        schedule=schedule,
    )


url_items = pulled("t_url", UrlSource())
url_small = pulled("t_url_small", UrlSource(max_bytes=1000))
fs_items = pulled("t_fs", FilesystemSource())
ftp_items = pulled(
    "t_ftp",
    FtpSource(
        host="127.0.0.1",
        port=FTP_PORT,
        folder="/in",
        pattern="orders-*.csv",
        user_env="SLUICE_TEST_FTP_USER",
        password_env="SLUICE_TEST_FTP_PASSWORD",
        after="move",
        move_to="/done",
        timeout=10,
    ),
)
ftp_wrong = pulled(
    "t_ftp_wrong",
    FtpSource(
        host="127.0.0.1",
        port=FTP_PORT,
        folder="/in",
        pattern="orders-*.csv",
        user_env="SLUICE_TEST_FTP_USER",
        password_env="SLUICE_TEST_FTP_WRONG",
        timeout=10,
    ),
)
sftp_items = pulled(
    "t_sftp",
    FtpSource(
        host="127.0.0.1",
        protocol="sftp",
        port=SFTP_PORT,
        folder="/in",
        pattern="orders-*.csv",
        user_env="SLUICE_TEST_FTP_USER",
        password_env="SLUICE_TEST_FTP_PASSWORD",
        after="move",
        move_to="/done",
        known_hosts=KNOWN_HOSTS,
        timeout=10,
    ),
)
sftp_wrong = pulled(
    "t_sftp_wrong",
    FtpSource(
        host="127.0.0.1",
        protocol="sftp",
        port=SFTP_PORT,
        folder="/in",
        pattern="orders-*.csv",
        user_env="SLUICE_TEST_FTP_USER",
        password_env="SLUICE_TEST_FTP_WRONG",
        known_hosts=KNOWN_HOSTS,
        timeout=10,
    ),
)
scheduled = pulled(
    "t_sched",
    UrlSource(url=f"{HTTP_URL}/slow.csv"),
    schedule=Schedule("* * * * * */2", enabled=False),
)


def api_importer(
    slug: str,
    per_second: float,
    burst: int,
    page_size: int = 100,
    pagination: Pagination | None = None,
    backoff: float = 0.05,
    incremental: Incremental | None = None,
    *,
    base_url: str = API_URL,
    max_attempts: int = 4,
    backoff_max: float = 30.0,
    concurrency: int = 8,
) -> Importer:
    """Items of the fake paginated API (tests/support/servers/paginated_api.py), paged by
    page number unless ``pagination`` says otherwise."""
    pages = pagination or Pagination(
        style="page", param="page", size_param="per_page", size=page_size
    )
    return Importer(
        slug=slug,
        table=slug,
        key=("id",),
        fields=(
            Field("id", "text"),
            Field("name", "text", required=True),
            Field("price", "numeric"),
            Field("updated_at", "timestamptz"),
        ),
        pull=ApiSource(
            base_url=base_url,
            list_path="/items",
            items_path="data",
            id_path="id",
            pagination=pages,
            detail_path="/items/{id}",
            detail_data_path="data",
            rate=RateLimit(per_second=per_second, burst=burst),
            limiter_key=slug,
            max_attempts=max_attempts,
            backoff=backoff,
            backoff_max=backoff_max,
            concurrency=concurrency,
            incremental=incremental,
        ),
    )


api_rated = api_importer("t_api_rated", per_second=200, burst=20)
api_killed = api_importer("t_api_killed", per_second=150, burst=10, page_size=50)
api_small = api_importer("t_api_small", per_second=100, burst=10, page_size=10)
api_incremental = api_importer(
    "t_api_incremental",
    per_second=200,
    burst=20,
    page_size=50,
    incremental=Incremental(cursor_path="updated_at", param="updated_since"),
)
# Retries due 1.5-3 s after a failure: long enough to kill the workers while items wait.
api_retry_killed = api_importer(
    "t_api_retry_killed", per_second=100, burst=10, page_size=50, backoff=3.0
)
api_linked = api_importer(
    "t_api_linked",
    per_second=200,
    burst=20,
    pagination=Pagination(style="link_header", size_param="limit", size=25),
)


def guarded_api(slug: str, base_url: str, list_path: str, detail_path: str) -> Importer:
    """tests/agents/test_security.py: an API source that reaches, or is redirected to, the trap."""
    importer = api_importer(slug, per_second=100, burst=10)
    assert isinstance(importer.pull, ApiSource)
    pull = dataclasses.replace(
        importer.pull,
        base_url=base_url,
        list_path=list_path,
        detail_path=detail_path,
        headers={"X-Api-Key": "guarded-secret"},
        max_attempts=2,
    )
    return dataclasses.replace(importer, pull=pull)


api_trapped = guarded_api("t_api_trapped", TRAP_URL, "/items", "/items/{id}")
api_list_redirect = guarded_api("t_api_list_redirect", GUARD_URL, "/to-trap", "/items/{id}")
api_detail_redirect = guarded_api(
    "t_api_detail_redirect", GUARD_URL, "/items", "/detail-to-trap/{id}"
)


# ---------------------------------------------------------------- AT Protocol projection

posts = Importer(
    slug="t_posts",
    table="t_posts",
    key=UriKey("uri", "at://{did}/{collection}/{rkey}"),
    fields=(
        Field("did", "text"),
        Field("collection", "text"),
        Field("rkey", "text"),
        Field("rev", "text"),
        Field("text", "text", required=True),
        Field("n", "integer"),
    ),
    firehose=("app.bsky.feed.post",),
    sources=(),
)


# ---------------------------------------------------------------- full refresh


def refreshing(slug: str, **options: object) -> Importer:
    return Importer(
        slug=slug,
        table=slug,
        key=("id",),
        fields=(
            Field("id", "bigint"),
            Field("name", "text", required=True),
            Field("supplier", "text"),
            Field("price", "numeric"),
        ),
        **options,  # type: ignore[arg-type]
    )


fresh_plain = refreshing("t_fresh")
fresh_scoped = refreshing("t_fresh_scoped", refresh_scope=("supplier",))
fresh_soft = refreshing("t_fresh_soft", fresh=True, soft_delete_column="deleted_at")
skip_dup = dataclasses.replace(items("t_skipdup"), skip_duplicate_files=True)
provenance = items("t_prov")


# ---------------------------------------------------------------- lookups

# Products name their supplier by code; the table stores suppliers.id (tests/storage/test_lookups.py
# creates t_lookup_suppliers). Small batches: a file makes many, each resolved by one query.
lookup_products = Importer(
    slug="t_lookup",
    table="t_lookup",
    key=("sku",),
    fields=(
        Field("sku", "text"),
        Field("name", "text", required=True),
        Field("supplier_code", "text", aliases=("supplier",)),
    ),
    lookups=(Lookup("supplier_code", "t_lookup_suppliers", "code", "supplier_id"),),
    batch_size=200,
)


# ---------------------------------------------------------------- XLSX and Parquet


def typed(slug: str) -> Importer:
    """One column of each type, for the same rows written as CSV, XLSX and Parquet
    (tests/agents/split/test_tabular.py)."""
    return Importer(
        slug=slug,
        table=slug,
        key=("id",),
        fields=(
            Field("id", "integer"),
            Field("name", "text", required=True),
            Field("code", "text"),
            Field("qty", "integer"),
            Field("price", "numeric"),
            Field("day", "date"),
            Field("active", "boolean"),
            Field("seen_at", "timestamptz"),
        ),
    )


typed_csv = typed("t_typed_csv")
typed_xlsx = typed("t_typed_xlsx")
typed_parquet = typed("t_typed_parquet")


# ---------------------------------------------------------------- European and UK formats

# Prices as a German shop writes them: decimal commas, '.' between thousands (importer-wide),
# dates day first (the field's own formats); "born" has no format of its own.
euro_prices = Importer(
    slug="t_euro",
    table="t_euro",
    key=("sku",),
    fields=(
        Field("sku", "text", aliases=("Artikel",)),
        Field("price", "numeric", required=True, aliases=("Preis",)),
        Field("since", "date", date_format=("%d.%m.%Y", "%d/%m/%Y"), aliases=("Seit",)),
        Field("born", "date"),
    ),
    decimal=",",
    thousands=".",
)
# The same columns with no reading declared: the run's --date-format and --decimal-comma say.
plain_prices = Importer(
    slug="t_euro_plain",
    table="t_euro_plain",
    key=("sku",),
    fields=(Field("sku"), Field("price", "numeric"), Field("since", "date")),
)
