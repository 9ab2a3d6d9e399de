"""Ad-hoc imports: no importer code, the table's columns and types come from the file."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime

from sluice.agents.split.read import Reading, RunReading
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


# Numbers and dates as Europe and the UK write them: 1.234,5 and 10.03.2024 or 10/03/2024.
_COMMA_NUMBER = re.compile(r"[+-]?(\d{1,3}(\.\d{3})+|\d+)(,\d+)?")
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,(\d{1,2}|\d{4,})|[+-]?\d{1,3}(\.\d{3})+,\d+")
_NUMERIC_DATE = re.compile(r"(\d{1,2})([./-])(\d{1,2})\2(\d{4})")
_EURO_READING = Reading(decimal=",", thousands=".", by="inferred")


def infer_type(values: Iterable[str | None], nulls: Collection[str] = ()) -> str:
    return infer_column(values, nulls)[0]


def infer_column(
    values: Iterable[str | None],
    nulls: Collection[str] = (),
    run: RunReading = RunReading(),
    *,
    semicolons: bool = False,
) -> tuple[str, Reading | None]:
    """A column's type and, for numbers or dates not written as ISO and ``.`` decimals, how
    they are read (with the evidence; a reading without formats or separators says why the
    column stays text). ``semicolons``: the file is separated by ``;``, as files with decimal
    commas usually are."""
    stripped = (v.strip() for v in values if v is not None)
    seen = [v for v in stripped if v and v not in nulls]
    if not seen:
        return "text", None
    # With a hint of decimal commas they are tried before "." numbers (1.234 is then 1234),
    # else after every ISO type.
    comma_first = run.decimal_comma or semicolons
    for name, fits in _CANDIDATES:
        if name == "numeric" and comma_first and (found := _comma_numbers(seen, run, semicolons)):
            return found
        if all(fits(v) for v in seen):
            return name, None
    comma = None if comma_first else _comma_numbers(seen, run, semicolons)
    return comma or _dates(seen, run) or ("text", None)


def _comma_numbers(
    seen: list[str], run: RunReading, semicolons: bool
) -> tuple[str, Reading | None] | None:
    """Numeric with a decimal comma, when every value is written so and the column shows it."""
    if not all(_COMMA_NUMBER.fullmatch(v) for v in seen) or all(_INT.fullmatch(v) for v in seen):
        return None
    evidence = next((v for v in seen if _DECIMAL_COMMA.fullmatch(v)), None)
    if evidence is not None:
        why = f"{evidence!r} has a decimal comma"
    elif run.decimal_comma:
        why = "the run's decimal comma (--decimal-comma)"
    elif semicolons and any("," in v for v in seen):
        why = "the file is separated by semicolons, and its numbers have commas"
    else:
        return None  # 1.234 and 1,234 alone read as ISO numbers or text, as before
    by = "inferred" if evidence is not None or not run.decimal_comma else "run"
    return "numeric", dataclasses.replace(_EURO_READING, by=by, why=why)


def _dates(seen: list[str], run: RunReading) -> tuple[str, Reading | None] | None:
    """A date column written day first or month first: read by the run's formats when every
    value fits them, else by evidence (a day above 12 decides); every value ambiguous stays
    text, and the reading says what to pass."""
    if run.date_formats and all(_fits_any(v, run.date_formats) for v in seen):
        why = "the run's date format (--date-format)"
        return "date", Reading(formats=run.date_formats, by="run", why=why)
    parts = [_NUMERIC_DATE.fullmatch(v) for v in seen]
    if not all(parts):
        return None
    matches = [m for m in parts if m is not None]
    separators = sorted({m.group(2) for m in matches})
    day_first = next((m.group(0) for m in matches if int(m.group(1)) > 12), None)
    month_first = next((m.group(0) for m in matches if int(m.group(3)) > 12), None)
    if day_first and month_first:
        why = f"{day_first!r} is day first but {month_first!r} month first: read as text"
        return "text", Reading(by="inferred", why=why)
    if day_first or month_first:
        order = "%d{0}%m{0}%Y" if day_first else "%m{0}%d{0}%Y"
        formats = tuple(order.format(sep) for sep in separators)
        which, value = ("day", day_first) if day_first else ("month", month_first)
        why = f"{value!r} has the {which} first (a number above 12 is not a month)"
        return "date", Reading(formats=formats, by="inferred", why=why)
    sep = separators[0]
    why = (
        f"every value is ambiguous (day and month are both 12 or less, as in {seen[0]!r}):"
        f" read as text; give the run a date format (--date-format, date_format in the API):"
        f" %d{sep}%m{sep}%Y for day first or %m{sep}%d{sep}%Y for month first"
    )
    return "text", Reading(by="inferred", why=why)


def _fits_any(value: str, formats: tuple[str, ...]) -> bool:
    for fmt in formats:
        try:
            datetime.strptime(value, fmt)
        except ValueError:
            continue
        return True
    return bool(DATE.fullmatch(value))


def infer_fields(
    header: Sequence[str],
    sample: Sequence[Sequence[str | None]],
    nulls: Collection[str] = (),
    run: RunReading = RunReading(),
    *,
    semicolons: bool = False,
    readings: dict[str, Reading] | None = None,
) -> list[Field]:
    """One text-typed-or-better field per header name, each with a distinct column name.

    A header that already is a clean column name keeps it; the others are normalized, and get a
    ``_N`` suffix (N: the column's position) when that name is taken. The original header is
    the field's alias, so each column of the file maps to its own field. Numbers with decimal
    commas and day- or month-first dates are read by the reading inferred (see
    ``infer_column``), which ``readings`` receives by field name with its evidence.
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
        type_, reading = infer_column(column, nulls, run, semicolons=semicolons)
        if reading is not None and readings is not None:
            readings[ident] = reading
        if reading is not None and (reading.formats or reading.decimal):
            fields.append(
                Field(
                    ident,
                    type_,
                    aliases=(name,),
                    date_format=reading.formats or None,
                    decimal=reading.decimal,
                    thousands=reading.thousands,
                )
            )
        else:
            fields.append(Field(ident, type_, aliases=(name,)))
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
        out.append(dataclasses.replace(f, name=name) if name != f.name else f)
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
