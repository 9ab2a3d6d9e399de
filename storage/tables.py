"""Target tables: create them from a plan, or read what an existing one looks like."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

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
