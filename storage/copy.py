"""COPY a batch into its temporary table, leaving out the rows whose values do not convert.

On PostgreSQL 17 and later, ``COPY ... (ON_ERROR ignore, LOG_VERBOSITY verbose)`` skips a row
with a value its column's type refuses and says so in a NOTICE naming the row's line: the bad
rows of a batch cost COPY speed, not one bisection of the batch per bad row. Each skipped row
is then explained the way the row-by-row path explains it (``Applier._explain``): the first of
its values, in the plan's column order, that its column's type refuses, with PostgreSQL's own
message (``pg_input_error_info``, PostgreSQL 16 and later), so both paths log the same reason
for the same row. Errors COPY does not skip (a wrong field count, a constraint) still fail the
COPY, and the batch goes the row-by-row way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from sluice.schemas.events import decode_copy_line
from sluice.schemas.runs import RowFailure
from sluice.storage.db import CONNECTION_ERRORS, unavailable
from sluice.storage.sql import ROW, SUB, quote_ident

SKIPPING = re.compile(r"skipping row due to data type incompatibility at line (\d+) ")
"""PostgreSQL's NOTICE for each row ON_ERROR ignore left out (src/backend/commands/copyfrom.c)."""


def skips_bad_rows(conn: asyncpg.Connection) -> bool:
    """Whether the server's COPY can skip rows whose values do not convert (PostgreSQL 17+)."""
    return bool(conn.get_server_version().major >= 17)


@dataclass
class Copied:
    """What COPY did with a batch: the rows it loaded and the lines it skipped (from 1), each
    with PostgreSQL's notice."""

    rows: int
    skipped: dict[int, str]


class NoticesMissed(Exception):
    """COPY skipped more rows than it sent notices for (``client_min_messages`` above NOTICE,
    say): the batch must go the row-by-row way."""


async def copy_skipping(
    conn: asyncpg.Connection, table: str, columns: Sequence[str], body: memoryview
) -> Copied:
    """COPY ``body`` (COPY text, one row per line) into ``pg_temp.table``, skipping the rows
    whose values do not convert. NoticesMissed when the notices do not account for them."""
    skipped: dict[int, str] = {}

    def listen(_conn: Any, message: Any) -> None:
        found = SKIPPING.match(message.message or "")
        if found:
            skipped[int(found.group(1))] = message.message

    cols = ", ".join(quote_ident(c) for c in columns)
    statement = (
        f"COPY pg_temp.{quote_ident(table)} ({cols}) FROM STDIN"
        " (FORMAT text, NULL '', ON_ERROR ignore, LOG_VERBOSITY verbose)"
    )
    conn.add_log_listener(listen)
    try:
        # asyncpg's copy_to_table spells no ON_ERROR; its _copy_in sends any COPY FROM STDIN.
        status = await conn._copy_in(statement, body, None)
        await asyncio.sleep(0)  # the notices' callbacks, scheduled before the answer
    except CONNECTION_ERRORS as exc:
        raise unavailable(exc) from exc
    finally:
        conn.remove_log_listener(listen)
    copied = int(status.split()[-1])
    if copied + len(skipped) != bytes(body).count(b"\n"):
        raise NoticesMissed(f"COPY loaded {copied} rows and reported {len(skipped)} skipped")
    return Copied(copied, skipped)


async def explain_skipped(
    conn: asyncpg.Connection,
    plan_columns: Sequence[tuple[str, str]],
    columns: Sequence[str],
    body: memoryview,
    skipped: dict[int, str],
) -> list[RowFailure]:
    """The rows COPY skipped, each with its row number and the reason the row-by-row path
    gives: ``column 'c': <PostgreSQL's message>`` for its first value that does not convert."""
    lines = bytes(body).decode().split("\n")
    rows = {n: decode_copy_line(columns, lines[n - 1]) for n in sorted(skipped)}
    present = set(columns)
    checks = [
        (n, c, t, row[c])
        for n, row in rows.items()
        for c, t in plan_columns
        if c in present and row.get(c) is not None
    ]
    messages = await conn.fetch(
        "SELECT (pg_input_error_info(x.v, x.t)).message AS m"
        " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(v, t, i) ORDER BY x.i",
        [v for *_, v in checks],
        [t for _, _, t, _ in checks],
    )
    reasons: dict[int, str] = {}
    for (n, column, _, _), record in zip(checks, messages, strict=True):
        if n not in reasons and record["m"] is not None:
            reasons[n] = f"column {column!r}: {record['m']}"
    return [
        RowFailure(row[ROW], row[SUB], row, reasons.get(n, skipped[n])) for n, row in rows.items()
    ]
