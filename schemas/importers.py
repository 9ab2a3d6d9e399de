"""Declarative importer definitions.

An importer says where rows come from, how their columns map to a target table, how values are
typed and validated, what the key is, and what to do when a key already exists::

    products = Importer(
        slug="products",
        table="products",
        key=("sku",),
        fields=(
            Field("sku", "text", aliases=("SKU code", "item")),
            Field("price", "numeric", required=True),
        ),
    )
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sluice.errors import NoPullSource
from sluice.schemas.formats import FormatOptions
from sluice.schemas.runs import PULL_KINDS, DuplicatePolicy
from sluice.schemas.sources import PullSource
from sluice.schemas.webhooks import DEFAULT_WEBHOOK_EVENTS, check_webhook_target

# Column types an importer can declare: the Python type pydantic validates into, and the
# PostgreSQL type of the target column.
TYPES: dict[str, tuple[Any, str]] = {
    "text": (str, "text"),
    "integer": (int, "integer"),
    "bigint": (int, "bigint"),
    "numeric": (Decimal, "numeric"),
    "double": (float, "double precision"),
    "boolean": (bool, "boolean"),
    "date": (date, "date"),
    "timestamptz": (datetime, "timestamptz"),
    "jsonb": (Any, "jsonb"),
}

Transform = Callable[[dict[str, Any]], dict[str, Any]]

ADHOC = "adhoc"
"""The importer name of an ad-hoc import (a table and key given with the run, no importer)."""


@dataclass(frozen=True)
class Lookup:
    """Fill ``target`` with ``table.returns`` of the row whose ``table.match`` equals the
    record's ``field``.

    ``field`` is mapped from the file like any field and stays in the record; ``target`` is a
    column of the importing table (of ``target_type`` when Sluice creates the table). With
    ``create_missing`` a code that is not in ``table`` is inserted (only its ``match`` column:
    ``table`` needs a unique index on ``match`` and defaults for its other NOT NULL columns) and
    its new key is used; without it, the record is rejected.
    """

    field: str
    table: str
    match: str
    target: str
    returns: str = "id"
    schema: str = "public"
    create_missing: bool = False
    target_type: str = "bigint"

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


DATE_TYPES = frozenset({"date", "timestamptz"})
NUMBER_TYPES = frozenset({"integer", "bigint", "numeric", "double"})


def date_formats(value: str | tuple[str, ...] | list[str] | None, what: str) -> tuple[str, ...]:
    """``date_format`` as a tuple of strptime formats, each checked: one that reads back no
    date it writes (no ``%d``, ``%m`` and ``%Y`` or ``%y``, say) is refused with ``what``."""
    if value is None:
        return ()
    formats = (value,) if isinstance(value, str) else tuple(value)
    sample = datetime(2024, 3, 10, 13, 45, 30)
    for fmt in formats:
        try:
            ok = datetime.strptime(sample.strftime(fmt), fmt).date() == sample.date()
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{what}: {fmt!r} is not a date format that names the day, month and year;"
                " write it as for strptime, e.g. '%d/%m/%Y' or '%d.%m.%Y'"
            )
    return formats


def check_separators(decimal: str | None, thousands: str | None, what: str) -> None:
    """A decimal and a thousands separator are one character each, and not the same one."""
    for name, sep in (("decimal", decimal), ("thousands", thousands)):
        if sep is not None and (len(sep) != 1 or sep.isdigit() or sep in "+-"):
            raise ValueError(
                f"{what}: {name}={sep!r} must be one character that is not a digit or a sign,"
                " e.g. decimal=',' thousands='.'"
            )
    if decimal is not None and decimal == thousands:
        raise ValueError(f"{what}: decimal and thousands separators are both {decimal!r}")


def normalize_header(name: str) -> str:
    """How header names are compared: case- and space-insensitively."""
    return re.sub(r"[\s_\-]+", "", name).casefold()


@dataclass(frozen=True)
class Field:
    """One target column.

    ``aliases`` are other header names that mean this field; ``annotation`` replaces the type's
    default pydantic annotation (for constraints such as ``Annotated[Decimal, Field(ge=0)]``).

    How text cells are read, where the file does not write ISO dates and ``.`` decimals:
    ``date_format`` (a date or timestamptz field) is one strptime format or several, tried in
    order (``"%d/%m/%Y"``, ``("%d.%m.%Y", "%d/%m/%Y")``); ISO 8601 is always read too.
    ``decimal`` and ``thousands`` (a number field) are its separators (``decimal=","``,
    ``thousands="."`` reads ``1.234,5``). Unset, the importer's defaults apply (its own
    ``date_format``, ``decimal``, ``thousands``), or a run's ``--date-format`` and
    ``--decimal-comma``.
    """

    name: str
    type: str = "text"
    aliases: tuple[str, ...] = ()
    required: bool = False
    annotation: Any = None
    default: Any = None
    date_format: str | tuple[str, ...] | None = None
    decimal: str | None = None
    thousands: str | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(
                f"field {self.name!r}: unknown type {self.type!r}; use one of {', '.join(TYPES)}"
            )
        what = f"field {self.name!r}"
        if self.date_format is not None:
            if self.type not in DATE_TYPES:
                raise ValueError(f"{what}: date_format is for date and timestamptz fields")
            object.__setattr__(self, "date_format", date_formats(self.date_format, what))
        if (self.decimal or self.thousands) and self.type not in NUMBER_TYPES:
            raise ValueError(f"{what}: decimal and thousands are for number fields")
        check_separators(self.decimal, self.thousands, what)

    @property
    def formats(self) -> tuple[str, ...]:
        """``date_format`` as a tuple (empty when unset; __post_init__ checked it)."""
        return tuple(self.date_format or ())

    @property
    def pg_type(self) -> str:
        return TYPES[self.type][1]

    @property
    def python_type(self) -> Any:
        return self.annotation if self.annotation is not None else TYPES[self.type][0]


class EmptyCell(StrEnum):
    """What an unpivot does with an empty period cell (blank, or one of the null markers)."""

    GAP = "gap"
    """No record for the period; the run counts it (``gaps`` in the run's counters)."""
    NULL = "null"
    """A record whose value is NULL."""
    REJECT = "reject"
    """The whole source row is rejected, its row-log entry naming the empty columns."""


@dataclass(frozen=True)
class Unpivot:
    """Turn one wide row into one record per matching column.

    ``columns`` is a regular expression over header names with one group, the period: with
    ``r"HH(\\d+)"`` the column ``HH07`` becomes a record with ``index_field`` = 7 and
    ``value_field`` = the cell's value. Columns not matching stay common to every record.

    ``empty`` says what an empty period cell is: ``"gap"`` (the default: no record, counted by
    the run), ``"null"`` (a record with a NULL value) or ``"reject"`` (the source row is
    rejected). ``skip_empty=False`` is the older spelling of ``empty="null"``.

    A source row is imported whole or not at all: when any of its cells is wrong, its records
    are all rejected as one row-log entry that holds the row as the file had it (so
    ``sluice failed-rows --csv`` gives the file's own columns back, to fix and import again).
    """

    columns: str
    index_field: str
    value_field: str
    index_type: str = "integer"
    value_type: str = "numeric"
    skip_empty: bool = True
    empty: EmptyCell | str | None = None

    def __post_init__(self) -> None:
        if self.empty is None:
            chosen = EmptyCell.GAP if self.skip_empty else EmptyCell.NULL
        else:
            try:
                chosen = EmptyCell(self.empty)
            except ValueError:
                raise ValueError(
                    f"unpivot empty={self.empty!r}: use one of "
                    f"{', '.join(repr(str(e)) for e in EmptyCell)}"
                ) from None
        object.__setattr__(self, "empty", chosen)
        try:
            pattern = re.compile(self.columns)
        except re.error as exc:
            raise ValueError(f"unpivot columns {self.columns!r}: {exc}") from None
        if pattern.groups != 1:
            raise ValueError(
                f"unpivot columns {self.columns}: write exactly one group, the period, as in"
                r" HH(\d{2})"
            )

    @property
    def on_empty(self) -> EmptyCell:
        return EmptyCell(str(self.empty))


@dataclass(frozen=True)
class UriKey:
    """A key computed from fields with a template, e.g. ``at://{did}/{collection}/{rkey}``."""

    column: str
    template: str


@dataclass(frozen=True)
class Webhook:
    """A URL that receives this importer's run lifecycle events as signed JSON POSTs.

    ``secret_env`` names the environment variable holding the signing secret; without it the
    default secret (``SLUICE_WEBHOOK_SECRET``) signs. The secret itself never sits in code.
    """

    url: str
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    secret_env: str | None = None

    def __post_init__(self) -> None:
        check_webhook_target(self.url, self.events)


@dataclass(frozen=True)
class Schedule:
    """Start a run of the importer's pull source at the times of a cron expression (five
    fields, or six with seconds last, as croniter reads them; UTC). ``params`` are the
    trigger's parameters. Exactly one run per time across the cluster, and none while the
    previous scheduled run is still going. ``enabled=False`` declares it paused:
    ``sluice schedules resume SLUG`` starts it."""

    cron: str
    params: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self) -> None:
        from croniter import croniter

        if not croniter.is_valid(self.cron):
            raise ValueError(
                f"schedule {self.cron!r} is not a cron expression; write five fields "
                "(minute hour day month weekday) or six with seconds last"
            )


