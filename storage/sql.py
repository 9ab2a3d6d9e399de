"""Names and helpers every module that writes rows shares."""

from __future__ import annotations

import asyncpg

# Bookkeeping keys of a record in a batch: its row number in the source, and the index of the
# record made from that row (unpivoted rows make several).
ROW = "_sluice_row"
SUB = "_sluice_sub"

ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)
"""The "this row is bad" classification (beside the error tree of sluice.errors, on purpose):
SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) are the row's
fault, and so is class 54 (program limit exceeded: a key too big for its index, a row too big
for a page). A batch failing with one of these is split until the rows at fault stand alone,
and they are recorded as failed rows; these errors never leave the writer. Everything else is
not the rows' fault: a connection lost is DatabaseUnavailable (sluice.storage.db), a
serialization failure or deadlock is retried with the batch."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
