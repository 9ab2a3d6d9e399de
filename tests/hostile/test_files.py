"""Hostile files against the real stack (broker, PostgreSQL, two worker processes): each one gets
a clear error, and nothing is lost or half-written (the target table and the run's counters and
status are checked)."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.schemas.importers import ADHOC
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish, unique

pytestmark = [pytest.mark.hostile, pytest.mark.stack]

MIB = 2**20


async def adhoc(
    client: Client, stack: Stack, path: Path, table: str, key: str = "id", **options: Any
) -> Run:
    """An ad-hoc import (no importer: the table comes from the file), waited for."""
    run = await client.submit_file(ADHOC, path, options={"table": table, "key": [key], **options})
    return await finish(client, run, stack)


async def table_exists(db: asyncpg.Connection, table: str) -> bool:
    return await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f'public."{table}"')


def assert_failed_cleanly(run: Run, *phrases: str) -> str:
    """Failed as a whole, with a message; no row counted, none written."""
    assert run.status is RunStatus.FAILED, run
    assert run.error, run
    for phrase in phrases:
        assert phrase in run.error, run.error
    counters = (run.processed_rows, run.created_rows, run.updated_rows, run.failed_rows)
    assert counters == (0, 0, 0, 0), run
    return run.error


def assert_counters_add_up(run: Run) -> None:
    parts = (
        run.created_rows
        + run.updated_rows
        + run.unchanged_rows
        + run.skipped_rows
        + run.failed_rows
    )
    assert run.processed_rows == parts == run.total_rows, run


# --- encodings -------------------------------------------------------------------------------


async def test_invalid_utf8_in_the_middle_of_a_utf8_file(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Used to be read as Windows-1252: every 'é' became 'Ã©', silently."""
    rows = [f"{i},Zoë café {i}\n".encode() for i in range(1, 6001)]
    rows[4000] = b"4001,broken \xff\xfe here\n"  # past the first 64 KiB
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"id,name\n" + b"".join(rows))
    offset = path.read_bytes().index(b"\xff")
    table = unique("h_utf8")
    run = await adhoc(client, stack, path, table)
    error = assert_failed_cleanly(run, "not valid UTF-8", f"byte offset {offset}", "0xFF")
    assert "UTF-8" in error and "Re-save the file as UTF-8" in error
    assert not await table_exists(db, table)


