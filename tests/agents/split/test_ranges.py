"""Byte ranges: a delimited file read by ranges in a pool of processes gives what reading it
from start to end gives: the same rows with the same numbers in each partition, in file order,
the same rejections with the same reasons, the same repeats; no row is cut in two, whatever
the quoting (newlines inside quotes, doubled quotes, a stray quote in an unquoted field, empty
lines, CRLF)."""

from __future__ import annotations

import asyncio
import csv
import io
import pickle
import random
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import orjson
import pytest

from sluice.agents.split.infer import DEFAULT_NULL_MARKERS, adhoc_importer
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.parse import parse_file
from sluice.agents.split.ranges import (
    FileBytes,
    RangeCutter,
    RangeSpec,
    count_lines,
    data_start,
    forget_pool,
    guess_records,
    read_ranges,
    usable,
)
from sluice.agents.split.repeats import RepeatCounter
from sluice.agents.split.route import BatchRouter
from sluice.errors import FileFormatError
from sluice.schemas.events import copy_lines, encode_copy_batch, encode_copy_lines
from sluice.schemas.formats import FormatOptions, ParsedRow
from sluice.schemas.importers import Field
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.filestore import iter_bytes
from tests.conftest import ROOT, Stack, finish, unique

PARTITIONS = 3
NOTES = [
    "plain",
    "two\nlines",
    'say "hi", then go',
    "comma, inside",
    "crlf\r\nin a quote",
    "",
    '"quoted" start',
    "ünïcødé ✓",
]


def tricky_csv(rows: int, seed: int, *, crlf: bool, stray: bool) -> str:
    """Rows with quoted newlines and quotes, empty lines, a bad field count now and then, a
    stray quote inside an unquoted field (``5 inch" screen``) when ``stray``."""
    rnd = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["id", "note", "qty"])
    for i in range(1, rows + 1):
        roll = rnd.random()
        if roll < 0.03:
            out.write("\r\n" if crlf else "\n")  # an empty line: no record
        if roll > 0.98:
            writer.writerow([i, "too", "many", "fields"])
            continue
        if stray and roll < 0.06:
            out.write(f'{i},5 inch" screen,{i}' + ("\r\n" if crlf else "\n"))
            continue
        key = i if roll < 0.9 else rnd.randrange(1, i + 1)  # some keys repeat
        writer.writerow([key, NOTES[i % len(NOTES)] + f" {i}", "" if i % 13 == 0 else i])
    return out.getvalue()


def serial(path: Path, header: list[str], mapper: RecordMapper) -> tuple[list, list, tuple]:
    with path.open("rb") as raw:
        parsed = parse_file(raw, FormatOptions())
        rows = list(parsed)
    records, failures = mapper.map_text(rows)
    parts: list[list[str]] = [[] for _ in range(PARTITIONS)]
    counter = RepeatCounter()
    keys = [r[2] for r in records]
    counter.add(keys)
    for line, key in zip(copy_lines(records), keys, strict=True):
        parts[zlib.crc32(key.encode()) % PARTITIONS].append(line)
    reasons = sorted((f.row_number, f.reason) for f in failures)
    return parts, reasons, (len(rows), counter.count())


def ranged(
    path: Path,
    header: list[str],
    mapper: RecordMapper,
    size: int,
    workers: int,
    tweak: Callable[[RangeSpec], None] | None = None,
):
    with path.open("rb") as raw:
        parsed = parse_file(raw, FormatOptions())
        data = FileBytes(raw.fileno())
        start = data_start(data, parsed.sniffed, header)
        assert start is not None
        encoding = parsed.sniffed.encoding or "utf-8"
        spec = RangeSpec(
            str(path), encoding, ",", header, mapper.importer, PARTITIONS, (2,), 1 << 20
        )
        if tweak is not None:
            tweak(spec)
        cutter = RangeCutter(data, start[0], size)

        async def collect() -> tuple[list, list, tuple]:
            parts: list[list[str]] = [[] for _ in range(PARTITIONS)]
            failures = []
            counter = RepeatCounter()
            records = 0
            async for result in read_ranges(cutter, spec, workers, start[1]):
                for p, lines in enumerate(result.lines):
                    parts[p] += lines.texts()
                failures += result.failures
                counter.add_hashes(result.hashes)
                records += result.records
            reasons = sorted((f.row_number, f.reason) for f in failures)
            return parts, reasons, (records, counter.count())

        return asyncio.run(collect())


