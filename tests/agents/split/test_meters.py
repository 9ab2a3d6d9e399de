"""Meter files end to end: the bundled half-hourly importer (an unpivot of HH01..HH48) and the
daily one, with bad values, bad dates, empty cells, fix-and-import-again and wrong shapes."""

from __future__ import annotations

import csv
import io
import json
import random
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from sluice.agents.split.map import RecordMapper
from sluice.importers.examples import meter_readings
from sluice.schemas.formats import ParsedRow
from sluice.schemas.importers import EmptyCell, Field, Importer, Unpivot
from sluice.schemas.runs import SOURCE_COLUMNS, RunStatus
from sluice.service import Client
from tests.conftest import ROOT, Stack, api_process, finish
from tests.support.cli import sluice

PERIODS = [f"HH{i:02d}" for i in range(1, 49)]
HEADER = ["MPAN", "Date", *PERIODS]
TOKEN = "meters-token"


def _mpan() -> str:
    return str(random.SystemRandom().randrange(10**12, 10**13))


def _readings(seed: int) -> list[str]:
    return [f"{(seed * 7 + i) % 19 / 10:.3f}" for i in range(48)]


def _csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    return out.getvalue()


# ----------------------------------------------------------------------------- the mapper


def _mapper(empty: str) -> RecordMapper:
    importer = Importer(
        slug=f"hh_{empty}",
        table=f"hh_{empty}",
        key=("meter", "day", "period"),
        fields=(Field("meter", "text", aliases=("MPAN",)), Field("day", "date", aliases=("Date",))),
        unpivot=Unpivot(r"HH(\d{2})", index_field="period", value_field="kwh", empty=empty),
    )
    return RecordMapper(importer, ["MPAN", "Date", "HH01", "HH02", "HH03"])


def test_an_empty_period_cell_is_a_null_reading_a_rejected_row_or_a_counted_gap() -> None:
    row = ParsedRow(2, ["m1", "2024-03-01", "1.5", " ", "2.5"])

    null = _mapper("null")
    records, failures = null.map_rows([row])
    assert [(r["period"], r["kwh"]) for r in records] == [(1, 1.5), (2, None), (3, 2.5)]
    assert (failures, null.gaps) == ([], 0)

    reject = _mapper("reject")
    records, failures = reject.map_rows([row])
    assert records == []
    assert [(f.row_number, f.sub) for f in failures] == [(2, 0)]
    assert failures[0].reason.startswith("HH02: empty")
    columns = ["MPAN", "Date", "HH01", "HH02", "HH03"]
    cells = dict(zip(columns, row.values, strict=True))
    assert failures[0].raw == {**cells, SOURCE_COLUMNS: columns}

    gap = _mapper("gap")
    records, failures = gap.map_rows([row])
    assert [r["period"] for r in records] == [1, 3]
    assert (failures, gap.gaps) == ([], 1)

    assert meter_readings.unpivot is not None
    assert meter_readings.unpivot.on_empty is EmptyCell.GAP  # the bundled importer's choice
    assert Unpivot("HH(\\d+)", "p", "v", skip_empty=False).on_empty is EmptyCell.NULL
    with pytest.raises(ValueError, match="'gap', 'null', 'reject'"):
        Unpivot("HH(\\d+)", "p", "v", empty="skip")


def test_a_rejected_wide_row_is_read_again_from_json_as_the_retry_sends_it() -> None:
    mapper = RecordMapper(meter_readings, None)  # a retry file is JSON Lines: no header
    wide = {"MPAN": "m1", "Date": "2024-03-01", "HH01": "0.5", "HH02": "bad", "HH03": ""}
    records, failures = mapper.map_rows([ParsedRow(7, wide)])
    assert records == [] and mapper.gaps == 0  # a rejected row's gaps are not counted
    assert [(f.row_number, f.raw) for f in failures] == [(7, {**wide, SOURCE_COLUMNS: list(wide)})]
    assert failures[0].reason == "HH02: Input should be a valid decimal (got 'bad')"

    fixed = {**wide, "HH02": "0.75"}
    records, failures = mapper.map_rows([ParsedRow(7, fixed)])
    assert failures == [] and mapper.gaps == 1
    assert [(r["period"], str(r["kwh"])) for r in records] == [(1, "0.5"), (2, "0.75")]


# ----------------------------------------------------------------------------- the stack


