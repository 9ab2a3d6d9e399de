"""File imports end to end on the real embedded stack: upload, split, upsert, counters, row log."""

from __future__ import annotations

import asyncio
import gzip
import random
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest

from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish
from tests.support.rows import (
    HEADER,
    Row,
    checksum,
    csv_text,
    make_rows,
    reset,
    table_checksum,
    write_csv,
)

pytestmark = pytest.mark.stack


# ----------------------------------------------------------------------------- exact landing


async def test_100k_rows_land_exactly_and_a_rerun_changes_nothing(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_exact")
    rows = make_rows(100_000)
    path = write_csv(tmp_path / "items.csv", rows)

    run = await finish(client, await client.submit_file("t_exact", path), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert (run.total_rows, run.processed_rows) == (100_000, 100_000)
    assert (run.created_rows, run.updated_rows, run.unchanged_rows) == (100_000, 0, 0)
    assert (run.skipped_rows, run.failed_rows) == (0, 0)
    assert run.progress_percent == 100
    assert await table_checksum(db, "t_exact") == (100_000, checksum(rows))

    again = await finish(client, await client.submit_file("t_exact", path), stack)
    assert again.status is RunStatus.COMPLETED, again.error
    assert (again.created_rows, again.updated_rows, again.unchanged_rows) == (0, 0, 100_000)
    assert again.processed_rows == 100_000
    assert await table_checksum(db, "t_exact") == (100_000, checksum(rows))


async def test_changed_rows_are_counted_as_updated(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_dry")
    rows = make_rows(1000)
    await finish(
        client, await client.submit_file("t_dry", write_csv(tmp_path / "a.csv", rows)), stack
    )
    changed = [(r[0], r[1] + " v2", *r[2:]) if r[0] % 10 == 0 else r for r in rows]
    changed += make_rows(50, ids=range(5001, 5051), seed=3)
    run = await finish(
        client,
        await client.submit_file("t_dry", write_csv(tmp_path / "b.csv", changed)),
        stack,  # type: ignore[arg-type]
    )
    assert (run.created_rows, run.updated_rows, run.unchanged_rows) == (50, 100, 900)
    assert await table_checksum(db, "t_dry") == (1050, checksum(changed))  # type: ignore[arg-type]


async def test_repeated_keys_end_with_their_last_value_across_two_workers(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    assert all(w.alive for w in stack.workers) and len(stack.workers) == 2
    await reset(db, "t_dups")
    rnd = random.Random(7)
    ids = [rnd.randrange(1, 1001) for _ in range(20_000)]
    rows = make_rows(0, ids=ids, seed=11)
    last: dict[int, Row] = {}
    for r in rows:
        last[r[0]] = r
    path = write_csv(tmp_path / "dups.csv", rows)

    run = await finish(client, await client.submit_file("t_dups", path), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.processed_rows == 20_000
    assert run.created_rows == len(last)
    # Every later occurrence of a key replaced the one before it, or matched it.
    assert run.created_rows + run.updated_rows + run.unchanged_rows == 20_000
    assert await table_checksum(db, "t_dups") == (len(last), checksum(last.values()))
    repeated = Counter(ids)
    assert run.provenance and run.provenance["repeated_keys"] == {
        "keys": sum(1 for n in repeated.values() if n > 1),
        "rows": 20_000 - len(last),
        "won": "the last row of each key in the file (policy upsert)",
    }
    assert run.total_batches > 2 * 4  # batches went to every partition, both workers took some
    assert all(w.alive for w in stack.workers), stack.logs()


# ----------------------------------------------------------------------------- crash


@pytest.mark.timeout(600)
async def test_sigkill_of_a_worker_mid_run_loses_and_doubles_nothing(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_killed")
    rows = make_rows(150_000, seed=5)
    path = write_csv(tmp_path / "big.csv", rows)
    run = await client.submit_file("t_killed", path)

    # Kill both workers while the run is partly applied (the split may or may not be done),
    # then start them again: the request and the unapplied batches are redelivered.
    for _ in range(600):
        current = await client.get_run(run.id)
        if current.processed_rows > 0 or current.status.terminal:
            break
        await asyncio.sleep(0.05)
    assert not current.status.terminal, "the run finished before the kill; make the file larger"
    victim = stack.workers[0]
    victim.kill()
    await asyncio.sleep(1)
    victim.start()

    done = await finish(client, run, stack, timeout=400)
    assert done.status is RunStatus.COMPLETED, done.error
    assert done.processed_rows == 150_000
    assert (done.created_rows, done.updated_rows, done.unchanged_rows) == (150_000, 0, 0)
    assert done.applied_batches == done.total_batches
    assert await table_checksum(db, "t_killed") == (150_000, checksum(rows))
    n = await db.fetchval(
        "SELECT sum(created + updated + unchanged + skipped + failed) FROM sluice.batches"
        " WHERE run_id = $1",
        run.id,
    )
    assert n == 150_000


# ----------------------------------------------------------------------------- bad input


async def test_malformed_rows_go_to_the_row_log_and_the_rest_lands(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_malformed")
    good = make_rows(20)
    rendered = csv_text(good).splitlines()[1:]  # quoted where needed
    lines = [",".join(HEADER), *rendered[:5]]
    lines.append("101,too,few")  # line 7 of the file, data row 6
    lines += rendered[5:10]
    lines.append("102,bad number,abc,1,2024-01-01,1")  # data row 12
    lines.append("103,bad date,1.00,1,2024-13-45,1")  # data row 13
    lines.append(",empty key,1.00,1,2024-01-01,1")  # data row 14
    lines.append("104,too,many,1,2024-01-01,1,extra")  # data row 15
    lines += rendered[10:]
    path = tmp_path / "malformed.csv"
    path.write_text("\n".join(lines) + "\n")

    run = await finish(client, await client.submit_file("t_malformed", path), stack)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS
    assert (run.total_rows, run.processed_rows) == (25, 25)
    assert (run.created_rows, run.failed_rows) == (20, 5)
    log = await db.fetch(
        "SELECT row_number, reason, raw FROM sluice.row_log WHERE run_id = $1 ORDER BY row_number",
        run.id,
    )
    by_row = {r["row_number"]: r["reason"] for r in log}
    assert sorted(by_row) == [6, 12, 13, 14, 15]
    assert "expected 6 fields" in by_row[6] and "found 3" in by_row[6]
    assert "price" in by_row[12]
    assert "day" in by_row[13]
    assert "id" in by_row[14]
    assert "found 7" in by_row[15]
    assert all(r["raw"] is not None for r in log)
    assert await table_checksum(db, "t_malformed") == (20, checksum(good))


async def test_rows_rejected_by_the_database_are_isolated(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A value that passes validation but not PostgreSQL (integer out of range) is bisected out."""
    await reset(db, "t_malformed")
    good = make_rows(3000)
    bad = list(good)
    bad[1234] = (*good[1234][:3], 2**40, *good[1234][4:])  # qty is a PostgreSQL integer
    path = write_csv(tmp_path / "range.csv", bad)
    run = await finish(client, await client.submit_file("t_malformed", path), stack)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS
    assert (run.created_rows, run.failed_rows, run.processed_rows) == (2999, 1, 3000)
    reason = await db.fetchval(
        "SELECT reason FROM sluice.row_log WHERE run_id = $1 AND row_number = 1235", run.id
    )
    assert reason is not None and "qty" in reason
    n, _ = await table_checksum(db, "t_malformed")
    assert n == 2999


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty"),
        ("header.csv", b"id,name,price,qty,day,version\n", "no data rows"),
        ("nokey.csv", b"name,price\nwidget,1.00\n", "id"),
        ("binary.csv", b"id,name\n1,\x81\x8d\x8f\x90\x9d\xff\xfe\x00\x00\n", "not text"),
    ],
)
async def test_unusable_files_fail_with_a_message_and_write_nothing(
    stack: Stack,
    client: Client,
    db: asyncpg.Connection,
    tmp_path: Path,
    name: str,
    content: bytes,
    message: str,
) -> None:
    await reset(db, "t_failing")
    path = tmp_path / name
    path.write_bytes(content)
    run = await finish(client, await client.submit_file("t_failing", path), stack)
    assert run.status is RunStatus.FAILED
    assert run.error and message in run.error.lower(), run.error
    assert await db.fetchval("SELECT count(*) FROM t_failing") == 0
    assert await db.fetchval("SELECT count(*) FROM sluice.batches WHERE run_id = $1", run.id) == 0


# ----------------------------------------------------------------------------- dry run


async def test_dry_run_writes_nothing_and_projects_the_counts(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_dry")
    base = make_rows(500)
    await finish(
        client, await client.submit_file("t_dry", write_csv(tmp_path / "a.csv", base)), stack
    )
    before = await table_checksum(db, "t_dry")

    changed = [(r[0], r[1] + "!", *r[2:]) if r[0] <= 40 else r for r in base]
    new = make_rows(60, ids=range(1001, 1061), seed=9)
    text = csv_text(changed + new) + "9999,bad,notanumber,1,2024-01-01,1\n"  # type: ignore[operator]
    path = tmp_path / "dry.csv"
    path.write_text(text)

    run = await finish(client, await client.submit_file("t_dry", path, dry_run=True), stack)
    assert run.dry_run
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS
    assert (run.created_rows, run.updated_rows, run.unchanged_rows, run.failed_rows) == (
        60,
        40,
        460,
        1,
    )
    assert await table_checksum(db, "t_dry") == before


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("sep", [",", "\t", ";", "|"], ids=["comma", "tab", "semicolon", "pipe"])
async def test_delimiters_are_detected_and_aliases_match(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path, sep: str
) -> None:
    await reset(db, "t_delims")
    rows = make_rows(300, seed=ord(sep))
    # Aliases, matched case- and space-insensitively: "Item ID", "TITLE", "Unit  Price", ...
    header = ("Item ID", "TITLE", "Unit  Price", "quantity", "Date", "Version")
    path = tmp_path / "delims.csv.gz"
    path.write_bytes(gzip.compress(csv_text(rows, header=header, sep=sep).encode()))
    run = await finish(client, await client.submit_file("t_delims", path), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert await table_checksum(db, "t_delims") == (300, checksum(rows))


async def test_bom_and_cp1252_files_are_read(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_delims")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,name\n1,caf\xc3\xa9\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"id,name\n2,na\xefve \x80 price\n")
    for path in (bom, latin):
        run = await finish(client, await client.submit_file("t_delims", path), stack)
        assert run.status is RunStatus.COMPLETED, run.error
    names = dict(await db.fetch("SELECT id, name FROM t_delims"))
    assert names == {1: "café", 2: "naïve € price"}


async def test_json_lines_and_json_arrays(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_delims")
    jl = tmp_path / "rows.jsonl"
    jl.write_text('{"id": 1, "name": "a", "price": 1.5}\n{"id": 2, "name": "b", "qty": 3}\n')
    arr = tmp_path / "rows.json"
    arr.write_text('[{"ID": 3, "Title": "c"}, {"id": 4, "name": "d", "day": "2024-02-29"}]')
    for path in (jl, arr):
        run = await finish(client, await client.submit_file("t_delims", path), stack)
        assert run.status is RunStatus.COMPLETED, run.error
    got = [tuple(r) for r in await db.fetch("SELECT id, name, qty FROM t_delims ORDER BY id")]
    assert got == [(1, "a", None), (2, "b", 3), (3, "c", None), (4, "d", None)]


# ----------------------------------------------------------------------------- policies


async def test_update_if_newer_ends_the_same_in_one_batch_and_in_many(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A row replaces the stored one when that has no version or an older one; so of rows of
    one key, the first of the highest version wins, and the last when none has a version,
    whether the rows share a batch (t_newer_ties) or each has its own (t_newer_apart)."""
    day = "2024-01-01"
    first = [
        (1, "first of 2", "1.00", 1, day, 2),
        (1, "older", "1.00", 1, day, 1),
        (1, "second of 2", "1.00", 1, day, 2),
        (2, "no version a", "2.00", 2, day, ""),
        (2, "no version b", "2.00", 2, day, ""),
        (3, "no version", "3.00", 3, day, ""),
        (3, "version 3", "3.00", 3, day, 3),
        (3, "no version after", "3.00", 3, day, ""),
    ]
    again = [(1, "tie with the stored", "1.00", 1, day, 2), (2, "now 1", "2.00", 2, day, 1)]
    a = write_csv(tmp_path / "first.csv", first)
    b = write_csv(tmp_path / "again.csv", again)
    wanted = [
        {1: "first of 2", 2: "no version b", 3: "version 3"},
        {1: "first of 2", 2: "now 1", 3: "version 3"},
    ]
    for slug in ("t_newer_ties", "t_newer_apart"):
        await reset(db, slug)
        for path, want in zip((a, b), wanted, strict=True):
            run = await finish(client, await client.submit_file(slug, path), stack)
            assert run.status is RunStatus.COMPLETED, run.error
            assert dict(await db.fetch(f"SELECT id, name FROM {slug}")) == want, (slug, path)


async def test_duplicate_policies(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    first = [(1, "one", "1.00", 1, "2024-01-01", 5), (2, "two", "2.00", 2, "2024-01-02", 5)]
    second = [(1, "ONE", "1.00", 1, "2024-01-01", 9), (2, "TWO", "2.00", 2, "2024-01-02", 1)]
    second += [(3, "three", "3.00", 3, "2024-01-03", 1)]
    a = write_csv(tmp_path / "a.csv", first)
    b = write_csv(tmp_path / "b.csv", second)
    results = {}
    for slug in ("t_skip", "t_newer", "t_strict"):
        await reset(db, slug)
        await finish(client, await client.submit_file(slug, a), stack)
        results[slug] = await finish(client, await client.submit_file(slug, b), stack)

    for slug, won in (
        ("t_skip", "the first row of each key (policy skip)"),
        (
            "t_newer",
            "the row with the highest version, the first of them on a tie (policy update_if_newer)",
        ),
    ):
        p = results[slug].provenance
        assert p and p["repeated_keys"] == {"keys": 0, "rows": 0, "won": won}
    skip = results["t_skip"]
    assert (skip.created_rows, skip.skipped_rows, skip.updated_rows) == (1, 2, 0)
    assert dict(await db.fetch("SELECT id, name FROM t_skip")) == {1: "one", 2: "two", 3: "three"}

    newer = results["t_newer"]  # id 1 has a newer version, id 2 an older one
    assert (newer.created_rows, newer.updated_rows, newer.skipped_rows) == (1, 1, 1)
    assert dict(await db.fetch("SELECT id, name FROM t_newer")) == {1: "ONE", 2: "two", 3: "three"}

    strict = results["t_strict"]
    assert strict.status is RunStatus.COMPLETED_WITH_ERRORS
    assert (strict.created_rows, strict.failed_rows) == (1, 2)
    reasons = await db.fetch("SELECT reason FROM sluice.row_log WHERE run_id = $1", strict.id)
    assert all("already exists" in r["reason"] for r in reasons)


# ----------------------------------------------------------------------------- unpivot


async def test_meter_readings_are_unpivoted(
    stack: Stack, client: Client, db: asyncpg.Connection
) -> None:
    from importlib import resources

    sample = Path(str(resources.files("sluice") / "samples" / "meter_readings.csv"))
    await db.execute("TRUNCATE meter_readings")
    run = await finish(client, await client.submit_file("meter_readings", sample), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    lines = sample.read_text().splitlines()
    header = lines[0].split(",")
    cells = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    readings = sum(1 for c in cells for k, v in c.items() if k.startswith("HH") and v != "")
    assert readings > 30 * 48 * 0.9  # the sample is mostly full
    assert await db.fetchval("SELECT count(*) FROM meter_readings") == readings
    assert (run.created_rows, run.processed_rows) == (readings, readings)
    assert await db.fetchval("SELECT count(DISTINCT period) FROM meter_readings") == 48
    first = cells[0]
    kwh = await db.fetchval(
        "SELECT kwh FROM meter_readings WHERE meter = $1 AND day = $2::text::date AND period = 7",
        first["MPAN"],
        first["Date"],
    )
    assert str(kwh) == first["HH07"]


# ----------------------------------------------------------------------------- poison messages


async def test_poison_batches_go_to_the_dead_letter_topic_and_fail_their_run(
    stack: Stack, client: Client
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from sluice.agents.split.plan import plan_for
    from tests.conftest import TOPICS
    from tests.support.importers import malformed

    runs = (await client.deps()).runs
    run = await runs.create(importer="t_malformed", source="file")
    await runs.start(run.id)
    await runs.save_plan(run.id, plan_for(malformed).to_json(), {})
    marker = uuid.uuid4().hex
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.batches, f"no key {marker}".encode(), partition=0)
        await producer.send_and_wait(
            TOPICS.batches, b"[{not json", key=f"{run.id}:7".encode(), partition=1
        )
    finally:
        await producer.stop()

    failed = await finish(client, run, stack, timeout=60)
    assert failed.status is RunStatus.FAILED
    assert failed.error and "batch 7" in failed.error and "dead-letter" in failed.error

    consumer = AIOKafkaConsumer(
        TOPICS.deadletter, bootstrap_servers=stack.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    letters: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(30):
            while len(letters) < 2:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        letter = orjson.loads(record.value)
                        if marker in letter["payload"] or str(run.id) in letter["reason"]:
                            letters.append(letter)
    finally:
        await consumer.stop()
    assert {letter["topic"] for letter in letters} == {TOPICS.batches}
    reasons = " | ".join(str(letter["reason"]) for letter in letters)
    assert "not a row batch" in reasons and "not JSON" in reasons
    assert all(isinstance(letter["offset"], int) for letter in letters)
