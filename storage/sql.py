"""Names and helpers every module that writes rows shares."""

from __future__ import annotations

import asyncpg

# Bookkeeping keys of a record in a batch: its row number in the source, and the index of the
# record made from that row (unpivoted rows make several).
ROW = "_sluice_row"
SUB = "_sluice_sub"

# SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) are the row's
# fault; everything else (connection, serialization, deadlock) is transient.
ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
