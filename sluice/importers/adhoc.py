"""Ad-hoc imports: no importer code, the table's columns and types come from the file."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sluice.errors import MappingError
from sluice.importers.dsl import Field, Importer

ADHOC = "adhoc"

_INT = re.compile(r"[+-]?\d{1,18}")
_NUM = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOOL = {"true", "false", "t", "f", "yes", "no"}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TS = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?")

# Most specific first; a column takes the first type every sampled value fits.
_CANDIDATES = (
    ("bigint", _INT.fullmatch),
    ("numeric", _NUM.fullmatch),
    ("boolean", lambda v: v.lower() in _BOOL),
    ("date", _DATE.fullmatch),
    ("timestamptz", _TS.fullmatch),
)


def normalize_identifier(name: str, position: int) -> str:
    """A header name as a column name: lower case, ``[a-z0-9_]``, at most 63 bytes."""
    ident = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_")
    if not ident:
        ident = f"column_{position + 1}"
    if ident[0].isdigit():
        ident = f"c_{ident}"
    return ident[:63]


def infer_type(values: Iterable[str | None]) -> str:
    seen = [v.strip() for v in values if v is not None and v.strip()]
    if not seen:
        return "text"
    for name, fits in _CANDIDATES:
        if all(fits(v) for v in seen):
            return name
    return "text"


def infer_fields(header: Sequence[str], sample: Sequence[Sequence[str | None]]) -> list[Field]:
    fields = []
    used: set[str] = set()
    for i, name in enumerate(header):
        ident = normalize_identifier(name, i)
        while ident in used:
            ident = f"{ident}_{i + 1}"[:63]
        used.add(ident)
        column = [row[i] if i < len(row) else None for row in sample]
        fields.append(Field(ident, infer_type(column), aliases=(name,)))
    return fields


def adhoc_importer(
    table: str, key: Sequence[str], fields: Sequence[Field], *, schema: str = "public"
) -> Importer:
    names = {f.name for f in fields}
    by_alias = {a: f.name for f in fields for a in f.aliases}
    resolved = []
    for k in key:
        column = k if k in names else by_alias.get(k) or normalize_identifier(k, 0)
        if column not in names:
            raise MappingError(
                f"key column {k!r} is not in the file; its columns are: "
                f"{', '.join(sorted(names))}. Pass --key with one of them."
            )
        resolved.append(column)
    # Key columns cannot be NULL; other columns keep their inferred type.
    return Importer(
        slug=ADHOC,
        table=table,
        schema=schema,
        fields=tuple(fields),
        key=tuple(resolved),
        validate_in_database=True,
    )
