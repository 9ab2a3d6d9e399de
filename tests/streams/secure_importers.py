"""Importers of the secured pipeline tests (tests/streams/test_secure_pipeline.py), loaded by
their workers through ``SLUICE_IMPORTERS``: a file importer and a paginated-API importer per
security mode, each with its own table, so the modes share the session stack's PostgreSQL
without sharing data. The API importers read the fake API's address from
``SLUICE_TEST_API_URL`` (each mode's worker gets its own)."""

from __future__ import annotations

from tests.support.importers import api_importer, items

MODES = ("tls", "mtls", "sasl_ssl", "sasl_plaintext")

sec_tls = items("t_sec_tls")
sec_mtls = items("t_sec_mtls")
sec_sasl_ssl = items("t_sec_sasl_ssl")
sec_sasl_plaintext = items("t_sec_sasl_plaintext")

sec_tls_api = api_importer("t_sec_tls_api", per_second=500, burst=50, page_size=50)
sec_mtls_api = api_importer("t_sec_mtls_api", per_second=500, burst=50, page_size=50)
sec_sasl_ssl_api = api_importer("t_sec_sasl_ssl_api", per_second=500, burst=50, page_size=50)
sec_sasl_plaintext_api = api_importer(
    "t_sec_sasl_plaintext_api", per_second=500, burst=50, page_size=50
)
