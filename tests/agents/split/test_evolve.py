"""Schema evolution of ad-hoc imports, and null markers: the rules, then on the real stack."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.agents.split.evolve import SchemaChange, evolve_table, plan_changes, widen
from sluice.agents.split.infer import DEFAULT_NULL_MARKERS, infer_type
from sluice.cli.common import summary
from sluice.schemas.importers import Field
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish, unique


@pytest.mark.parametrize(
    ("current", "values", "wider"),
    [
        ("integer", ["1", "-7"], None),
        ("integer", ["1", "3000000000"], "bigint"),
        ("smallint", ["40000"], "integer"),
        ("integer", ["1", "99999999999999999999"], "numeric"),
        ("bigint", ["1", "2.5"], "numeric"),
        ("bigint", ["1", "n/a yet"], "text"),
        ("numeric", ["1.5", "1e3", "NaN"], None),
        ("numeric", ["1.5", "about 3"], "text"),
        ("double precision", ["2"], None),
        ("boolean", ["yes", "off", "T"], None),
        ("boolean", ["maybe"], "text"),
        ("date", ["2024-01-05"], None),
        ("date", ["5 Jan"], "text"),
        ("timestamp with time zone", ["2024-01-05 10:00:00+02", "2024-01-06"], None),
        ("character varying(3)", ["abc"], None),
        ("character varying(3)", ["abcd"], "text"),
        ("text", ["anything"], None),
        ("jsonb", ["not json"], None),  # not widened: PostgreSQL rejects those rows
        ("uuid", ["x"], None),
        ("integer", [], None),
    ],
)
def test_widening_rules(current: str, values: list[str], wider: str | None) -> None:
    assert widen(current, values) == wider


def test_changes_add_new_columns_and_widen_in_file_order() -> None:
    existing = [("id", "bigint"), ("qty", "bigint"), ("note", "text")]
    fields = [Field("id", "bigint"), Field("colour", "text"), Field("qty"), Field("n", "bigint")]
    samples = {"id": ["1"], "qty": ["1", "2.5", None], "colour": ["red"], "n": ["4"]}
    assert plan_changes(existing, fields, samples) == [
        SchemaChange("colour", "added", "text"),
        SchemaChange("qty", "widened", "numeric", previous="bigint"),
        SchemaChange("n", "added", "bigint"),
    ]


def test_null_markers_are_read_as_null_when_inferring() -> None:
    assert infer_type(["1", "NA", "-", "", None], DEFAULT_NULL_MARKERS) == "bigint"
    assert infer_type(["1", "NA"]) == "text"  # without markers "NA" is a value


async def _columns(db: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = $1",
        table,
    )
    return {r["column_name"]: r["data_type"] for r in rows}


async def _import(client: Client, stack: Stack, path: Path, table: str, **options: Any) -> Any:
    run = await client.submit_file(
        "adhoc", path, options={"table": table, "key": ["id"], **options}
    )
    return await finish(client, run, stack)


@pytest.mark.stack
async def test_a_later_file_adds_columns_widens_a_type_and_lands_every_row(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("evolve")
    first = tmp_path / "first.csv"
    first.write_text("id,name,qty\n1,apple,3\n2,pear,NA\n3,fig,-\n")
    done = await _import(client, stack, first, table)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.created_rows == 3
    assert await _columns(db, table) == {"id": "bigint", "name": "text", "qty": "bigint"}
    assert done.provenance and done.provenance["schema_changes"] == []
    # The markers were read as null: qty stayed an integer column.
    assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE qty IS NULL") == 2

    second = tmp_path / "second.csv"
    second.write_text(
        "id,name,qty,colour,weight\n"
        "2,pear,2.5,green,0.2\n"
        "4,plum,7,N/A,0.05\n"
        "5,kiwi,12.25,brown,NULL\n"
    )
    done = await _import(client, stack, second, table)
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.created_rows, done.updated_rows, done.failed_rows) == (2, 1, 0)
    assert await _columns(db, table) == {
        "id": "bigint",
        "name": "text",
        "qty": "numeric",
        "colour": "text",
        "weight": "numeric",
    }
    changes = done.provenance["schema_changes"] if done.provenance else None
    assert changes == [
        {
            "column": "qty",
            "change": "widened",
            "type": "numeric",
            "previous": "bigint",
            "applied": True,
        },
        {"column": "colour", "change": "added", "type": "text", "previous": None, "applied": True},
        {
            "column": "weight",
            "change": "added",
            "type": "numeric",
            "previous": None,
            "applied": True,
        },
    ]
    text = summary(done)  # what `sluice status` prints
    assert "schema: widened qty bigint -> numeric" in text
    assert "schema: added colour text" in text and "schema: added weight numeric" in text
    rows = await db.fetch(
        f"SELECT id, name, qty::text, colour, weight::text FROM {table} ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (1, "apple", "3", None, None),
        (2, "pear", "2.5", "green", "0.2"),
        (3, "fig", None, None, None),
        (4, "plum", "7", None, "0.05"),
        (5, "kiwi", "12.25", "brown", None),
    ]


@pytest.mark.stack
async def test_without_evolution_values_that_do_not_fit_are_rejected_with_the_reason(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("strict")
    first = tmp_path / "first.csv"
    first.write_text("id,qty\n1,3\n")
    assert (await _import(client, stack, first, table)).created_rows == 1
    second = tmp_path / "second.csv"
    second.write_text("id,qty,extra\n2,4,x\n3,2.5,y\n")
    done = await _import(client, stack, second, table, evolve=False)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert (done.created_rows, done.failed_rows) == (1, 1)
    assert await _columns(db, table) == {"id": "bigint", "qty": "bigint"}
    assert done.provenance and done.provenance["schema_changes"] == [
        {
            "column": "qty",
            "change": "widened",
            "type": "numeric",
            "previous": "bigint",
            "applied": False,
        },
        {"column": "extra", "change": "added", "type": "text", "previous": None, "applied": False},
    ]
    failed = await (await client.deps()).runs.failed_rows(done.id)
    assert len(failed) == 1 and failed[0].row_number == 2
    assert "bigint" in failed[0].reason and "2.5" in failed[0].reason

    # With evolution (the default) the same file widens the column and lands every row.
    done = await _import(client, stack, second, table)
    assert done.status is RunStatus.COMPLETED, done.error
    assert await _columns(db, table) == {"id": "bigint", "qty": "numeric", "extra": "text"}
    assert await db.fetchval(f"SELECT qty::text FROM {table} WHERE id = 3") == "2.5"


@pytest.mark.stack
async def test_null_markers_are_configurable(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("markers")
    path = tmp_path / "m.csv"
    path.write_text("id,note,n\n1,NA,?\n2,-,5\n")
    done = await _import(client, stack, path, table, null_markers=["?"])
    assert done.status is RunStatus.COMPLETED, done.error
    rows = await db.fetch(f"SELECT id, note, n FROM {table} ORDER BY id")
    # Only "?" (and a blank cell) is null now: "NA" and "-" are values.
    assert [tuple(r) for r in rows] == [(1, "NA", None), (2, "-", 5)]


@pytest.mark.stack
async def test_markers_leave_key_columns_alone(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("countries")
    path = tmp_path / "c.csv"
    path.write_text("id,name,population\nNA,Namibia,2600000\nFR,France,-\n")
    done = await _import(client, stack, path, table)
    assert done.status is RunStatus.COMPLETED, done.error
    rows = await db.fetch(f"SELECT id, name, population FROM {table} ORDER BY id")
    assert [tuple(r) for r in rows] == [("FR", "France", None), ("NA", "Namibia", 2600000)]


@pytest.mark.stack
async def test_two_runs_creating_one_table_at_once_keep_all_their_columns(
    stack: Stack, db: asyncpg.Connection
) -> None:
    """The table is created under the evolution lock: the second run sees it and adds its
    columns instead of losing them to CREATE TABLE IF NOT EXISTS."""
    table = unique("race")
    other = await asyncpg.connect(stack.postgres.url)
    try:
        plans = [
            (Field("id", "bigint"), Field("name")),
            (Field("id", "bigint"), Field("name"), Field("email")),
        ]

        async def create(conn: asyncpg.Connection, fields: tuple[Field, ...]) -> Any:
            sql = (
                f"CREATE TABLE IF NOT EXISTS {table} ("
                + ", ".join(f"{f.name} {f.pg_type}" for f in fields)
                + ", PRIMARY KEY (id))"
            )
            samples = {f.name: ["1"] for f in fields}
            return await evolve_table(
                conn, "public", table, fields, samples, create_sql=sql, apply=True
            )

        results = await asyncio.gather(create(db, plans[0]), create(other, plans[1]))
    finally:
        await other.close()
    assert set(await _columns(db, table)) == {"id", "name", "email"}
    made = [c for changes in results for c in changes]
    assert made in ([], [SchemaChange("email", "added", "text")])


@pytest.mark.stack
async def test_nested_json_objects_and_arrays_land_as_jsonb(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("nested")
    path = tmp_path / "n.jsonl"
    path.write_text(
        '{"id": 1, "meta": {"color": "red", "sizes": [1, 2]}, "tags": ["a", "b"], "note": "x"}\n'
        '{"id": 2, "meta": null, "tags": [], "note": "{\\"not\\": \\"json\\"}"}\n'
    )
    done = await _import(client, stack, path, table)
    assert done.status is RunStatus.COMPLETED, done.error
    types = dict(
        await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
            table,
        )
    )
    assert (types["meta"], types["tags"], types["note"]) == ("jsonb", "jsonb", "text")
    rows = await db.fetch(
        f"SELECT id, meta->>'color', jsonb_array_length(tags), note FROM {table} ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [(1, "red", 2, "x"), (2, None, 0, '{"not": "json"}')]
