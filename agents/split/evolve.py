"""Schema evolution for ad-hoc imports: a later file may bring new columns or wider values.

Before a run's rows are sent, the target table is compared with the file (its columns and a
sample of its values). New columns are added with their inferred type; a column whose sampled
values no longer fit its type is widened where no value can be lost: ``smallint -> integer ->
bigint -> numeric``, and any type to ``text``. Types Sluice does not widen (``jsonb``, ``uuid``,
constrained ``numeric(p,s)`` and the like) stay as they are, and the rows whose values do not
fit are rejected by PostgreSQL with its reason, to be fixed and retried. Rows past the sample
that do not fit are rejected the same way; ``sluice retry`` infers again from just those rows,
so a retry widens what they need.

Two runs evolving one table at once take turns on an advisory lock and each re-reads the table
inside it, so a column is added or widened once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from sluice.agents.split.infer import DATE, INTEGER, NUMBER, TIMESTAMP
from sluice.errors import MappingError
from sluice.schemas.importers import Field
from sluice.storage.tables import describe_table
from sluice.storage.writer import quote_ident

_FLOAT_WORDS = frozenset({"nan", "infinity", "+infinity", "-infinity", "inf", "+inf", "-inf"})
# What PostgreSQL's boolean input accepts (inference is stricter).
_BOOL = frozenset({"true", "false", "t", "f", "yes", "no", "y", "n", "on", "off", "1", "0"})
_INTEGERS = ("smallint", "integer", "bigint")
_INT_BOUND = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
_SIZED = re.compile(r"(character varying|character|varchar|char)\((\d+)\)")


@dataclass(frozen=True)
class SchemaChange:
    """One change a file asked of its table; ``applied`` is false in a dry run or when the
    import turned evolution off."""

    column: str
    change: Literal["added", "widened"]
    type: str
    previous: str | None = None
    applied: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "change": self.change,
            "type": self.type,
            "previous": self.previous,
            "applied": self.applied,
        }

    def describe(self) -> str:
        verb = "" if self.applied else " (not applied)"
        if self.change == "added":
            return f"added {self.column} {self.type}{verb}"
        return f"widened {self.column} {self.previous} -> {self.type}{verb}"


def _int_fits(value: str, kind: str) -> bool:
    bound = _INT_BOUND[kind]
    return -bound <= int(value) < bound


def widen(current: str, values: Iterable[str]) -> str | None:
    """The type `current` must become for every value to fit, or None when it fits already or
    is not a type Sluice widens (the database then rejects the rows that do not fit)."""
    seen = [v for v in values if v]
    if not seen:
        return None
    base = current.split("(")[0].strip()
    if base in _INTEGERS:
        if all(INTEGER.fullmatch(v) for v in seen):
            for kind in _INTEGERS[_INTEGERS.index(base) :]:
                if all(_int_fits(v, kind) for v in seen):
                    return None if kind == base else kind
            return "numeric"
        return "numeric" if all(NUMBER.fullmatch(v) for v in seen) else "text"
    if base in ("numeric", "double precision", "real"):
        fits = all(NUMBER.fullmatch(v) or v.lower() in _FLOAT_WORDS for v in seen)
        return None if fits else "text"
    sized = _SIZED.fullmatch(current)
    if sized is not None:
        return None if all(len(v) <= int(sized.group(2)) for v in seen) else "text"
    checks: dict[str, Callable[[str], object]] = {
        "boolean": lambda v: v.lower() in _BOOL,
        "date": DATE.fullmatch,
        "timestamp with time zone": TIMESTAMP.fullmatch,
        "timestamp without time zone": TIMESTAMP.fullmatch,
    }
    check = checks.get(base)
    if check is None:  # text, and types that are not widened (jsonb, uuid, ...)
        return None
    return None if all(check(v) for v in seen) else "text"


def plan_changes(
    existing: Sequence[tuple[str, str]],
    fields: Sequence[Field],
    samples: Mapping[str, Sequence[str | None]],
) -> list[SchemaChange]:
    """What the table needs to take the file: new columns, then widened ones, in file order."""
    types = dict(existing)
    changes = []
    for f in fields:
        current = types.get(f.name)
        if current is None:
            changes.append(SchemaChange(f.name, "added", f.pg_type))
            continue
        wider = widen(current, [v.strip() for v in samples.get(f.name, ()) if v is not None])
        if wider is not None:
            changes.append(SchemaChange(f.name, "widened", wider, previous=current))
    return changes


# Changing a column's type rewrites the table under an exclusive lock: wait this long for the
# queries on it to finish, then try again later (the split is retried) rather than queue every
# reader of the table behind the change.
LOCK_TIMEOUT = "10s"
# What PostgreSQL refuses about a change for good: a view or rule uses the column, the table
# would pass 1,600 columns, and the like.
_REFUSED = (
    asyncpg.exceptions.FeatureNotSupportedError,
    asyncpg.exceptions.ProgramLimitExceededError,
    asyncpg.exceptions.DependentObjectsStillExistError,
    asyncpg.exceptions.WrongObjectTypeError,
    asyncpg.exceptions.DataError,
)


async def evolve_table(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    fields: Sequence[Field],
    samples: Mapping[str, Sequence[str | None]],
    *,
    create_sql: str,
    apply: bool,
) -> list[SchemaChange]:
    """Create the table (``create_sql``) when it is missing, else add and widen its columns for
    the file (only report the changes when not `apply`). Under one advisory lock per table, so
    two runs creating or changing the same table take turns, and the second sees the first's
    work."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"sluice.evolve:{schema}.{table}",
        )
        existing = await describe_table(conn, schema, table)
        if existing is None:
            await conn.execute(create_sql)
            return []
        changes = plan_changes(existing, fields, samples)
        if not apply:
            return [
                SchemaChange(c.column, c.change, c.type, c.previous, applied=False) for c in changes
            ]
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
        for c in changes:
            column = quote_ident(c.column)
            try:
                if c.change == "added":
                    await conn.execute(f"ALTER TABLE {qualified} ADD COLUMN {column} {c.type}")
                else:
                    await conn.execute(
                        f"ALTER TABLE {qualified} ALTER COLUMN {column} TYPE {c.type}"
                        f" USING {column}::{c.type}"
                    )
            except _REFUSED as exc:
                raise MappingError(
                    f"the file needs {schema}.{table} changed ({c.describe()}), but PostgreSQL"
                    f" refused: {getattr(exc, 'message', exc)}. Change the table yourself, or"
                    " import with --no-evolve (evolve: false) to reject the rows that do not fit"
                ) from exc
    return changes