async def test_nul_bytes_in_a_csv(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "nul.csv"
    data = b"id,name\n1,a\n2,b\x00c\n3,d\n"
    path.write_bytes(data)
    table = unique("h_nul")
    run = await adhoc(client, stack, path, table)
    assert_failed_cleanly(run, f"NUL byte (0x00) at byte offset {data.index(0)}")
    assert not await table_exists(db, table)


async def test_nul_characters_in_json_lines_reject_only_their_row(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """JSON can carry a NUL as \\u0000, which PostgreSQL cannot store in text or jsonb: the row
    goes to the row log (escaped), the others land."""
    path = tmp_path / "nul.jsonl"
    path.write_text(
        '{"id": 1, "name": "a"}\n{"id": 2, "name": "b\\u0000c"}\n{"id": 3, "name": "d"}\n'
    )
    table = unique("h_jnul")
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.created_rows, run.failed_rows) == (2, 1)
    assert_counters_add_up(run)
    landed = await db.fetch(f'SELECT id, name FROM "{table}" ORDER BY id')
    assert [tuple(r) for r in landed] == [(1, "a"), (3, "d")]
    logged = await db.fetchrow(
        "SELECT row_number, raw, reason FROM sluice.row_log WHERE run_id = $1", run.id
    )
    assert logged["row_number"] == 2 and "NUL" in logged["reason"]
    assert "\\u0000" in logged["raw"]


async def test_an_integer_beyond_bigint_rejects_its_row(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """Used to fail the whole split: the batch encoder cannot write an int past 64 bits."""
    path = tmp_path / "huge.csv"
    path.write_text(
        "id,name,price,qty,day,version\n"
        "910001,a,1.00,1,2024-01-01,1\n"
        "99999999999999999999999,b,1.00,1,2024-01-01,1\n"
        "910003,c,inf,99999999999999999999999,2024-01-01,1\n"
        "910004,d,1.00,1,2024-01-01,1\n"
    )
    run = await finish(client, await client.submit_file("t_malformed", path, dry_run=True), stack)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.created_rows, run.failed_rows) == (2, 2)
    assert_counters_add_up(run)
    runs = (await client.deps()).runs
    reasons = {f.row_number: f.reason for f in await runs.failed_rows(run.id)}
    assert "id" in reasons[2] and "less than or equal to 9223372036854775807" in reasons[2]
    assert "qty" in reasons[3] and "price" in reasons[3]


async def test_a_key_too_big_for_the_index_rejects_its_row(
    stack: Stack, client: Client, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """PostgreSQL refuses an index entry over about 2.7 kB (SQLSTATE 54000, program limit
    exceeded): the row's fault, not the database's, so it is rejected, not retried."""
    import secrets

    table = unique("bigkey")
    huge = secrets.token_hex(8000)  # 16,000 characters that do not compress
    path = tmp_path / "bigkey.csv"
    path.write_text(f"id,name\nk1,a\n{huge},b\nk3,c\n")
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.created_rows, run.failed_rows) == (2, 1)
    assert_counters_add_up(run)
    (failure,) = await (await client.deps()).runs.failed_rows(run.id)
    assert failure.row_number == 2 and "index row" in failure.reason, failure.reason
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2


# --- sizes -----------------------------------------------------------------------------------


def _vm_peak(stack: Stack) -> int:
    total = 0
    for worker in stack.workers:
        assert worker.proc is not None
        status = Path(f"/proc/{worker.proc.pid}/status").read_text()
        peak = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        total += int(peak.split()[1]) * 1024
    return total


async def test_a_100_mb_line_fails_fast_with_bounded_memory(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "one-line.csv"
    block = b"x" * MIB
    with path.open("wb") as out:  # written in blocks: the test holds no 100 MB either
        out.write(b"id,name\n1,")
        for _ in range(100):
            out.write(block)
    table = unique("h_line")
    before = _vm_peak(stack)
    run = await adhoc(client, stack, path, table)
    assert_failed_cleanly(run, "longer than the 16 MiB allowed for one record", "max_record_bytes")
    assert not await table_exists(db, table)
    # The workers' peak resident memory grew by far less than the line: it was never assembled.
    assert _vm_peak(stack) - before < 80 * MIB


async def test_10000_columns_are_refused_with_the_postgres_limit(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    names = ["id", *(f"c{i}" for i in range(1, 10_000))]
    path = tmp_path / "wide.csv"
    path.write_text(
        ",".join(names) + "\n" + "".join(f"{r}," + ",".join(["v"] * 9999) + "\n" for r in (1, 2))
    )
    table = unique("h_wide")
    run = await adhoc(client, stack, path, table)
    assert_failed_cleanly(run, "10000 columns", "at most 1600 columns", "at most 1598")
    assert not await table_exists(db, table)


async def test_1598_columns_are_imported(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The most an import can take: PostgreSQL's 1,600 columns less two for the row number and
    sub-row that travel with every batch."""
    names = ["id", *(f"c{i}" for i in range(1, 1598))]
    path = tmp_path / "widest.csv"
    rows = "".join(f"{r}," + ",".join(["v"] * 1597) + "\n" for r in (1, 2))
    path.write_text(",".join(names) + "\n" + rows)
    table = unique("h_1600")
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.created_rows == 2
    columns = await db.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = $1", table
    )
    assert columns == 1598
    assert await db.fetchval(f'SELECT c1597 FROM "{table}" WHERE id = 2') == "v"


# --- identifiers -----------------------------------------------------------------------------


async def test_keyword_and_injection_headers_are_quoted_or_normalised(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    canary = unique("h_canary")
    await db.execute(f'CREATE TABLE "{canary}" (id int PRIMARY KEY)')
    await db.execute(f'INSERT INTO "{canary}" VALUES (1)')
    tables_before = set(
        await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    )
    header = [
        "id",
        "select",
        "from",
        "order",
        "user",
        '"a""b"',
        f'"x; DROP TABLE {canary}; --"',
        "xmin",
        "Order",
        '"it\'s"',
    ]
    path = tmp_path / "keywords.csv"
    path.write_text(
        ",".join(header) + "\n" + "1,s1,f1,o1,u1,q1,d1,x1,O1,a1\n2,s2,f2,o2,u2,q2,d2,x2,O2,a2\n"
    )
    # The table's own name is hostile too: it is quoted everywhere, never spliced.
    table = f'h_"t"; DROP TABLE {canary}; --'[:63]
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.created_rows == 2
    assert_counters_add_up(run)
    columns = [
        r["column_name"]
        for r in await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1"
            " ORDER BY ordinal_position",
            table,
        )
    ]
    assert columns == [
        "id",
        "select",
        "from",
        "order",
        "user",
        "a_b",
        f"x_drop_table_{canary}",
        "c_xmin",
        "order_9",
        "it_s",
    ]
    quoted = '"' + table.replace('"', '""') + '"'
    rows = await db.fetch(f"SELECT * FROM {quoted} ORDER BY id")
    assert [list(r.values()) for r in rows] == [
        [1, "s1", "f1", "o1", "u1", "q1", "d1", "x1", "O1", "a1"],
        [2, "s2", "f2", "o2", "u2", "q2", "d2", "x2", "O2", "a2"],
    ]
    # No other table touched: the canary is there with its row, and only one table is new.
    assert await db.fetchval(f'SELECT count(*) FROM "{canary}"') == 1
    tables_after = set(
        await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    )
    assert {r["tablename"] for r in tables_after - tables_before} == {table}


async def test_a_table_name_postgres_would_truncate_is_refused(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "ok.csv"
    path.write_text("id,name\n1,a\n")
    table = "h_" + "t" * 70
    run = await adhoc(client, stack, path, table)
    assert_failed_cleanly(run, "1 to 63 bytes", "shorter table name")
    assert not await table_exists(db, table[:63])


# --- compression -----------------------------------------------------------------------------


def write_bomb(path: Path, gib: int) -> int:
    """`gib` GiB of zeros as a chain of gzip members (RFC 1952; gzip -d reads them all), each
    16 MiB of zeros in 16 KB: the file is made in a blink and never held whole in memory."""
    member = gzip.compress(bytes(16 * MIB), compresslevel=9)
    with path.open("wb") as out:
        for _ in range(gib * 64):
            out.write(member)
    return path.stat().st_size


async def test_a_gzip_bomb_is_stopped_by_the_decompression_limit(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "bomb.csv.gz"
    size = write_bomb(path, 10)  # 10 GiB of content
    assert size < 11 * MIB
    table = unique("h_bomb")
    run = await adhoc(client, stack, path, table)
    assert_failed_cleanly(run, "compression bomb", "decompression limit", "500:1")
    assert not await table_exists(db, table)


async def test_several_gzip_members_are_read_whole(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The upload check reads every member, like the parser: the second one is not skipped."""
    path = tmp_path / "members.csv.gz"
    path.write_bytes(gzip.compress(b"id,name\n1,a\n") + gzip.compress("2,é\n3,c\n".encode()))
    table = unique("h_members")
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED, run.error
    landed = await db.fetch(f'SELECT id, name FROM "{table}" ORDER BY id')
    assert [tuple(r) for r in landed] == [(1, "a"), (2, "é"), (3, "c")]


# --- files with nothing to infer a table from -----------------------------------------------

ROWS = "id,name,price,qty,day\n1,apple,1.50,3,2024-01-05\n2,pear,2.25,10,2024-02-29\n"


async def column_types(db: asyncpg.Connection, table: str) -> list[tuple[str, str]]:
    records = await db.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        f'public."{table}"',
    )
    return [(r[0], r[1]) for r in records]


async def test_a_header_only_file_leaves_no_table_and_the_next_file_infers_afresh(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A failed header-only import used to leave a table of text columns behind: the next real
    file kept them, and sum(price) failed."""
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,name,price,qty,day\n")
    real = tmp_path / "rows.csv"
    real.write_text(ROWS)
    table, fresh = unique("h_hdr"), unique("h_hdr_fresh")

    failed = await adhoc(client, stack, header_only, table)
    assert assert_failed_cleanly(failed) == "the file has a header but no data rows"
    assert not await table_exists(db, table)

    after = await adhoc(client, stack, real, table)
    assert after.status is RunStatus.COMPLETED, after.error
    assert after.provenance and after.provenance["schema_changes"] == []
    first = await adhoc(client, stack, real, fresh)
    assert first.status is RunStatus.COMPLETED, first.error
    types = await column_types(db, table)
    assert types == await column_types(db, fresh)
    assert types == [
        ("id", "bigint"),
        ("name", "text"),
        ("price", "numeric"),
        ("qty", "bigint"),
        ("day", "date"),
    ]
    total = await db.fetchval(f'SELECT sum(price) FROM "{table}"')
    assert str(total) == "3.75"


async def test_a_file_whose_sample_has_no_readable_record_creates_no_table(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Every record has the wrong number of fields: nothing to infer the types from."""
    path = tmp_path / "ragged.csv"
    path.write_text("id,name,price\n1,a\n2,b\n3,c,1.5,extra\n")
    table = unique("h_ragged")
    run = await adhoc(client, stack, path, table)
    assert assert_failed_cleanly(run) == (
        f"none of the first 3 records could be read, so there is nothing to infer the columns "
        f"of public.{table} from (record 1: expected 3 fields as in the header, found 2 "
        f"(record ending on line 2)). Fix the file, or create the table yourself and import "
        f"into it"
    )
    assert not await table_exists(db, table)
    # Into a table that exists, the same file rejects its rows one by one, as before.
    await db.execute(
        f'CREATE TABLE public."{table}" (id bigint PRIMARY KEY, name text, price numeric)'
    )
    into = await adhoc(client, stack, path, table)
    assert into.status is RunStatus.COMPLETED_WITH_ERRORS, into.error
    assert (into.failed_rows, into.created_rows) == (3, 0)


# --- files that are something else than they seem -------------------------------------------


async def test_a_zip_of_a_csv_says_to_unzip_it(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """It used to be called a damaged XLSX workbook, to be saved again as .xlsx."""
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("orders.csv", ROWS)
    table = unique("h_zip")
    run = await adhoc(client, stack, path, table)
    error = assert_failed_cleanly(run)
    assert error == "this is a ZIP archive of orders.csv: unzip it and import the file"
    assert not await table_exists(db, table)


async def test_a_tar_gz_says_it_is_a_tar_archive_to_extract(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """It used to be "a NUL byte at offset 12 ... re-save it as UTF-8"."""
    path = tmp_path / "export.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        data = ROWS.encode()
        member = tarfile.TarInfo("orders.csv")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    table = unique("h_tgz")
    run = await adhoc(client, stack, path, table)
    error = assert_failed_cleanly(run)
    assert error == (
        "the file is a gzip-compressed tar archive (.tar.gz) whose first member is "
        "'orders.csv', not a data file: extract it (tar -xzf FILE, or any archive tool) and "
        "import the file it holds"
    )
    assert not await table_exists(db, table)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
async def test_utf16_with_a_byte_order_mark_is_imported(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path, codec: str
) -> None:
    """It used to be refused: "byte 0xFF is not valid UTF-8"."""
    path = tmp_path / f"{codec}.csv"
    path.write_bytes(("\ufeffid,name\r\n1,Zoë\r\n2,東京\r\n").encode(codec))
    table = unique("h_utf16")
    run = await adhoc(client, stack, path, table)
    assert run.status is RunStatus.COMPLETED, run.error
    assert (run.created_rows, run.failed_rows) == (2, 0)
    assert run.provenance and run.provenance["encoding"] == codec
    assert run.provenance["header"] == ["id", "name"]
    landed = await db.fetch(f'SELECT id, name FROM "{table}" ORDER BY id')
    assert [tuple(r) for r in landed] == [(1, "Zoë"), (2, "東京")]


async def test_a_year_past_9999_is_said_to_be_out_of_range(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """It used to be "invalid date separator, expected `-`"."""
    await db.execute("TRUNCATE t_dates")
    path = tmp_path / "dates.csv"
    path.write_text(
        "id,name,price,qty,day,version\n"
        "1,a,1.00,1,2024-01-05,1\n"
        "2,b,1.00,1,10000-01-01,1\n"
        "3,c,1.00,1,9999-12-31,1\n"
    )
    run = await finish(client, await client.submit_file("t_dates", path), stack)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.created_rows, run.failed_rows) == (2, 1)
    assert_counters_add_up(run)
    (failure,) = await (await client.deps()).runs.failed_rows(run.id)
    assert failure.row_number == 2
    assert failure.reason == "day: year 10000 is out of range (1 to 9999) (got '10000-01-01')"
    assert [r[0] for r in await db.fetch("SELECT id FROM t_dates ORDER BY id")] == [1, 3]
