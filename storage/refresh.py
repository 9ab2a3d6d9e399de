"""Full refresh: at the end of a complete, successful fresh run, the rows of the target that the
run did not contain are deleted (or marked deleted), in the transaction that completes the run.

The run's keys were recorded batch by batch in ``sluice.run_keys``, typed as the table types
them. With a scope (say ``supplier``), only rows whose scope values the import contained are
candidates: importing one supplier's file refreshes that supplier's rows alone.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from sluice.storage.writer import quote_ident


async def delete_absent(conn: asyncpg.Connection, run_id: uuid.UUID, plan: dict[str, Any]) -> int:
    """Delete (or soft-delete) the target's rows absent from the run; returns how many."""
    q = quote_ident
    table = f"{q(plan.get('schema', 'public'))}.{q(plan['table'])}"
    refresh = plan["refresh"]
    key = "jsonb_build_array(" + ", ".join(f"t.{q(k)}" for k in plan["key"]) + ")::text"
    where = [f"NOT EXISTS (SELECT 1 FROM run_keys k WHERE k.run_id = $1 AND k.key = {key})"]
    if refresh["scope"]:
        scope = "jsonb_build_array(" + ", ".join(f"t.{q(c)}" for c in refresh["scope"]) + ")::text"
        where.append(f"{scope} IN (SELECT DISTINCT s.scope FROM run_keys s WHERE s.run_id = $1)")
    soft = refresh.get("soft_delete")
    if soft:
        where.append(f"t.{q(soft)} IS NULL")
        statement = f"UPDATE {table} AS t SET {q(soft)} = now() WHERE {' AND '.join(where)}"
    else:
        statement = f"DELETE FROM {table} AS t WHERE {' AND '.join(where)}"
    result = await conn.execute(statement, run_id)
    return int(result.rsplit(" ", 1)[-1])
