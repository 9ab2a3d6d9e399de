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

import asyncpg

from sluice.agents.split.infer import DATE, INTEGER, NUMBER, TIMESTAMP
from sluice.schemas.importers import Field
from sluice.schemas.runs import SchemaChange as SchemaChange
from sluice.storage.tables import change_table

_FLOAT_WORDS = frozenset({"nan", "infinity", "+infinity", "-infinity", "inf", "+inf", "-inf"})
# What PostgreSQL's boolean input accepts (inference is stricter).
_BOOL = frozenset({"true", "false", "t", "f", "yes", "no", "y", "n", "on", "off", "1", "0"})
_INTEGERS = ("smallint", "integer", "bigint")
_INT_BOUND = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
_SIZED = re.compile(r"(character varying|character|varchar|char)\((\d+)\)")


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
    the file (only report the changes when not `apply`); the DDL is storage's
    (``change_table``), what to change is decided here."""
    return await change_table(
        conn,
        schema,
        table,
        lambda existing: plan_changes(existing, fields, samples),
        create_sql=create_sql,
        apply=apply,
    )
