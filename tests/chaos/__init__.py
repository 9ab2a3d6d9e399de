"""Fault injection (``make chaos``; one round runs in ``make test``): SIGKILLed workers, a broker
that restarts and loses its topics, a PostgreSQL restart, on a stack of its own.

The workers of that stack load the importers below (``SLUICE_IMPORTERS=tests.chaos``): one table
per case, so a case never reads another's rows. Nothing here reads the environment at import:
the API source names the variable that holds its address, which only the workers read.
"""

from __future__ import annotations

from sluice.schemas.importers import Field, Importer
from sluice.schemas.sources import ApiSource, Pagination, RateLimit

API_URL_ENV = "SLUICE_CHAOS_API_URL"


def items(slug: str, batch_size: int, *, in_database: bool = False) -> Importer:
    """The items table of the pipeline tests, with small batches: many batches per file;
    ``in_database``: its values checked by PostgreSQL, so its files travel as COPY batches and
    are read by byte ranges (agents/split/ranges.py)."""
    return Importer(
        slug=slug,
        table=slug,
        key=("id",),
        fields=(
            Field("id", "bigint"),
            Field("name", "text", required=True),
            Field("price", "numeric"),
            Field("qty", "integer"),
            Field("day", "date"),
            Field("version", "integer"),
        ),
        batch_size=batch_size,
        validate_in_database=in_database,
    )


# Workers SIGKILLed while a file is read by byte ranges in their pools; the broker and the
# PostgreSQL cases go the JSON way, read from start to end.
kill_import = items("chaos_kill", batch_size=100, in_database=True)
broker_import = items("chaos_broker", batch_size=100)
pg_import = items("chaos_pg", batch_size=100)

api_items = Importer(
    slug="chaos_api",
    table="chaos_api",
    key=("id",),
    fields=(
        Field("id", "text"),
        Field("name", "text", required=True),
        Field("price", "numeric"),
        Field("updated_at", "timestamptz"),
    ),
    pull=ApiSource(
        base_url_env=API_URL_ENV,
        list_path="/items",
        items_path="data",
        id_path="id",
        pagination=Pagination(style="page", param="page", size_param="per_page", size=50),
        detail_path="/items/{id}",
        detail_data_path="data",
        rate=RateLimit(per_second=150, burst=10),
        limiter_key="chaos_api",
        max_attempts=4,
        backoff=0.05,
        concurrency=8,
    ),
)