@dataclass(frozen=True)
class Importer:
    slug: str
    table: str
    fields: tuple[Field, ...]
    key: tuple[str, ...] | UriKey
    description: str = ""
    sources: tuple[str, ...] = ("upload", "file")
    format: FormatOptions = field(default_factory=FormatOptions)
    policy: DuplicatePolicy = DuplicatePolicy.UPSERT
    version_column: str | None = None
    batch_size: int | None = None
    transforms: tuple[Transform, ...] = ()
    unpivot: Unpivot | None = None
    schema: str = "public"
    # Ad-hoc imports leave typing to PostgreSQL's casts: values travel as text.
    validate_in_database: bool = False
    # Cell values read as null besides a blank cell (after trimming spaces), e.g. ("NA", "-").
    null_markers: tuple[str, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    pull: PullSource | None = None
    schedule: Schedule | None = None
    # AT Protocol collections (NSIDs) projected into this importer's table: each record the
    # firehose or a backfill writes to atproto.records goes through the mapping as a row with
    # the record's fields plus did, collection, rkey, uri, rev and cid.
    firehose: tuple[str, ...] = ()
    # Full refresh: every run (``fresh``) or runs started with --fresh delete, at their end,
    # the rows they did not contain; within ``refresh_scope`` (the scope values the import
    # contained: one supplier's file refreshes that supplier); ``soft_delete_column`` marks
    # them (a timestamptz set to now()) instead; nothing is deleted when the run rejected more
    # than ``refresh_max_failed`` rows.
    # A file with the sha256 of the importer's last completed run is reported as a duplicate
    # (provenance.duplicate_of) and, with this, skipped: the run completes with no rows.
    skip_duplicate_files: bool = False
    fresh: bool = False
    refresh_scope: tuple[str, ...] = ()
    soft_delete_column: str | None = None
    refresh_max_failed: int = 0
    # Columns filled from another table by a natural key (supplier_id from suppliers.code),
    # resolved per batch by one query each (storage.lookups).
    lookups: tuple[Lookup, ...] = ()
    # How text cells of the fields that do not say are read (see Field): date formats for
    # date and timestamptz fields, the separators of number fields.
    date_format: str | tuple[str, ...] | None = None
    decimal: str | None = None
    thousands: str | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        """The default ``date_format`` as a tuple (empty when unset)."""
        return tuple(self.date_format or ())

    def __post_init__(self) -> None:
        what = f"importer {self.slug!r}"
        object.__setattr__(self, "date_format", date_formats(self.date_format, what) or None)
        check_separators(self.decimal, self.thousands, what)
        if self.pull is not None and self.pull.kind not in self.sources:
            # The pull source's kind is always an accepted source of its importer.
            object.__setattr__(self, "sources", (*self.sources, self.pull.kind))
        for column in self.refresh_scope:
            if column not in {f.name for f in self.output_fields()}:
                raise ValueError(f"importer {self.slug!r}: refresh scope {column!r} is not a field")
        if self.firehose and self.key_columns != ("uri",):
            raise ValueError(
                f"importer {self.slug!r}: a firehose projection is keyed by the record's URI;"
                " use key=UriKey('uri', 'at://{did}/{collection}/{rkey}') or key=('uri',)"
            )
        if self.schedule is not None and self.pull is None:
            raise ValueError(f"importer {self.slug!r}: a schedule needs a pull source (pull=...)")
        names = [f.name for f in self.output_fields()]
        if len(set(names)) != len(names):
            raise ValueError(f"importer {self.slug!r}: a field name appears twice in {names}")
        for lookup in self.lookups:
            if lookup.field not in {f.name for f in self.fields}:
                raise ValueError(
                    f"importer {self.slug!r}: lookup field {lookup.field!r} is not a field;"
                    " the natural key is read from the file like any field: declare it"
                )
            if lookup.target == lookup.field:
                raise ValueError(
                    f"importer {self.slug!r}: lookup target {lookup.target!r} is its natural-key"
                    " field; name the column that receives the key differently"
                )
            if lookup.target in self.key_columns:
                raise ValueError(
                    f"importer {self.slug!r}: lookup target {lookup.target!r} is a key column,"
                    " but batches are routed by key before lookups run; key the table by the"
                    f" natural key {lookup.field!r} instead"
                )
        for k in self.key_columns:
            if k not in names:
                raise ValueError(f"importer {self.slug!r}: key column {k!r} is not a field")
        if self.version_column and self.version_column not in names:
            raise ValueError(f"importer {self.slug!r}: version column is not a field")
        if self.policy is DuplicatePolicy.UPDATE_IF_NEWER and not self.version_column:
            raise ValueError(f"importer {self.slug!r}: policy update_if_newer needs version_column")

    @property
    def key_columns(self) -> tuple[str, ...]:
        return (self.key.column,) if isinstance(self.key, UriKey) else self.key

    def output_fields(self) -> list[Field]:
        """The target table's columns, in order."""
        out = list(self.fields)
        if self.unpivot is not None:
            out.append(Field(self.unpivot.index_field, self.unpivot.index_type))
            out.append(Field(self.unpivot.value_field, self.unpivot.value_type))
        if isinstance(self.key, UriKey):
            out.insert(0, Field(self.key.column, "text"))
        if self.soft_delete_column is not None:
            out.append(Field(self.soft_delete_column, "timestamptz"))
        for lookup in self.lookups:
            if lookup.target not in {f.name for f in out}:
                out.append(Field(lookup.target, lookup.target_type))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "description": self.description,
            "table": f"{self.schema}.{self.table}",
            "sources": list(self.sources),
            "key": list(self.key_columns),
            "key_template": self.key.template if isinstance(self.key, UriKey) else None,
            "policy": str(self.policy),
            "version_column": self.version_column,
            "pull": self.pull.kind if self.pull is not None else None,
            "schedule": self.schedule.cron if self.schedule is not None else None,
            "firehose": list(self.firehose),
            "fields": [
                {"name": f.name, "type": f.type, "aliases": list(f.aliases), "required": f.required}
                for f in self.output_fields()
            ],
        }


def pull_kind(importer: Importer, params: dict[str, Any]) -> str:
    """Which source a trigger of ``importer`` pulls from: ``params["source"]`` when given,
    else the importer's pull source, else a URL or path the params name (for importers that
    accept ``url`` or ``filesystem`` without declaring a pull source)."""
    kind = params.get("source")
    if kind is None and importer.pull is not None:
        kind = importer.pull.kind
    if kind is None:
        kind = next((k for k, p in (("url", "url"), ("filesystem", "path")) if p in params), None)
    if kind is None or kind not in PULL_KINDS or kind not in importer.sources:
        accepted = [k for k in importer.sources if k in PULL_KINDS]
        if not accepted:
            raise NoPullSource(
                f"importer {importer.slug!r} has no pull source (it accepts: "
                f"{', '.join(importer.sources)}); upload a file to "
                f"/api/v1/imports/{importer.slug}/upload instead"
            )
        raise NoPullSource(
            f"importer {importer.slug!r} pulls from {', '.join(accepted)}, not {kind!r}; "
            "give the matching parameters (url for url, path for filesystem)"
        )
    return str(kind)
