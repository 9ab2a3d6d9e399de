"""Ad-hoc imports: no importer code, the table's columns and types come from the file."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from sluice.errors import MappingError
from sluice.schemas.importers import ADHOC, Field, Importer

# Cell values an ad-hoc import reads as null, besides a blank cell; ``null_markers`` in the
# import's options replaces them.
DEFAULT_NULL_MARKERS = ("NA", "N/A", "NULL", "null", "None", "-")

# PostgreSQL's limits: columns per table (and per column definition list: a batch is read
# with json_to_recordset(...) AS x(row number, sub-row, columns...), two more than the table
# has), bytes per identifier.
PG_MAX_COLUMNS = 1600
MAX_COLUMNS = PG_MAX_COLUMNS - 2
MAX_IDENTIFIER_BYTES = 63
# Names PostgreSQL keeps for the system columns of every table.
_SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid", "oid"})

# Value shapes, shared with sluice.agents.split.evolve (which judges what still fits a column).
INTEGER = re.compile(r"[+-]?\d+")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# A date alone is a timestamp too (an Excel midnight reads as a date).
TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?)?"
)
# Inference is stricter than what PostgreSQL accepts: a column of "1"/"0" or "y"/"n" stays a
# number or text, not a boolean.
_INT = re.compile(r"[+-]?\d{1,18}")
_BOOL = {"true", "false", "t", "f", "yes", "no"}

# Most specific first; a column takes the first type every sampled value fits.
_CANDIDATES = (
    ("bigint", _INT.fullmatch),
    ("numeric", NUMBER.fullmatch),
    ("boolean", lambda v: v.lower() in _BOOL),
    ("date", DATE.fullmatch),
    ("timestamptz", TIMESTAMP.fullmatch),
)


def normalize_identifier(name: str, position: int) -> str:
    """A header name as a column name: lower case, ``[a-z0-9_]``, at most 63 bytes.

    Anything else (quotes, semicolons, spaces, other letters) becomes ``_``; a name that would be
    empty becomes ``column_N``, and one that starts with a digit or is a system column's name
    (``xmin``, ``ctid``, ...) gets a ``c_`` prefix. SQL keywords stay: every statement quotes
    its identifiers.
    """
    ident = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_")
    if not ident:
        ident = f"column_{position + 1}"
    if ident[0].isdigit() or ident in _SYSTEM_COLUMNS:
        ident = f"c_{ident}"
    return ident[:MAX_IDENTIFIER_BYTES]


def infer_type(values: Iterable[str | None], nulls: Collection[str] = ()) -> str:
    stripped = (v.strip() for v in values if v is not None)
    seen = [v for v in stripped if v and v not in nulls]
    if not seen:
        return "text"
    for name, fits in _CANDIDATES:
        if all(fits(v) for v in seen):
            return name
    return "text"


def infer_fields(
    header: Sequence[str], sample: Sequence[Sequence[str | None]], nulls: Collection[str] = ()
) -> list[Field]:
    """One text-typed-or-better field per header name, each with a distinct column name.

    A header that already is a clean column name keeps it; the others are normalized, and get a
    ``_N`` suffix (N: the column's position) when that name is taken. The original header is
    the field's alias, so each column of the file maps to its own field.
    """
    idents = [normalize_identifier(name, i) for i, name in enumerate(header)]
    used = {ident for ident, name in zip(idents, header, strict=True) if ident == name}
    fields = []
    for i, name in enumerate(header):
        ident = idents[i]
        if ident != name:
            ident = _unique(ident, i, used)
            used.add(ident)
        column = [row[i] if i < len(row) else None for row in sample]
        fields.append(Field(ident, infer_type(column, nulls), aliases=(name,)))
    return fields


def to_existing_columns(fields: Sequence[Field], columns: Sequence[str]) -> list[Field]:
    """Fields renamed to the existing table's columns they mean: the header spelled as the
    column (``OrderDate``, a quoted mixed-case column), else the column whose normalized name
    is the field's. A table made by hand keeps its names; no look-alike column is added."""
    present = set(columns)
    normalized: dict[str, str] = {}
    for i, column in enumerate(columns):
        normalized.setdefault(normalize_identifier(column, i), column)
    taken: set[str] = set()
    out = []
    for f in fields:
        header = f.aliases[0] if f.aliases else f.name
        if header in present:
            name = header
        elif f.name in present:
            name = f.name
        else:
            name = normalized.get(f.name, f.name)
        if name in taken:  # two headers meaning one column: the later one stays its own
            name = f.name
        taken.add(name)
        out.append(Field(name, f.type, aliases=f.aliases) if name != f.name else f)
    return out


def _unique(ident: str, position: int, used: set[str]) -> str:
    candidate, n = ident, 0
    while candidate in used:
        n += 1
        suffix = f"_{position + 1}" if n == 1 else f"_{position + 1}_{n}"
        candidate = ident[: MAX_IDENTIFIER_BYTES - len(suffix)] + suffix
    return candidate


def check_name(what: str, name: str) -> None:
    """Refuse a table or schema name PostgreSQL would truncate or cannot store."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if not name.strip() or size > MAX_IDENTIFIER_BYTES or "\x00" in name:
        raise MappingError(
            f"{what} name {name!r} cannot be used: a PostgreSQL name is 1 to "
            f"{MAX_IDENTIFIER_BYTES} bytes without NUL characters (this one is {size} bytes). "
            f"Choose a shorter {what} name"
        )


def adhoc_importer(
    table: str,
    key: Sequence[str],
    fields: Sequence[Field],
    *,
    schema: str = "public",
    null_markers: Sequence[str] = DEFAULT_NULL_MARKERS,
) -> Importer:
    check_name("table", table)
    check_name("schema", schema)
    if len(fields) > MAX_COLUMNS:
        raise MappingError(
            f"the file has {len(fields)} columns, but a PostgreSQL table can have at most "
            f"{PG_MAX_COLUMNS} columns, and an import at most {MAX_COLUMNS} (two go to "
            f"bookkeeping): import fewer columns (split the file by columns, or drop the ones "
            f"you do not need), or create the table yourself with the columns to keep and "
            f"import into it"
        )
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
        null_markers=tuple(null_markers),
    )
