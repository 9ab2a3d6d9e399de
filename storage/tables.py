"""Target tables: create them from a plan, or read what an existing one looks like."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import asyncpg

from sluice.errors import MappingError
from sluice.schemas.runs import SchemaChange
from sluice.storage.sql import quote_ident
from sluice.storage.writer import TargetPlan


async def ensure_table(conn: asyncpg.Connection, plan: TargetPlan) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; the loser retries.
    for _ in range(3):
        try:
            await conn.execute(plan.create_table_sql())
            return
        except asyncpg.UniqueViolationError:
            continue


# PostgreSQL names are at most 63 bytes and hold no NUL; a longer one is an error in a query,
# not a name that simply is not there.
_MAX_NAME_BYTES = 63


def _possible_name(name: str) -> bool:
    return "\x00" not in name and len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME_BYTES


async def describe_table(
    conn: asyncpg.Connection, schema: str, table: str
) -> list[tuple[str, str]] | None:
    """The table's columns with their types, or None when there is no such table (and none
    when the name cannot be a PostgreSQL name: the caller says what is wrong with it)."""
    if not (_possible_name(schema) and _possible_name(table)):
        return None
    records = await conn.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        schema,
        table,
    )
    if not records:
        return None
    return [(r["attname"], r["type"]) for r in records]


async def has_unique_key(
    conn: asyncpg.Connection, schema: str, table: str, key: Sequence[str]
) -> bool:
    """True when a unique index covers exactly ``key``: ON CONFLICT needs one."""
    if not all(_possible_name(n) for n in (schema, table, *key)):
        return False
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indpred IS NULL"
        " AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
        "      WHERE a.attrelid = c.oid AND a.attnum = ANY(i.indkey))"
        "     = (SELECT array_agg(k ORDER BY k) FROM unnest($3::text[]) k))",
        schema,
        table,
        list(key),
    )
    return bool(found)


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


async def change_table(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    plan_changes: Callable[[list[tuple[str, str]]], list[SchemaChange]],
    *,
    create_sql: str,
    apply: bool,
) -> list[SchemaChange]:
    """Create the table (``create_sql``) when it is missing, else make the changes
    ``plan_changes`` asks of its columns (only report them when not `apply`). Under one advisory
    lock per table, so two runs creating or changing the same table take turns, and the second
    sees the first's work."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"sluice.evolve:{schema}.{table}",
        )
        existing = await describe_table(conn, schema, table)
        if existing is None:
            await conn.execute(create_sql)
            return []
        changes = plan_changes(existing)
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