def mapper_for(header: list[str]) -> RecordMapper:
    fields = [Field("id", "text"), Field("note", "text"), Field("qty", "text")]
    importer = adhoc_importer("t", ["id"], fields, null_markers=DEFAULT_NULL_MARKERS)
    return RecordMapper(importer, header)


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("stray", [False, True])
@pytest.mark.parametrize("size", [1, 97, 4096])
def test_ranges_give_what_reading_from_start_to_end_gives(
    tmp_path: Path, crlf: bool, stray: bool, size: int
) -> None:
    path = tmp_path / "tricky.csv"
    path.write_text(tricky_csv(3000, seed=size, crlf=crlf, stray=stray), newline="")
    header = ["id", "note", "qty"]
    mapper = mapper_for(header)
    expected = serial(path, header, mapper)
    got = ranged(path, header, mapper, size, workers=1)
    assert got[2] == expected[2]  # records read and repeats
    assert got[1] == expected[1]  # every rejection: its row number and reason
    assert got[0] == expected[0]  # every partition's rows, numbered, in file order
    assert sum(map(len, got[0])) > 2500


def test_the_pool_gives_the_same_as_one_process(tmp_path: Path) -> None:
    path = tmp_path / "tricky.csv"
    path.write_text(tricky_csv(20_000, seed=7, crlf=False, stray=True), newline="")
    header = ["id", "note", "qty"]
    mapper = mapper_for(header)
    try:
        assert ranged(path, header, mapper, 20_000, workers=2) == serial(path, header, mapper)
    finally:
        forget_pool()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_line_end_inside_quotes_far_into_the_file_renumbers_what_follows(
    tmp_path: Path, workers: int
) -> None:
    """Ranges are numbered by their lines until one holds a record of two lines: that range's
    read finds the guess wrong, every range after it is numbered again, and from then on its
    records are counted outside quotes (an empty line later is one more such miss)."""
    path = tmp_path / "late.csv"
    rows = [f"{i},note {i},{i}\n" for i in range(1, 6000)]
    rows[3000] = '3001,"two\nlines",3001\n'
    rows[4500] = "\n"  # an empty line: no record
    path.write_text("id,note,qty\n" + "".join(rows))
    header = ["id", "note", "qty"]
    mapper = mapper_for(header)
    try:
        got = ranged(path, header, mapper, 4096, workers=workers)
    finally:
        forget_pool()
    expected = serial(path, header, mapper)
    assert got == expected
    numbers = sorted(int(line.split("\t")[0]) for part in got[0] for line in part)
    assert numbers == list(range(1, 6000 - 1))  # 5,998 records, numbered 1 to 5,998 in the file


def test_one_stray_quote_does_not_make_the_rest_of_the_file_one_range(tmp_path: Path) -> None:
    """A quote inside an unquoted field keeps the count of quotes odd to the end of the file:
    the cutter gives up counting after a range's length and the csv module judges."""
    path = tmp_path / "stray.csv"
    body = "".join(f"{i},name {i},{i}\n" for i in range(2, 5000))
    path.write_text('id,note,qty\n1,5 inch" screen,1\n' + body)
    header = ["id", "note", "qty"]
    with path.open("rb") as raw:
        cutter = RangeCutter(FileBytes(raw.fileno()), len("id,note,qty\n"), 2048)
        while cutter.cut(len(cutter.cuts)) is not None:
            pass
    assert len(cutter.cuts) > 30  # about 80 KB in ranges of about 2 KB
    mapper = mapper_for(header)
    assert ranged(path, header, mapper, 2048, workers=1) == serial(path, header, mapper)


def test_a_key_of_two_columns_routes_as_the_router_does(tmp_path: Path) -> None:
    path = tmp_path / "two.csv"
    path.write_text("a,b,note\n" + "".join(f"{i % 50},{i % 7},n {i}\n" for i in range(3000)))
    header = ["a", "b", "note"]
    fields = [Field("a", "text"), Field("b", "text"), Field("note", "text")]
    importer = adhoc_importer("t", ["a", "b"], fields, null_markers=DEFAULT_NULL_MARKERS)
    mapper = RecordMapper(importer, header)
    columns = ("_sluice_row", "_sluice_sub", "a", "b", "note")
    router = BatchRouter(("a", "b"), PARTITIONS, 10**6, 10**9, columns)
    with path.open("rb") as raw:
        records, _ = mapper.map_text(list(parse_file(raw, FormatOptions())))
    router.add(records)
    expected = [copy_lines(rows) for rows in router.buffers]
    with path.open("rb") as raw:
        parsed = parse_file(raw, FormatOptions())
        data = FileBytes(raw.fileno())
        start = data_start(data, parsed.sniffed, header)
        assert start is not None
        spec = RangeSpec(str(path), "utf-8", ",", header, importer, PARTITIONS, (2, 3), 1 << 20)

        async def collect() -> list[list[str]]:
            parts: list[list[str]] = [[] for _ in range(PARTITIONS)]
            async for result in read_ranges(RangeCutter(data, start[0], 2048), spec, 1, 1):
                for p, lines in enumerate(result.lines):
                    parts[p] += lines.texts()
            return parts

        assert asyncio.run(collect()) == expected
    assert router.repeats.count().keys == 350  # every (a, b) pair of the 350 repeats


