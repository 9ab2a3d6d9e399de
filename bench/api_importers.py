"""The importer of bench/api_rate.py: the benchmark's local paginated API (the test suite's
FakeApi) at ``SLUICE_BENCH_API_URL``, at the limit the API documents (20 requests/s and a
burst of 5 unless the benchmark says otherwise), 100 items a page, each item's detail fetched
on its own, with ApiSource's default retries unless the benchmark says otherwise. The same
importer as the suite's API tests (tests/support/importers.api_importer)."""

from __future__ import annotations

import os

from tests.support.importers import api_importer

bench_api = api_importer(
    "bench_api",
    per_second=float(os.environ.get("SLUICE_BENCH_RATE", "20")),
    burst=int(os.environ.get("SLUICE_BENCH_BURST", "5")),
    base_url=os.environ.get("SLUICE_BENCH_API_URL", "http://127.0.0.1:9"),
    max_attempts=int(os.environ.get("SLUICE_BENCH_MAX_ATTEMPTS", "5")),
    backoff=float(os.environ.get("SLUICE_BENCH_BACKOFF", "0.5")),
    backoff_max=float(os.environ.get("SLUICE_BENCH_BACKOFF_MAX", "30")),
    concurrency=4,
)
