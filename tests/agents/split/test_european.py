"""Numbers and dates as Europe and the UK write them: decimal commas, '.' between thousands,
day-first dates. Declared on a field or an importer, given with a run (--date-format,
--decimal-comma, the upload form's fields), or inferred by an ad-hoc import from evidence."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from sluice.agents.split.infer import adhoc_importer, infer_column, infer_fields
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.read import RunReading
from sluice.schemas.formats import ParsedRow
from sluice.schemas.importers import Field, Importer
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish
from tests.support.cli import sluice
from tests.support.importers import euro_prices, plain_prices

HEADER = ["Artikel", "Preis", "Seit", "born"]


def rows(*values: list[str]) -> list[ParsedRow]:
    return [ParsedRow(i, v) for i, v in enumerate(values, start=1)]


def test_a_field_reads_decimal_commas_and_its_date_formats_in_order() -> None:
    mapper = RecordMapper(euro_prices, HEADER)
    records, failures = mapper.map_rows(
        rows(
            ["A-1", "24,32", "10.03.2024", "2024-03-01"],
            ["A-2", "1.234,5", "25/03/2024", ""],
            ["A-3", "-0,5", "2024-03-10", ""],  # ISO is always read
        )
    )
    assert failures == []
    assert [(r["price"], r["since"]) for r in records] == [
        (Decimal("24.32"), date(2024, 3, 10)),
        (Decimal("1234.5"), date(2024, 3, 25)),
        (Decimal("-0.5"), date(2024, 3, 10)),
    ]
    assert records[0]["born"] == date(2024, 3, 1)
    assert {c: r.by for c, r in mapper.readings.items()} == {"price": "importer", "since": "field"}


def test_a_value_that_fits_no_reading_is_rejected_with_what_was_tried_and_kept_as_it_was() -> None:
    mapper = RecordMapper(euro_prices, HEADER)
    records, failures = mapper.map_rows(
        rows(
            ["B-1", "24,32", "31.13.2024", ""],  # no month 13
            ["B-2", "1.5", "10.03.2024", ""],  # a '.' where the decimal is ','
            ["B-3", "12.34.5", "10.03.2024", ""],  # '.' not grouping thousands
            ["B-4", "7,5", "10.03.2024", "10.03.2024"],  # born has no format: ISO only
        )
    )
    assert records == []
    reasons = {f.row_number: f.reason for f in failures}
    assert reasons[1] == (
        "since: not a date in any of the formats tried: %d.%m.%Y, %d/%m/%Y (or ISO 8601,"
        " YYYY-MM-DD) (got '31.13.2024')"
    )
    assert reasons[2] == (
        "price: not a number written with decimal ',', thousands '.': the '.' must group the"
        " digits by three (got '1.5')"
    )
    assert "group the digits by three" in reasons[3]
    assert reasons[4].startswith("born: ") and "'10.03.2024'" in reasons[4]
    # The row log keeps the values as the file wrote them, so a retry reads them again.
    kept = {f.row_number: f.raw for f in failures}
    assert (
        kept[1]["price"] == "24,32"
        and kept[4]["price"] == "7,5"
        and kept[4]["since"] == "10.03.2024"
    )


def test_a_decimal_comma_without_thousands_refuses_a_point() -> None:
    comma = Importer(
        slug="c", table="c", key=("k",), fields=(Field("k"), Field("n", "double", decimal=","))
    )
    records, failures = RecordMapper(comma, ["k", "n"]).map_rows(rows(["a", "0,5"], ["b", "1.5"]))
    assert [r["n"] for r in records] == [0.5]
    assert failures[0].reason == (
        "n: not a number written with decimal ',': it has a '.'; fix the value or the field's"
        " separators (got '1.5')"
    )


def test_the_run_reading_is_the_default_and_a_field_keeps_its_own() -> None:
    run = RunReading(date_formats=("%m/%d/%Y",), decimal_comma=True)
    mapper = RecordMapper(run.apply(plain_prices), ["sku", "price", "since"])
    records, failures = mapper.map_rows(rows(["C-1", "1.000,25", "03/25/2024"]))
    assert failures == [] and records[0]["price"] == Decimal("1000.25")
    assert records[0]["since"] == date(2024, 3, 25)
    assert {r.by for r in mapper.readings.values()} == {"importer"}  # the run's, as defaults
    # The importer's field formats stay; the run's decimal comma replaces nothing it declares.
    own = RecordMapper(run.apply(euro_prices), HEADER)
    records, failures = own.map_rows(rows(["C-2", "3,5", "25.03.2024", "03/25/2024"]))
    assert failures == [] and records[0]["since"] == date(2024, 3, 25)
    assert records[0]["born"] == date(2024, 3, 25)  # born takes the run's format


def test_readings_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ValueError, match="names the day, month and year"):
        Field("d", "date", date_format="%d.%m")
    with pytest.raises(ValueError, match="for date and timestamptz fields"):
        Field("d", "text", date_format="%d.%m.%Y")
    with pytest.raises(ValueError, match="for number fields"):
        Field("n", "date", decimal=",")
    with pytest.raises(ValueError, match="both ','"):
        Field("n", "numeric", decimal=",", thousands=",")
    with pytest.raises(ValueError, match="names the day"):
        Importer(slug="x", table="x", key=("a",), fields=(Field("a"),), date_format="%Y")
    with pytest.raises(ValueError, match="--date-format"):
        RunReading.of({"date_formats": ["%H:%M"]})


@pytest.mark.parametrize(
    ("values", "type_", "evidence"),
    [
        (["24,32", "1.234,50", "3"], "numeric", "'24,32' has a decimal comma"),
        (["25.03.2024", "10.03.2024"], "date", "'25.03.2024' has the day first"),
        (["03/25/2024", "03/10/2024"], "date", "'03/25/2024' has the month first"),
        (["25/03/2024", "03/25/2024"], "text", "is day first but '03/25/2024' month first"),
        (["10/03/2024", "03/11/2024"], "text", "(--date-format, date_format in the API): %d/%m/%Y"),
        (["1,234", "2,500"], "text", None),  # English thousands or a decimal comma: unknown
        (["1.5", "2"], "numeric", None),
        (["2024-03-10"], "date", None),
    ],
)
def test_inference_reads_european_numbers_and_dates_by_evidence(
    values: list[str], type_: str, evidence: str | None
) -> None:
    found, reading = infer_column(values)
    assert found == type_
    if evidence is None:
        assert reading is None
    else:
        assert reading is not None and evidence in reading.why


def test_inference_takes_the_run_setting_or_the_semicolons_where_evidence_is_missing() -> None:
    ambiguous = ["10/03/2024", "03/11/2024"]
    found, reading = infer_column(ambiguous, run=RunReading(date_formats=("%d/%m/%Y",)))
    assert found == "date" and reading is not None and reading.by == "run"
    assert reading.formats == ("%d/%m/%Y",)
    assert infer_column(["1,234", "2,500"], semicolons=True)[0] == "numeric"
    found, reading = infer_column(["1.234", "7"], run=RunReading(decimal_comma=True))
    assert found == "numeric" and reading is not None and "--decimal-comma" in reading.why


def test_an_adhoc_import_reads_its_inferred_readings_on_the_copy_path() -> None:
    header = ["SKU", "Preis", "Seit"]
    sample = [["A", "24,32", "25.03.2024"], ["B", "1.234,5", "01.02.2024"]]
    fields = infer_fields(header, sample, semicolons=True)
    assert [(f.name, f.type) for f in fields] == [
        ("sku", "text"),
        ("preis", "numeric"),
        ("seit", "date"),
    ]
    mapper = RecordMapper(adhoc_importer("shop", ["SKU"], fields), header)
    assert mapper.text_names() is not None
    out, failures = mapper.map_text(rows(*sample, ["C", "2,5", "30.02.2024"]))
    assert [cells[2:] for cells in out] == [
        ["A", "24.32", "2024-03-25"],
        ["B", "1234.5", "2024-02-01"],
    ]
    assert len(failures) == 1 and failures[0].raw == {
        "sku": "C",
        "preis": "2,5",
        "seit": "30.02.2024",
    }
    assert "seit: not a date in any of the formats tried: %d.%m.%Y" in failures[0].reason


# ---------------------------------------------------------------- on the real stack

# As Excel saves it in Germany: semicolons, Windows-1252.
GERMAN = (
    "Artikel;Bezeichnung;Preis;Seit;born\n"
    "A-1;Käse;24,32;10.03.2024;2024-01-01\n"
    "A-2;Bügeleisen;1.234,50;25/03/2024;\n"
    "A-3;Öl;abc;11.03.2024;\n"
).encode("cp1252")


@pytest.mark.stack
async def test_an_importer_with_readings_imports_a_german_file(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "preise.csv"
    path.write_bytes(GERMAN)
    done = await finish(client, await client.submit_file("t_euro", path), stack)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert done.provenance is not None and done.provenance["encoding"] == "cp1252"
    assert (done.created_rows, done.failed_rows) == (2, 1)
    got = await db.fetch("SELECT sku, price, since FROM t_euro WHERE sku LIKE 'A-%' ORDER BY 1")
    assert [tuple(r) for r in got] == [
        ("A-1", Decimal("24.32"), date(2024, 3, 10)),
        ("A-2", Decimal("1234.50"), date(2024, 3, 25)),
    ]
    failed = await client.failed_rows(done.id)
    assert [(f.row_number, f.raw["price"]) for f in failed] == [(3, "abc")]
    assert done.provenance is not None
    readings = {r["column"]: r for r in done.provenance["readings"]}
    assert readings["since"]["date_format"] == ["%d.%m.%Y", "%d/%m/%Y"]
    assert readings["price"] == {
        "column": "price",
        "by": "importer",
        "decimal": ",",
        "thousands": ".",
    }


@pytest.mark.stack
def test_sluice_run_takes_the_runs_date_format_and_decimal_comma(
    stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    path.write_text("sku;price;since\nR-1;3,25;03/25/2024\nR-2;1.000;04/01/2024\n")
    ran = sluice(
        "run", "t_euro_plain", "--file", str(path), "--date-format", "%m/%d/%Y",
        "--decimal-comma", "--wait", "--json", env=stack.env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    run = json.loads(ran.stdout)
    assert (run["status"], run["created_rows"], run["failed_rows"]) == ("completed", 2, 0)
    bad = sluice(
        "run", "t_euro_plain", "--file", str(path), "--date-format", "%d.%m", env=stack.env
    )
    assert bad.returncode == 2 and "names the day, month and year" in bad.stderr


@pytest.mark.stack
async def test_an_import_without_an_importer_infers_decimal_commas_and_day_first_dates(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "laden.csv"
    path.write_bytes(
        (
            "SKU;Preis;Seit;Geprüft\n"
            "L-1;24,32;25.03.2024;10/03/2024\n"
            "L-2;1.234,5;01.02.2024;03/11/2024\n"
            "L-3;0,99;30.02.2024;01/01/2024\n"
        ).encode("cp1252")
    )
    options = {"table": "t_euro_adhoc", "key": ["SKU"]}
    done = await finish(client, await client.submit_file("adhoc", path, options=options), stack)
    assert done.status is RunStatus.COMPLETED_WITH_ERRORS, done.error
    assert (done.created_rows, done.failed_rows) == (2, 1)
    types = dict(
        await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 't_euro_adhoc'"
        )
    )
    assert (types["preis"], types["seit"]) == ("numeric", "date")
    assert types[next(c for c in types if c.startswith("gepr"))] == "text"
    got = await db.fetch("SELECT sku, preis, seit FROM t_euro_adhoc ORDER BY 1")
    assert [tuple(r) for r in got] == [
        ("L-1", Decimal("24.32"), date(2024, 3, 25)),
        ("L-2", Decimal("1234.5"), date(2024, 2, 1)),
    ]
    failed = await client.failed_rows(done.id)
    assert [(f.row_number, f.raw["seit"]) for f in failed] == [(3, "30.02.2024")]
    assert done.provenance is not None
    readings = {r["column"]: r for r in done.provenance["readings"]}
    assert readings["preis"]["by"] == "inferred" and "decimal comma" in readings["preis"]["why"]
    assert readings["seit"]["date_format"] == ["%d.%m.%Y"]
    ambiguous = next(r for c, r in readings.items() if c.startswith("gepr"))
    assert "date_format" not in ambiguous and "--date-format" in ambiguous["why"]