def test_an_importer_that_does_not_pickle_is_read_by_ranges_in_this_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tricky.csv"
    path.write_text(tricky_csv(3000, seed=3, crlf=False, stray=False), newline="")
    header = ["id", "note", "qty"]
    mapper = mapper_for(header)

    def unpicklable(spec: RangeSpec) -> None:
        object.__setattr__(spec, "hook", lambda: None)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pickle.dumps(spec)

    got = ranged(path, header, mapper, 4096, workers=2, tweak=unpicklable)
    assert got == serial(path, header, mapper)


def test_a_windows_1252_file_is_read_by_ranges_as_it_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "cp1252.csv"
    body = "".join(f'{i},"café {i}, 5 €",{i}\r\n' for i in range(1, 4000))
    path.write_bytes(("id,note,qty\r\n" + body).encode("cp1252"))
    header = ["id", "note", "qty"]
    with path.open("rb") as raw:
        sniffed = parse_file(raw, FormatOptions()).sniffed
    assert (sniffed.encoding, usable(sniffed)) == ("cp1252", True)
    mapper = mapper_for(header)
    got = ranged(path, header, mapper, 4096, workers=1)
    assert got == serial(path, header, mapper)
    assert "café 7, 5 €" in "".join(got[0][0] + got[0][1] + got[0][2])


def test_a_quote_left_open_fails_the_file_as_reading_it_whole_does(tmp_path: Path) -> None:
    path = tmp_path / "open.csv"
    body = "".join(f"{i},note {i},{i}\n" for i in range(1, 500))
    path.write_text("id,note,qty\n" + body + '500,"never closed,1\n' + body)
    header = ["id", "note", "qty"]
    mapper = mapper_for(header)
    with pytest.raises(FileFormatError) as whole:
        serial(path, header, mapper)
    with pytest.raises(FileFormatError) as by_ranges:
        ranged(path, header, mapper, 512, workers=1)
    assert str(by_ranges.value) == str(whole.value)
    assert "data record 500" in str(whole.value)


def test_guesses_count_records_outside_quotes() -> None:
    assert guess_records(b'1,"a\nb",2\n\n3,x,4\r\n\r\n5,"",6') == 3
    assert guess_records(b"\n1,a\n") == 1
    assert count_lines(b'1,"a\r\nb"\r\n2\r3\n') == 4
    assert ParsedRow(1, []).number == 1


def test_copy_lines_make_the_batch_encode_copy_batch_makes() -> None:
    columns = ("_sluice_row", "_sluice_sub", "a", "b")
    for rows in (
        [["1", "0", "plain", ""], ["2", "0", "x", "y"]],
        [["1", "0", "tab\there", "back\\slash"], ["2", "0", "two\nlines", "cr\r"]],
        [],
    ):
        assert encode_copy_lines(columns, copy_lines(rows)) == encode_copy_batch(columns, rows)


