"""The importer of bench/api_rate.py: the benchmark's local paginated API (the test suite's
FakeApi) at ``SLUICE_BENCH_API_URL``, at the limit the API documents (20 requests/s and a
burst of 5 unless the benchmark says otherwise), 100 items a page, each item's detail fetched
on its own."""

from __future__ import annotations

import os

from sluice.schemas.importers import Field, Importer
from sluice.schemas.sources import ApiSource, Pagination, RateLimit

RATE = float(os.environ.get("SLUICE_BENCH_RATE", "20"))
BURST = int(os.environ.get("SLUICE_BENCH_BURST", "5"))
ATTEMPTS = int(os.environ.get("SLUICE_BENCH_MAX_ATTEMPTS", "5"))  # ApiSource's defaults
BACKOFF = float(os.environ.get("SLUICE_BENCH_BACKOFF", "0.5"))
BACKOFF_MAX = float(os.environ.get("SLUICE_BENCH_BACKOFF_MAX", "30"))

bench_api = Importer(
    slug="bench_api",
    table="bench_api",
    key=("id",),
    fields=(
        Field("id", "text"),
        Field("name", "text", required=True),
        Field("price", "numeric"),
        Field("updated_at", "timestamptz"),
    ),
    pull=ApiSource(
        base_url=os.environ.get("SLUICE_BENCH_API_URL", "http://127.0.0.1:9"),
        list_path="/items",
        items_path="data",
        id_path="id",
        pagination=Pagination(style="page", param="page", size_param="per_page", size=100),
        detail_path="/items/{id}",
        detail_data_path="data",
        rate=RateLimit(per_second=RATE, burst=BURST),
        max_attempts=ATTEMPTS,
        backoff=BACKOFF,
        backoff_max=BACKOFF_MAX,
        concurrency=4,
    ),
)
