"""COPY batches: rows of text go to PostgreSQL in COPY's text format instead of JSON.

The encoding round-trips any text; a delimited file imported ad hoc travels that way (seen on
the real batches topic) and lands value for value, escapes included; a value PostgreSQL refuses
still rejects only its row, with the column named."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluice.agents.split.infer import DEFAULT_NULL_MARKERS, adhoc_importer
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.route import BatchRouter
from sluice.schemas.events import (
    COPY_BATCH,
    BatchOutcome,
    RowBatch,
    decode_copy_rows,
    encode_copy_batch,
)
from sluice.schemas.formats import ParsedRow, RowProblem
from sluice.schemas.importers import Field
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import TOPICS, Stack, finish, unique

if TYPE_CHECKING:
    from sluice.schemas.runs import Run
    from sluice.storage.writer import TargetPlan

Start = Callable[[], Awaitable["Run"]]


@pytest.fixture
async def started(client: Client) -> AsyncIterator[Start]:
    """Makes runs by hand (no worker is asked for them) and starts them; cancels them after
    the test, so that none is left running for the recovery to fail later (a run.failed event
    that other tests' followers see, a run that tests/sluice/test_metrics.py waits for)."""
    runs = (await client.deps()).runs
    made: list[uuid.UUID] = []

    async def start() -> Run:
        run = await runs.create(importer="adhoc", source="file")
        await runs.start(run.id)
        made.append(run.id)
        return run

    yield start
    for run_id in made:
        await runs.cancel(run_id)


COLUMNS = ("_sluice_row", "_sluice_sub", "a", "b", "c")
# Any text but NUL (a delimited file holding one is refused as a whole).
text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


@given(st.lists(st.tuples(text, text, text), max_size=20))
@example([("\\N", "\\.", "a\tb\nc\rd\\e")])
@example([("", "", "")])
@settings(max_examples=300, deadline=None)
def test_the_copy_encoding_round_trips_any_text(cells: list[tuple[str, str, str]]) -> None:
    rows = [[str(i + 1), "0", *r] for i, r in enumerate(cells)]
    value = encode_copy_batch(COLUMNS, rows)
    assert value.startswith(COPY_BATCH)
    decoded = decode_copy_rows(value[len(COPY_BATCH) :])
    expected = [
        {"_sluice_row": i + 1, "_sluice_sub": 0, "a": a or None, "b": b or None, "c": c or None}
        for i, (a, b, c) in enumerate(cells)
    ]
    assert decoded == expected
    # Each row is one line of COPY text whatever its cells hold: no raw newline inside it.
    body = RowBatch.parse(b"00000000-0000-0000-0000-000000000000:1", value).copy_columns()[1]
    assert bytes(body).count(b"\n") == len(rows)


def test_map_text_gives_what_map_rows_gives_without_a_dict_per_row() -> None:
    """Same records, same rejections: blanks and null markers are null except in key columns,
    an empty key or required field rejects its row, a row problem stays a row problem."""
    fields = [Field("code", "text"), Field("name", "text", required=True), Field("qty", "bigint")]
    importer = adhoc_importer("t", ["code"], fields, null_markers=DEFAULT_NULL_MARKERS)
    mapper = RecordMapper(importer, ["qty", "name", "code", "ignored"])
    rows: list[ParsedRow | RowProblem] = [
        ParsedRow(1, [" 3 ", " apple ", "AP", "x"]),
        ParsedRow(2, ["NA", "Namibia", "NA", "x"]),  # NA is a country code in the key
        ParsedRow(3, ["-", "pear", " ", "x"]),  # empty key
        ParsedRow(4, ["1", "N/A", "FG", "x"]),  # required name is a null marker
        RowProblem(5, ["1"], "expected 4 fields"),
        ParsedRow(6, ["", "fig", "-", "x"]),  # "-" is a value in the key column
    ]
    names = mapper.text_names()
    assert names == ("qty", "name", "code")  # in the file's order
    text, text_failures = mapper.map_text(rows)
    records, failures = mapper.map_rows(rows)
    as_dicts = [
        {"_sluice_row": int(r[0]), "_sluice_sub": int(r[1])}
        | {n: c or None for n, c in zip(names, r[2:], strict=True)}
        for r in text
    ]
    assert as_dicts == records
    assert sorted((f.row_number, f.reason, str(f.raw)) for f in text_failures) == sorted(
        (f.row_number, f.reason, str(f.raw)) for f in failures
    )
    assert sorted(f.row_number for f in failures) == [3, 4, 5]


async def _batch_values(stack: Stack, run_id: str) -> list[bytes]:
    """The values of the run's messages on the batches topic, read back from the broker."""
    consumer = AIOKafkaConsumer(
        TOPICS.batches, bootstrap_servers=stack.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while not found:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    found += [
                        r.value for r in records if r.key and r.key.startswith(run_id.encode())
                    ]
    finally:
        await consumer.stop()
    return found


TRICKY = [
    "tab\there",
    "two\nlines",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "\\.",
    'say "hi", then go',
    "ünïcødé ✓",
]


@pytest.mark.stack
async def test_a_delimited_file_travels_as_copy_and_lands_value_for_value(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = unique("copy")
    out = io.StringIO()
    writer = csv.writer(out)  # "\r\n" lines: a cell with "\r" or "\n" is quoted
    writer.writerow(["id", "note", "qty"])
    expected: dict[int, tuple[str | None, int | None]] = {}
    for i in range(1, 2001):
        note = TRICKY[i % len(TRICKY)] + f" {i}" if i % 7 else ""  # every 7th note is blank
        qty = "NA" if i % 11 == 0 else str(i)  # a null marker
        writer.writerow([i, note, qty])
        expected[i] = (note or None, None if qty == "NA" else i)
    path = tmp_path / "tricky.csv"
    path.write_text(out.getvalue(), newline="")

    run = await finish(
        client,
        await client.submit_file("adhoc", path, options={"table": table, "key": ["id"]}),
        stack,
    )
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.created_rows == 2000
    values = await _batch_values(stack, str(run.id))
    assert values and all(v.startswith(COPY_BATCH) for v in values), values[0][:40]

    rows = await db.fetch(f"SELECT id, note, qty FROM {table}")
    assert {r["id"]: (r["note"], r["qty"]) for r in rows} == expected


@pytest.mark.stack
async def test_a_value_copy_refuses_rejects_only_its_row(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The type is inferred from the first rows; a later value that does not fit fails the
    COPY, and the batch is applied again row by row: only that row is rejected."""
    table = unique("copybad")
    lines = ["id,qty"] + [f"{i},{i}" for i in range(1, 3001)]
    lines[2500] = "2500,twelve"
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    run = await finish(
        client,
        await client.submit_file("adhoc", path, options={"table": table, "key": ["id"]}),
        stack,
    )
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.created_rows, run.failed_rows) == (2999, 1)
    failure = await db.fetchrow(
        "SELECT row_number, reason, raw FROM sluice.row_log WHERE run_id = $1", run.id
    )
    assert failure["row_number"] == 2500
    assert "qty" in failure["reason"] and "twelve" in failure["reason"]
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2999


@pytest.mark.stack
async def test_a_validating_importer_still_sends_json(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    """Records validated in Python hold typed values: their batches stay JSON."""
    path = tmp_path / "typed.csv"
    path.write_text("id,name,price,qty,day,version\n1,a,1.00,1,2024-01-01,1\n")
    run = await finish(client, await client.submit_file("t_malformed", path), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    values = await _batch_values(stack, str(run.id))
    assert values and all(v.startswith(b"[") for v in values)


@pytest.mark.parametrize("as_text", [True, False])
def test_batches_cut_to_the_message_limit_keep_every_row(as_text: bool) -> None:
    """Narrow rows then wide ones: the first cut is still too big for the wide half, which
    lowers the limit while the narrow half is being sent. Every row is sent, once, in order."""
    columns = ("_sluice_row", "_sluice_sub", "id", "note")
    rows: list[Any] = []
    for i in range(1, 301):
        note = "x" * (10 if i <= 150 else 400)
        rows.append(
            [str(i), "0", str(i), note]
            if as_text
            else {"_sluice_row": i, "_sluice_sub": 0, "id": str(i), "note": note}
        )
    router = BatchRouter(("id",), 1, 1000, 10_000, columns if as_text else None)
    sent: list[int] = []
    for key, value in router.encode("run", rows):
        assert len(value) <= 10_000
        batch = RowBatch.parse(f"{uuid.uuid4()}:{key.split(b':')[1].decode()}".encode(), value)
        sent += [r["_sluice_row"] for r in batch.rows()]
    assert sent == list(range(1, 301))
    assert router.seq > 2  # it was cut more than once


@pytest.mark.stack
async def test_without_the_temporary_privilege_batches_go_the_json_way(
    client: Client, stack: Stack, db: asyncpg.Connection, started: Start
) -> None:
    """A role that may not create temporary tables cannot COPY a batch into one: the batch is
    applied from JSON instead, and so is every later one of that worker."""
    from sluice.storage.db import create_pool
    from sluice.storage.writer import BatchApplier, TargetPlan

    role, table = unique("notemp"), unique("copy_notemp")
    database = await db.fetchval("SELECT current_database()")
    await db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, note text)")
    await db.execute(f"CREATE ROLE {role} LOGIN")
    for grant in (
        f"GRANT USAGE ON SCHEMA sluice TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA sluice TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA sluice TO {role}",
        f"GRANT ALL ON {table} TO {role}",
        f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
    ):
        await db.execute(grant)
    runs = (await client.deps()).runs
    run = await started()
    plan = TargetPlan(table=table, columns=(("id", "bigint"), ("note", "text")), key=("id",))
    await runs.save_plan(run.id, plan.to_json(), {})
    url = stack.postgres.url.replace("//postgres@", f"//{role}@", 1)
    assert role in url
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        applier = BatchApplier(pool)
        columns = ("_sluice_row", "_sluice_sub", "id", "note")
        for seq, rows in enumerate(([["1", "0", "1", "a"]], [["2", "0", "2", ""]])):
            value = encode_copy_batch(columns, rows)
            batch = RowBatch.parse(f"{run.id}:{seq}".encode(), value)
            result = await applier.apply(batch, plan, dry_run=False)
            assert result.outcome is BatchOutcome.APPLIED and result.created == 1
        assert applier.use_temp is False
    finally:
        await pool.close()
        await db.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
    rows = await db.fetch(f"SELECT id, note FROM {table} ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "a"), (2, None)]


async def _versioned_table(db: asyncpg.Connection, table: str, policy: str) -> TargetPlan:
    """An empty table (id, note, version) and the plan of ``policy`` into it (the version
    column for 'update_if_newer')."""
    from sluice.schemas.runs import DuplicatePolicy
    from sluice.storage.writer import TargetPlan

    await db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, note text, version bigint)")
    return TargetPlan(
        table=table,
        columns=(("id", "bigint"), ("note", "text"), ("version", "bigint")),
        key=("id",),
        policy=DuplicatePolicy(policy),
        version_column="version" if policy == "update_if_newer" else None,
    )


@pytest.mark.stack
@pytest.mark.parametrize("policy", ["upsert", "update_if_newer"])
async def test_rows_imported_again_unchanged_are_neither_locked_nor_rewritten(
    client: Client, stack: Stack, db: asyncpg.Connection, policy: str, started: Start
) -> None:
    """ON CONFLICT DO UPDATE locks a stored row (a WAL record, a dirtied page) before its WHERE
    finds it unchanged. A COPY batch whose rows are mostly stored as they are leaves those out
    first: they keep their row version and get no lock (xmax stays 0), and of the rows among
    them exactly the changed ones are updated. A batch of mostly new rows is applied as before
    (its few stored rows are locked: the check below would see a lock)."""
    from sluice.storage.db import create_pool
    from sluice.storage.writer import BatchApplier

    table = unique("copy_again")
    plan = await _versioned_table(db, table, policy)
    runs = (await client.deps()).runs
    columns = ("_sluice_row", "_sluice_sub", "id", "note", "version")
    pool = await create_pool(stack.postgres.url, min_size=1, max_size=1)

    async def imported(rows: list[tuple[int, str, int]]) -> tuple[int, int, int]:
        run = await started()
        await runs.save_plan(run.id, plan.to_json(), {})
        lines = [[str(n), "0", str(i), note, str(v)] for n, (i, note, v) in enumerate(rows, 1)]
        batch = RowBatch.parse(f"{run.id}:0".encode(), encode_copy_batch(columns, lines))
        result = await BatchApplier(pool).apply(batch, plan, dry_run=False)
        assert result.outcome is BatchOutcome.APPLIED
        return result.created, result.updated, result.unchanged

    async def versions() -> dict[int, tuple[str, str]]:
        """Each row's version (ctid) and locker (xmax; '0' when none)."""
        stored = await db.fetch(f"SELECT id, ctid::text, xmax::text FROM {table}")
        return {r["id"]: (r["ctid"], r["xmax"]) for r in stored}

    try:
        rows = [(i, f"note {i}", 1) for i in range(1, 301)]
        assert await imported(rows) == (300, 0, 0)
        first = await versions()
        assert {x for _, x in first.values()} == {"0"}

        assert await imported(rows) == (0, 0, 300)
        assert await versions() == first  # not one row locked or rewritten

        changed = {i for i in range(1, 301) if i % 10 == 3}
        again = [(i, f"new {i}" if i in changed else n, v + (i in changed)) for i, n, v in rows]
        assert await imported(again) == (0, 30, 270)
        now = await versions()
        assert {i for i in now if now[i][0] != first[i][0]} == changed
        assert {i for i in now if now[i][1] != "0"} <= changed  # the unchanged: no lock
        got = await db.fetch(f"SELECT id, note, version FROM {table}")
        assert {tuple(r) for r in got} == set(again)

        # Mostly new rows (the sample sees new keys first): the plain upsert, which locks the
        # stored rows it finds unchanged.
        fresh = [(i, f"note {i}", 1) for i in range(1001, 1201)]
        assert await imported(fresh + again[:100]) == (200, 0, 100)
        locked = {i for i, (_, x) in (await versions()).items() if x != "0"} - changed
        assert locked == set(range(1, 101)) - changed
    finally:
        await pool.close()


BAD_PLAN_COLUMNS = (("id", "bigint"), ("price", "numeric"), ("day", "date"), ("note", "text"))


def _rows_with_bad_values(n: int) -> list[list[str]]:
    """Rows of (id, price, day, note); every 10th has a bad number, a bad date, both (the
    number is first in the plan's order) or a bad id, in turn from row 40."""
    rows = []
    for i in range(1, n + 1):
        price, day, id_ = f"{i}.5", f"2024-01-{1 + i % 28:02d}", str(i)
        kind = (i // 10) % 4 if i % 10 == 0 else None
        if kind == 0:
            price = f"{i},5 EUR"
        elif kind == 1:
            day = "2024-13-45"
        elif kind == 2:
            price, day = "twelve", "yesterday"
        elif kind == 3:
            id_ = f"{i}x"
        rows.append([str(i), "0", id_, price, day, "tab\tand\\slash" if i % 7 == 0 else ""])
    return rows


@pytest.mark.stack
async def test_copy_skips_the_rows_that_do_not_convert_and_names_each(
    stack: Stack, db: asyncpg.Connection
) -> None:
    from sluice.storage.copy import copy_skipping, explain_skipped, skips_bad_rows

    assert skips_bad_rows(db), "the embedded PostgreSQL is 18: COPY can skip rows"
    columns = ("_sluice_row", "_sluice_sub", "id", "price", "day", "note")
    rows = _rows_with_bad_values(100)
    body = RowBatch.parse(
        f"{uuid.uuid4()}:0".encode(), encode_copy_batch(columns, rows)
    ).copy_columns()[1]
    temp = unique("copyskip")
    async with db.transaction():
        await db.execute(
            f"CREATE TEMP TABLE {temp} (_sluice_row bigint, _sluice_sub integer, id bigint,"
            " price numeric, day date, note text) ON COMMIT DROP"
        )
        copied = await copy_skipping(db, temp, columns, body)
        assert (copied.rows, sorted(copied.skipped)) == (90, list(range(10, 101, 10)))
        assert await db.fetchval(f"SELECT count(*) FROM pg_temp.{temp}") == 90
        failures = await explain_skipped(db, BAD_PLAN_COLUMNS, columns, body, copied.skipped)
    reasons = {f.row_number: f.reason for f in failures}
    assert reasons[10] == """column 'day': date/time field value out of range: "2024-13-45\""""
    assert reasons[20] == """column 'price': invalid input syntax for type numeric: "twelve\""""
    assert reasons[30] == """column 'id': invalid input syntax for type bigint: "30x\""""
    assert reasons[40] == """column 'price': invalid input syntax for type numeric: "40,5 EUR\""""
    assert next(f.raw for f in failures if f.row_number == 70)["note"] == "tab\tand\\slash"


@pytest.mark.stack
async def test_a_bad_row_found_by_copy_is_logged_as_the_row_by_row_path_logs_it(
    client: Client, stack: Stack, db: asyncpg.Connection, started: Start
) -> None:
    """The same rows as a COPY batch (bad rows skipped by COPY) and as a JSON batch (the
    batch bisected until the bad rows stand alone): the same rows land, and the row log has
    the same rows with the same row numbers, reasons and values."""
    from sluice.storage.writer import BatchApplier, TargetPlan

    rows = _rows_with_bad_values(1000)
    columns = ("_sluice_row", "_sluice_sub", "id", "price", "day", "note")
    runs = (await client.deps()).runs
    applier = BatchApplier((await client.deps()).pool)
    logged, landed = [], []
    for as_copy in (True, False):
        table = unique("copy_vs_json")
        await db.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, price numeric, day date, note text)"
        )
        plan = TargetPlan(table=table, columns=BAD_PLAN_COLUMNS, key=("id",))
        run = await started()
        await runs.save_plan(run.id, plan.to_json(), {})
        if as_copy:
            batch = RowBatch.parse(f"{run.id}:0".encode(), encode_copy_batch(columns, rows))
        else:
            dicts = [dict(zip(columns, r, strict=True)) for r in rows]
            for d in dicts:
                d.update({k: v or None for k, v in d.items()})
                d["_sluice_row"], d["_sluice_sub"] = int(d["_sluice_row"]), 0
            batch = RowBatch(run.id, 0, orjson.dumps(dicts).decode())
        result = await applier.apply(batch, plan, dry_run=False)
        assert (result.outcome, result.created, result.failed) == (BatchOutcome.APPLIED, 900, 100)
        log = await db.fetch(
            "SELECT row_number, reason, raw FROM sluice.row_log WHERE run_id = $1", run.id
        )
        logged.append(sorted((r["row_number"], r["reason"], str(r["raw"])) for r in log))
        landed.append(sorted(tuple(r) for r in await db.fetch(f"SELECT * FROM {table}")))
    assert len(logged[0]) == 100 and logged[0] == logged[1]
    assert len(landed[0]) == 900 and landed[0] == landed[1]


@pytest.mark.stack
async def test_a_file_with_thousands_of_bad_rows_logs_each_once_and_counts_exactly(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Rows the split rejects (a wrong field count) are written to the row log in groups;
    values COPY refuses are skipped by it: every bad row is logged once with its row number
    and reason, and the counters add up."""
    table = unique("manybad")
    lines, short, refused = ["id,qty"], set(), set()
    for i in range(1, 14001):
        if i % 2 == 0 and i > 1000:
            lines.append(f"{i}")  # one field of two
            short.add(i)
        elif i % 10 == 3 and i > 2000:
            lines.append(f"{i},many")  # not a bigint, past the rows the types are read from
            refused.add(i)
        else:
            lines.append(f"{i},{i}")
    path = tmp_path / "manybad.csv"
    path.write_text("\n".join(lines) + "\n")
    run = await finish(
        client,
        await client.submit_file("adhoc", path, options={"table": table, "key": ["id"]}),
        stack,
    )
    assert len(short) > 5000 and refused
    bad = len(short) + len(refused)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.total_rows, run.processed_rows) == (14000, 14000)
    assert (run.created_rows, run.failed_rows) == (14000 - bad, bad)
    log = await db.fetch("SELECT row_number, reason FROM sluice.row_log WHERE run_id = $1", run.id)
    reasons = {r["row_number"]: r["reason"] for r in log}
    assert len(log) == len(reasons) == bad
    assert all("expected 2 fields" in reasons[i] for i in short)
    assert all(
        reasons[i] == """column 'qty': invalid input syntax for type bigint: "many\""""
        for i in refused
    )
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 14000 - bad


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


@pytest.mark.stack
@pytest.mark.parametrize("policy", ["upsert", "update_if_newer", "fail"])
async def test_no_statement_of_a_batch_reads_the_whole_target_table(
    db: asyncpg.Connection, policy: str
) -> None:
    """A connection prepares a plan's statements once and keeps the plan PostgreSQL made then
    (a statement without parameters has one generic plan): on a fresh import, that is the plan
    for an empty table. Each statement that looks up a batch's keys in the target must probe
    its key index whatever the table held when it was planned; a hash join reading the whole
    table made every batch of a 1,000,000-row import slower than the one before."""
    from sluice.storage.writer import Statements

    table = unique("copy_plans")
    plan = await _versioned_table(db, table, policy)
    statements = Statements(plan)
    looking_up = {
        "apply_copied": statements.apply_copied,
        "apply_copied_changed": statements.apply_copied_changed,
        "dry_copied": statements.dry_copied,
        "unchanged_share": statements.unchanged_share,
    }
    async with db.transaction():
        await db.execute(statements.create_temp)
        for name, sql in looking_up.items():
            if sql is None:
                continue
            explained = await db.fetchval(f"EXPLAIN (GENERIC_PLAN, FORMAT JSON) {sql}")
            nodes = _plan_nodes(orjson.loads(explained)[0]["Plan"])
            scanned = [n["Node Type"] for n in nodes if n.get("Relation Name") == table]
            assert scanned, f"{name} never reads {table}"
            assert "Seq Scan" not in scanned, f"{name} reads all of {table}: {scanned}"
        await db.execute(f"DROP TABLE pg_temp.{statements.temp}")