@pytest.mark.stack
async def test_an_import_read_by_ranges_lands_every_row_and_logs_every_rejection(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The stack's workers read delimited files over 64 KiB by ranges of 32 KiB (see
    tests/conftest.py): the table holds the last row of each key, the row log each rejected
    row with the number and reason reading the file whole gives, the repeats are counted."""
    path = tmp_path / "tricky.csv"
    path.write_text(tricky_csv(6000, seed=11, crlf=True, stray=True), newline="")
    assert path.stat().st_size > 3 * 32 * 1024
    header = ["id", "note", "qty"]
    with path.open("rb") as raw:
        rows = [r for r in parse_file(raw, FormatOptions()) if isinstance(r, ParsedRow)]
    last: dict[str, tuple[str, str]] = {}
    for row in rows:
        last[row.values[0].strip()] = (row.values[1].strip(), row.values[2].strip())
    _, reasons, (records, repeats) = serial(path, header, mapper_for(header))
    table = unique("ranges")
    options = {"table": table, "key": ["id"]}
    run = await finish(client, await client.submit_file("adhoc", path, options=options), stack)
    assert run.status is RunStatus.COMPLETED_WITH_ERRORS, run.error
    assert (run.total_rows, run.failed_rows) == (records, len(reasons))
    plan = await db.fetchval("SELECT plan FROM sluice.runs WHERE id = $1", run.id)
    assert orjson.loads(plan)["batching"]["ranges"] == 32 * 1024
    logged = await db.fetch(
        "SELECT row_number, reason FROM sluice.row_log WHERE run_id = $1", run.id
    )
    assert sorted((r["row_number"], r["reason"]) for r in logged) == reasons
    got = await db.fetch(f"SELECT id, note, qty FROM {table}")
    assert {
        str(r["id"]): (r["note"] or "", "" if r["qty"] is None else str(r["qty"])) for r in got
    } == last
    provenance = await db.fetchval("SELECT provenance FROM sluice.runs WHERE id = $1", run.id)
    assert orjson.loads(provenance)["repeated_keys"]["keys"] == repeats.keys


@pytest.mark.stack
async def test_a_run_split_by_ranges_is_split_again_by_the_ranges_its_plan_keeps(
    client: Client, stack: Stack, db: asyncpg.Connection
) -> None:
    """The range size is part of the batching a run's first split keeps with its plan: a later
    split of the run (here: resumed by recovery, on workers whose setting is 32 KiB) reads the
    file by the kept ranges and cuts the batches the first one cut."""
    table = unique("recut_ranges")
    deps = await client.deps()
    body = b"id,name\n" + b"".join(f"{i},name {i}\n".encode() for i in range(1, 3001))
    ref = await deps.files.put(iter_bytes([body]), name="recut.csv")
    run = await deps.runs.create(
        importer="adhoc",
        source="file",
        file_id=ref.id,
        file_name="recut.csv",
        options={"table": table, "key": ["id"]},
    )
    first = {"size": 400, "partitions": 2, "max_bytes": 900_000, "copy": True, "ranges": 4096}
    await deps.runs.save_plan(run.id, {"batching": first}, {})
    done = await finish(client, run, stack, timeout=90)
    assert done.status is RunStatus.COMPLETED, done.error
    per_partition = Counter(zlib.crc32(str(i).encode()) % 2 for i in range(1, 3001))
    # Batches of 400 rows of a partition, its last one shorter, however the ranges fall.
    assert done.total_batches == sum(-(-n // 400) for n in per_partition.values())
    assert done.created_rows == 3000
    plan = await db.fetchval("SELECT plan::text FROM sluice.runs WHERE id = $1", run.id)
    assert orjson.loads(plan)["batching"] == first
    said = f"run {run.id}: the file is read by byte ranges of 4096 bytes"
    assert any(said in w.log_path.read_text(errors="replace") for w in stack.workers)


@pytest.mark.stack
async def test_a_reimport_by_ranges_updates_exactly_the_rows_that_changed(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The same file again with 37 rows changed among 5,000: 37 updated, the rest unchanged,
    nothing created, and the table holds the new values."""
    table = unique("reimport")
    rows = {i: f"name {i}" for i in range(1, 5001)}
    path = tmp_path / "first.csv"
    path.write_text("id,name,qty\n" + "".join(f"{i},{n},{i % 7}\n" for i, n in rows.items()))
    options = {"table": table, "key": ["id"]}
    first = await finish(client, await client.submit_file("adhoc", path, options=options), stack)
    assert (first.status, first.created_rows) == (RunStatus.COMPLETED, 5000), first.error
    changed = set(random.Random(5).sample(sorted(rows), 37))
    for i in changed:
        rows[i] = f'renamed "{i}", twice\nover two lines'
    again = tmp_path / "again.csv"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "name", "qty"])
    writer.writerows([i, n, i % 7] for i, n in rows.items())
    again.write_text(out.getvalue())
    assert again.stat().st_size > 2 * 32 * 1024  # read by ranges
    run = await finish(client, await client.submit_file("adhoc", again, options=options), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert (run.created_rows, run.updated_rows, run.unchanged_rows) == (0, 37, 4963)
    got = await db.fetch(f"SELECT id, name FROM {table}")
    assert {r["id"]: r["name"] for r in got} == rows


HOLDER = """
import os, sys, time
from sluice.agents.split import ranges
pool = ranges.pool(2)
pids = {pool.submit(os.getpid).result() for _ in range(20)}
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(120)
"""


def test_the_readers_of_a_killed_worker_end(tmp_path: Path) -> None:
    """A worker SIGKILLed (no shutdown of its pool) leaves no reader waiting for work."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None
        readers = [int(p) for p in holder.stdout.readline().split()]
        assert readers and all(Path(f"/proc/{p}").exists() for p in readers)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() for p in readers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in readers if Path(f"/proc/{p}").exists()]
