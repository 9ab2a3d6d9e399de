"""Importers used by the pipeline tests, loaded by the workers through ``SLUICE_IMPORTERS``.

Each test gets its own importer and table, so tests do not depend on each other's data.
"""

from __future__ import annotations

from schemas.runs import DuplicatePolicy
from sluice.importers.dsl import Field, Importer


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
strict = items("t_strict", DuplicatePolicy.FAIL)
cli_items = items("t_cli")
cancelled = items("t_cancel", batch_size=100)
retried = items("t_retry")
api_items = items("t_api")
sdk_items = items("t_sdk", batch_size=200)
hooked = items("t_hook")
