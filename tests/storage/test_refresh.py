"""Full refresh on the real stack: rows a complete fresh import did not contain are deleted (or
marked deleted), within its scope, and nothing is deleted when the run failed, was cancelled or
rejected rows."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson
import pytest

from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish, unique

pytestmark = pytest.mark.stack

FRESH = {"fresh": True}


def csv(path: Path, rows: list[tuple[int, str, str]], bad: str = "") -> Path:
    lines = ["id,name,supplier,price", *(f"{i},{n},{s},1.00" for i, n, s in rows)]
    if bad:
        lines.append(bad)
    path.write_text("\n".join(lines) + "\n")
    return path


async def ids(db: asyncpg.Connection, table: str, where: str = "true") -> list[int]:
    return [r["id"] for r in await db.fetch(f"SELECT id FROM {table} WHERE {where} ORDER BY id")]


async def test_a_fresh_import_deletes_exactly_the_absent_rows(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    first = csv(tmp_path / "a.csv", [(i, f"n{i}", "acme") for i in range(1, 11)])
    done = await finish(client, await client.submit_file("t_fresh", first), stack)
    assert done.created_rows == 10 and done.deleted_rows == 0

    second = csv(tmp_path / "b.csv", [(i, f"n{i}", "acme") for i in (1, 2, 3, 4, 5, 6, 7, 11)])
    # Without --fresh nothing goes.
    done = await finish(client, await client.submit_file("t_fresh", second), stack)
    assert done.deleted_rows == 0 and len(await ids(db, "t_fresh")) == 11

    done = await finish(client, await client.submit_file("t_fresh", second, options=FRESH), stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.deleted_rows == 3
    assert await ids(db, "t_fresh") == [1, 2, 3, 4, 5, 6, 7, 11]
    events = await db.fetch(
        "SELECT payload FROM sluice.events WHERE run_id = $1 AND type = 'run.completed'", done.id
    )
    assert orjson.loads(events[0]["payload"])["counters"]["deleted_rows"] == 3
    assert not await db.fetchval("SELECT count(*) FROM sluice.run_keys WHERE run_id = $1", done.id)

    # A dry run reports nothing deleted and deletes nothing.
    only_one = csv(tmp_path / "c.csv", [(1, "n1", "acme")])
    dry = await client.submit_file("t_fresh", only_one, options=FRESH, dry_run=True)
    dry = await finish(client, dry, stack)
    assert dry.deleted_rows == 0 and len(await ids(db, "t_fresh")) == 8


async def test_nothing_is_deleted_when_the_run_failed_or_rejected_rows(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    base = csv(tmp_path / "base.csv", [(i, f"n{i}", "acme") for i in range(1, 6)])
    await finish(client, await client.submit_file("t_fresh", base), stack)
    before = await ids(db, "t_fresh")

    rejected = csv(tmp_path / "rej.csv", [(1, "n1", "acme")], bad="2,,acme,notanumber")
    done = await finish(client, await client.submit_file("t_fresh", rejected, options=FRESH), stack)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS and done.failed_rows == 1
    assert done.deleted_rows == 0 and await ids(db, "t_fresh") == before

    empty = tmp_path / "empty.csv"
    empty.write_text("id,name,supplier,price\n")
    done = await finish(client, await client.submit_file("t_fresh", empty, options=FRESH), stack)
    assert done.status is RunStatus.FAILED
    assert done.deleted_rows == 0 and await ids(db, "t_fresh") == before


async def test_a_scoped_refresh_touches_only_the_suppliers_it_imported(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    rows = [(i, f"n{i}", "acme" if i <= 5 else "globex") for i in range(1, 11)]
    await finish(
        client, await client.submit_file("t_fresh_scoped", csv(tmp_path / "a.csv", rows)), stack
    )
    acme_again = csv(tmp_path / "b.csv", [(1, "n1", "acme"), (2, "n2", "acme")])
    done = await finish(
        client, await client.submit_file("t_fresh_scoped", acme_again, options=FRESH), stack
    )
    assert done.deleted_rows == 3
    assert await ids(db, "t_fresh_scoped", "supplier = 'acme'") == [1, 2]
    assert await ids(db, "t_fresh_scoped", "supplier = 'globex'") == [6, 7, 8, 9, 10]


async def test_a_soft_refresh_marks_rows_and_a_returning_row_is_live_again(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await finish(
        client,
        await client.submit_file(
            "t_fresh_soft", csv(tmp_path / "a.csv", [(1, "a", "x"), (2, "b", "x")])
        ),
        stack,
    )
    done = await finish(
        client,
        await client.submit_file("t_fresh_soft", csv(tmp_path / "b.csv", [(1, "a", "x")])),
        stack,
    )
    assert done.deleted_rows == 1  # the importer refreshes on every run
    assert await ids(db, "t_fresh_soft", "deleted_at IS NOT NULL") == [2]
    assert await ids(db, "t_fresh_soft") == [1, 2]  # marked, not deleted
    done = await finish(
        client,
        await client.submit_file(
            "t_fresh_soft", csv(tmp_path / "c.csv", [(1, "a", "x"), (2, "b", "x")])
        ),
        stack,
    )
    assert done.deleted_rows == 0 and done.updated_rows == 1
    assert not await ids(db, "t_fresh_soft", "deleted_at IS NOT NULL")


async def test_a_fresh_ad_hoc_import_deletes_the_absent_rows_and_survives_a_refused_value(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Ad hoc, the rows travel as COPY batches and the keys are recorded from them. A value
    the database refuses (the column was typed from the first rows) rejects only its row, and
    with a rejected row nothing is deleted."""
    table = unique("fresh_adhoc")
    options = {"table": table, "key": ["id"]}
    first = tmp_path / "first.csv"
    first.write_text("id,qty\n" + "".join(f"{i},{i}\n" for i in range(1, 1501)))
    done = await finish(client, await client.submit_file("adhoc", first, options=options), stack)
    assert done.created_rows == 1500

    second = tmp_path / "second.csv"
    second.write_text("id,qty\n" + "".join(f"{i},{i * 2}\n" for i in range(1, 1201)))
    fresh = {**options, **FRESH}
    done = await finish(client, await client.submit_file("adhoc", second, options=fresh), stack)
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.updated_rows, done.deleted_rows) == (1200, 300)
    assert await ids(db, table) == list(range(1, 1201))

    lines = ["id,qty", *(f"{i},{i}" for i in range(1, 1101))]
    lines[1050] = "1050,lots"  # past the rows the type was inferred from
    third = tmp_path / "third.csv"
    third.write_text("\n".join(lines) + "\n")
    done = await finish(client, await client.submit_file("adhoc", third, options=fresh), stack)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert (done.failed_rows, done.deleted_rows) == (1, 0)
    assert len(await ids(db, table)) == 1200
