"""Generated rows of the test importers' shape (id, name, price, qty, day, version), their CSV
text, and checksums of rows and of a table, to prove a table holds exactly what a file had; the
items of a pull run by their external IDs."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from pathlib import Path

import asyncpg

Row = tuple[int, str, str, int, str, int]  # id, name, price, qty, day, version

HEADER = ("id", "name", "price", "qty", "day", "version")


def make_rows(n: int, *, seed: int = 1, ids: Iterable[int] | None = None) -> list[Row]:
    rnd = random.Random(seed)
    colours = ["red", "green", "blue, large", 'say "hi"']
    out: list[Row] = []
    for i in ids if ids is not None else range(1, n + 1):
        cents = rnd.randrange(1, 10_000_000)
        out.append(
            (
                i,
                f"item {i} {rnd.choice(colours)}",
                f"{cents // 100}.{cents % 100:02d}",
                rnd.randrange(0, 5000),
                f"2024-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}",
                rnd.randrange(1, 100),
            )
        )
    return out


def csv_text(
    rows: Iterable[Iterable[object]], header: Iterable[str] = HEADER, sep: str = ","
) -> str:
    def cell(v: object) -> str:
        s = str(v)
        if any(ch in s for ch in (sep, '"', "\n")):
            return '"' + s.replace('"', '""') + '"'
        return s

    lines = [sep.join(header)]
    lines.extend(sep.join(cell(v) for v in r) for r in rows)
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Iterable[Row], **kw: object) -> Path:
    path.write_text(csv_text(rows, **kw))  # type: ignore[arg-type]
    return path


def checksum(rows: Iterable[Row]) -> str:
    text = "\n".join("|".join(str(v) for v in r) for r in sorted(rows))
    return hashlib.md5(text.encode()).hexdigest()


async def table_checksum(db: asyncpg.Connection, table: str) -> tuple[int, str | None]:
    record = await db.fetchrow(
        f"SELECT count(*) AS n, md5(string_agg(concat_ws('|', id, name, price, qty, day, version),"
        f" E'\\n' ORDER BY id)) AS sum FROM {table}"
    )
    return record["n"], record["sum"]


async def reset(db: asyncpg.Connection, table: str) -> None:
    await db.execute(f"TRUNCATE {table}")


async def item_states(db: asyncpg.Connection, run_id: object) -> dict[str, asyncpg.Record]:
    """A pull run's items by external ID: status, failure_count, last_error."""
    rows = await db.fetch(
        "SELECT external_id, status, failure_count, last_error FROM sluice.items WHERE run_id = $1",
        run_id,
    )
    return {r["external_id"]: r for r in rows}