@pytest.mark.stack
async def test_half_hourly_rejections_are_one_wide_row_each_and_import_again_fixed(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    mpan = _mpan()
    good = [mpan, "2024-02-01", *_readings(1)]
    bad_values = [mpan, "2024-02-02", *_readings(2)]
    bad_values[2 + 8] = "abc"  # HH09
    bad_values[2 + 20] = "12..5"  # HH21
    bad_date = [mpan, "2024-02-30", *_readings(3)]
    gap = [mpan, "2024-02-04", *_readings(4)]
    gap[2 + 4] = ""  # HH05
    path = tmp_path / "half-hourly.csv"
    path.write_text(_csv([good, bad_values, bad_date, gap]))

    done = sluice("run", "meter_readings", "--file", str(path), "--wait", "--json", env=stack.env)
    assert done.returncode == 3, done.stderr  # completed with errors
    run = json.loads(done.stdout)
    assert run["status"] == "completed_with_errors"
    assert (run["failed_rows"], run["created_rows"], run["gaps"]) == (2, 48 + 47, 1)
    assert run["processed_rows"] == run["total_rows"]

    log = await db.fetch(
        "SELECT row_number, sub, reason FROM sluice.row_log WHERE run_id = $1 ORDER BY 1",
        uuid.UUID(run["id"]),
    )
    assert [(r["row_number"], r["sub"]) for r in log] == [(2, 0), (3, 0)]  # data rows, from 1
    values, date = log[0]["reason"], log[1]["reason"]
    assert values.startswith("HH09: Input should be a valid decimal (got 'abc'); HH21: ")
    assert "(got '12..5')" in values and "Date" not in values
    assert date.startswith("Date: Input should be a valid date") and "(got '2024-02-30')" in date
    assert date.count("Date:") == 1 and "HH" not in date  # one issue, not one per period

    summary = sluice("status", run["id"], env=stack.env)
    assert "gaps: 1 empty period cells" in summary.stdout, summary.stdout + summary.stderr

    exported = sluice("failed-rows", run["id"], "--csv", env=stack.env)
    assert exported.returncode == 0, exported.stderr
    lines = list(csv.reader(io.StringIO(exported.stdout)))
    assert lines[0] == ["row_number", "reason", *HEADER]  # the file's own shape
    assert [line[2:] for line in lines[1:]] == [bad_values, bad_date]

    with api_process(stack, tmp_path / "api.log", SLUICE_API_TOKEN=TOKEN) as url:
        answer = httpx.get(
            f"{url}/api/v1/runs/{run['id']}/failed-rows",
            params={"format": "csv"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    assert list(csv.reader(io.StringIO(answer.text))) == lines

    # `sluice retry` sends the rows again as they are: still wide, still rejected the same way.
    child = await finish(client, await client.retry(uuid.UUID(run["id"])), stack)
    assert (child.failed_rows, child.created_rows) == (2, 0), child.error
    again = await client.failed_rows(child.id)
    assert [f.reason for f in again] == [values, date]
    assert [list(f.raw) for f in again] == [HEADER, HEADER]  # in the file's order, as read

    fixed = [lines[0], *lines[1:]]
    fixed[1][lines[0].index("HH09")] = "0.9"
    fixed[1][lines[0].index("HH21")] = "1.2"
    fixed[2][lines[0].index("Date")] = "2024-02-29"
    fixed_path = tmp_path / "fixed.csv"
    with fixed_path.open("w", newline="") as f:
        csv.writer(f).writerows(fixed)
    rerun = sluice(
        "run", "meter_readings", "--file", str(fixed_path), "--wait", "--json", env=stack.env
    )
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    landed = json.loads(rerun.stdout)
    assert (landed["created_rows"], landed["failed_rows"]) == (96, 0)

    days = await db.fetch(
        "SELECT day::text, count(*) AS n FROM meter_readings WHERE meter = $1"
        " GROUP BY 1 ORDER BY 1",
        mpan,
    )
    assert [(d["day"], d["n"]) for d in days] == [
        ("2024-02-01", 48),
        ("2024-02-02", 48),
        ("2024-02-04", 47),  # the gap made no reading
        ("2024-02-29", 48),
    ]
    hh09 = await db.fetchval(
        "SELECT kwh::text FROM meter_readings"
        " WHERE meter = $1 AND day = '2024-02-02' AND period = 9",
        mpan,
    )
    assert hh09 == "0.9"
    assert not await db.fetchval(
        "SELECT count(*) FROM meter_readings"
        " WHERE meter = $1 AND day = '2024-02-04' AND period = 5",
        mpan,
    )


@pytest.mark.stack
async def test_a_file_of_the_wrong_shape_says_what_it_found_and_which_importer_fits(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    daily = ROOT / "sluice" / "samples" / "daily_readings.csv"
    run = await finish(client, await client.submit_file("meter_readings", daily), stack)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert r"the pattern HH(\d{2}) " in run.error  # written as in the importer, not as repr
    assert "The header found was: 'MPAN', 'Date', 'Reading'." in run.error
    assert "Importer 'daily_readings' fits it: sluice run daily_readings --file FILE" in run.error

    half_hourly = tmp_path / "hh.csv"
    half_hourly.write_text(_csv([[_mpan(), "2024-02-01", *_readings(5)]]))
    run = await finish(client, await client.submit_file("daily_readings", half_hourly), stack)
    assert run.status is RunStatus.FAILED and run.error is not None
    assert "no column for 'reading'" in run.error
    assert "Importer 'meter_readings' fits it" in run.error


@pytest.mark.stack
async def test_the_daily_importer_lands_its_sample(
    stack: Stack, client: Client, db: asyncpg.Connection
) -> None:
    sample = ROOT / "sluice" / "samples" / "daily_readings.csv"
    rows = list(csv.DictReader(sample.open()))
    run = await finish(client, await client.submit_file("daily_readings", sample), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.processed_rows == len(rows) and run.gaps == 0
    first = rows[0]
    reading = await db.fetchval(
        "SELECT reading::text FROM daily_readings WHERE meter = $1 AND day = $2::text::date",
        first["MPAN"],
        first["Date"],
    )
    assert reading == first["Reading"]
    meters = {r["MPAN"] for r in rows}
    assert await db.fetchval(
        "SELECT count(*) FROM daily_readings WHERE meter = ANY($1::text[])", list(meters)
    ) == len(rows)
