"""XLSX workbooks and Parquet files: typed cells, sheets, row and file problems, the memory bound
of the Parquet reader, and, on the real stack, the same rows imported from CSV, XLSX and Parquet.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sluice.tabular
from schemas.runs import RunStatus
from sluice.client import Client
from sluice.formats import (
    XLS_REFUSED,
    FileFormatError,
    FormatOptions,
    ParsedFile,
    ParsedRow,
    RowProblem,
    parse_file,
)
from storage.filestore import _Inspector
from tests.conftest import Stack, finish, unique


class _Unseekable(io.RawIOBase):
    """An upload stream that cannot seek."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def workbook(path: Path, *sheets: tuple[str, list[list[Any]]], hidden: str = "") -> Path:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets:
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
        if title == hidden:
            sheet.sheet_state = "hidden"
    book.save(path)
    return path


def parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read(path: Path, **options: Any) -> ParsedFile:
    return parse_file(io.BytesIO(path.read_bytes()), FormatOptions(**options))


def values(parsed: ParsedFile) -> list[Any]:
    out = []
    for row in parsed:
        assert isinstance(row, ParsedRow), row
        out.append(row.values)
    return out


def problems(parsed: ParsedFile) -> list[tuple[int, str]]:
    return [(row.number, row.reason) for row in parsed if isinstance(row, RowProblem)]


# --- XLSX -----------------------------------------------------------------------------------


def test_xlsx_cells_keep_their_types(tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "t.xlsx",
        (
            "Data",
            [
                ["id", " name ", "price", "day", "at", "ok", "opens", "note", None, None],
                [1, "apple", 12.5, dt.date(2024, 1, 5), dt.datetime(2024, 1, 5, 10, 30), True],
                [2.0, "  pear ", 3, dt.datetime(2024, 2, 1), dt.datetime(2024, 2, 1), False],
                [3, "fig", None, None, None, None, dt.time(8, 15), "x"],
            ],
        ),
    )
    parsed = read(path)
    assert parsed.sniffed.format == "xlsx" and parsed.sniffed.sheet == "Data"
    assert parsed.sniffed.encoding is None and parsed.sniffed.delimiter is None
    # Names are stripped, trailing empty header cells dropped.
    assert parsed.header == ["id", "name", "price", "day", "at", "ok", "opens", "note"]
    assert values(parsed) == [
        [1, "apple", 12.5, dt.date(2024, 1, 5), dt.datetime(2024, 1, 5, 10, 30), True, None, None],
        # 2.0 is an int; a date and time at midnight is a date; strings keep their spaces.
        [2, "  pear ", 3, dt.date(2024, 2, 1), dt.date(2024, 2, 1), False, None, None],
        [3, "fig", None, None, None, None, dt.time(8, 15), "x"],
    ]
    assert parsed.bytes_read == path.stat().st_size


def test_xlsx_empty_rows_are_skipped_and_not_counted(tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "t.xlsx",
        (
            "S",
            [[], [None, "  "], ["id", "name"], [1, "a"], [], [None, None], [" ", None], [2, "b"]],
        ),
    )
    parsed = read(path)
    assert parsed.header == ["id", "name"]
    assert [(row.number, row.values) for row in parsed] == [(1, [1, "a"]), (2, [2, "b"])]


def test_xlsx_sheet_by_name_and_the_first_visible_one(tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "t.xlsx",
        ("Lookup", [["code"], ["x"]]),
        ("Prices", [["sku", "price"], ["a", 1]]),
        ("Stock", [["sku", "qty"], ["a", 7]]),
        hidden="Lookup",
    )
    first = read(path)
    assert first.sniffed.sheet == "Prices" and values(first) == [["a", 1]]
    named = read(path, sheet="Stock")
    assert named.sniffed.sheet == "Stock" and named.header == ["sku", "qty"]
    assert values(named) == [["a", 7]]
    assert read(path, sheet="Lookup").header == ["code"]  # hidden, but asked for by name

    with pytest.raises(FileFormatError) as info:
        read(path, sheet="Stocks")
    assert str(info.value) == (
        "the workbook has no sheet named 'Stocks'; its sheets are: 'Lookup', 'Prices', 'Stock'. "
        "Set the sheet option to one of them (the name as Excel shows it on the tab)"
    )


def test_xlsx_error_cells_and_extra_cells_are_row_problems(tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "t.xlsx",
        (
            "Data",
            [
                ["id", "price", "qty"],
                [1, "#DIV/0!", 2],
                [2, 3.5, "#N/A"],
                [3, 1, 1, None, "stray"],
                [4, 2],
                [5, 2, 2, "  "],  # a blank cell past the header is no problem
            ],
        ),
    )
    parsed = read(path)
    rows = list(parsed)
    assert [row.number for row in rows] == [1, 2, 3, 4, 5]
    assert [type(row) for row in rows] == [RowProblem, RowProblem, RowProblem, ParsedRow, ParsedRow]
    assert rows[0].reason == (  # type: ignore[union-attr]
        "column 'price' holds the Excel error #DIV/0!; fix the formula or clear the cell "
        "(B2 on sheet 'Data')"
    )
    assert "column 'qty' holds the Excel error #N/A" in rows[1].reason  # type: ignore[union-attr]
    assert rows[2].reason.startswith(  # type: ignore[union-attr]
        "expected 3 fields as in the header, found 5 (row 4 of sheet 'Data': cell E4"
    )
    assert rows[3].values == [4, 2, None]  # type: ignore[union-attr]
    assert rows[4].values == [5, 2, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "sheet 'S' of the workbook is empty: it has no header row"),
        ([[None], [None, None]], "sheet 'S' of the workbook is empty"),
        (
            [["id", None, "name", "", "x"]],
            "the header row (row 1 of sheet 'S') has columns without a name: column B, D. "
            "Name every column, or delete the empty ones",
        ),
        (
            [[], ["id", "name", "ID ", "name"]],
            "the header row (row 2 of sheet 'S') names a column more than once: 'name' "
            "(columns B, D). Rename the columns so each name is unique",
        ),
    ],
    ids=["no-rows", "blank-rows", "empty-names", "duplicates"],
)
def test_xlsx_header_problems(tmp_path: Path, rows: list[list[Any]], message: str) -> None:
    path = workbook(tmp_path / "t.xlsx", ("S", rows))
    with pytest.raises(FileFormatError) as info:
        read(path)
    assert message in str(info.value)


def test_xlsx_rows_past_a_wrong_dimension_tag_are_read(tmp_path: Path) -> None:
    """Tools other than Excel write a <dimension> that does not cover the data."""
    path = workbook(tmp_path / "t.xlsx", ("S", [["id", "name"], [1, "a"], [2, "b", "extra"]]))
    fixed = tmp_path / "wrong.xlsx"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(fixed, "w") as archive:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename == "xl/worksheets/sheet1.xml":
                assert b'<dimension ref="A1:C3" />' in data
                data = data.replace(b'<dimension ref="A1:C3" />', b'<dimension ref="A1:A1" />')
            archive.writestr(entry, data)
    rows = list(read(fixed))
    assert [row.number for row in rows] == [1, 2]
    assert rows[0].values == [1, "a"]  # type: ignore[union-attr]
    assert isinstance(rows[1], RowProblem) and "found 3" in rows[1].reason


def test_xlsx_header_names_from_numbers_and_dates(tmp_path: Path) -> None:
    path = workbook(tmp_path / "t.xlsx", ("S", [["sku", 2023, 2024.0, dt.date(2025, 1, 1)]]))
    assert read(path).header == ["sku", "2023", "2024", "2025-01-01"]


@pytest.mark.parametrize(
    "data",
    [
        b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xa8\x91",
        b"PK\x03\x04" + bytes(2000),
    ],
    ids=["cut-short", "zeros"],
)
def test_a_corrupt_workbook_says_to_save_it_again(data: bytes) -> None:
    with pytest.raises(FileFormatError) as info:
        parse_file(io.BytesIO(data))
    message = str(info.value)
    assert message.startswith("the file cannot be read as an XLSX workbook (")
    assert "save it again as .xlsx" in message


def test_a_zip_that_is_not_a_workbook(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.csv", "id,name\n1,a\n")
    with pytest.raises(FileFormatError, match="cannot be read as an XLSX workbook"):
        read(path)


def test_an_xls_file_is_refused_with_a_fix() -> None:
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)
    for options in (FormatOptions(), FormatOptions(format="csv")):
        with pytest.raises(FileFormatError) as info:
            parse_file(io.BytesIO(ole), options)
        assert str(info.value) == XLS_REFUSED
        assert "save it as .xlsx or CSV" in str(info.value)


def test_a_workbook_that_unpacks_past_the_limits_is_refused(tmp_path: Path) -> None:
    path = workbook(tmp_path / "t.xlsx", ("S", [["id"], [1]]))
    with pytest.raises(FileFormatError, match="decompresses to more than 1000 bytes"):
        read(path, max_decompressed_bytes=1000)

    bomb = tmp_path / "bomb.xlsx"
    with (
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        for entry in source.infolist():
            archive.writestr(entry, source.read(entry))
        with archive.open("xl/padding.bin", "w") as padding:
            for _ in range(130):
                padding.write(bytes(2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(FileFormatError) as info:
        read(bomb)
    assert "compression bomb" in str(info.value) and "500:1" in str(info.value)
    assert "Save the data as CSV" in str(info.value)


def test_the_format_option_must_match_the_file(tmp_path: Path) -> None:
    book = workbook(tmp_path / "t.xlsx", ("S", [["id"], [1]]))
    with pytest.raises(FileFormatError) as info:
        read(book, format="csv")
    assert "the file is an XLSX workbook, but this import reads csv" in str(info.value)
    assert values(read(book, format="xlsx")) == [[1]]
    with pytest.raises(FileFormatError, match="format is set to 'xlsx' but the file is not"):
        parse_file(io.BytesIO(b"id\n1\n"), FormatOptions(format="xlsx"))
    with pytest.raises(FileFormatError, match="format is set to 'parquet' but the file is not"):
        read(book, format="parquet")
    with pytest.raises(ValueError, match="'xlsx' or 'parquet'"):
        FormatOptions(format="xls")  # type: ignore[arg-type]


def test_a_stream_that_cannot_seek_is_spooled(tmp_path: Path) -> None:
    book = workbook(tmp_path / "t.xlsx", ("S", [["id", "name"], [1, "a"]]))
    parsed = parse_file(io.BufferedReader(_Unseekable(book.read_bytes())))
    assert values(parsed) == [[1, "a"]]
    table = pa.table({"id": [1, 2]})
    data = parquet(tmp_path / "t.parquet", table).read_bytes()
    assert values(parse_file(io.BufferedReader(_Unseekable(data)))) == [[1], [2]]
    # Text read from a stream still starts at its first byte.
    assert values(parse_file(io.BufferedReader(_Unseekable(b"id,name\n1,a\n")))) == [["1", "a"]]


# --- Parquet --------------------------------------------------------------------------------


def test_parquet_values_keep_their_types(tmp_path: Path) -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "ratio": [0.5, None],
            "price": pa.array([Decimal("12.30"), Decimal("-1.05")], pa.decimal128(10, 2)),
            "name": ["apple", None],
            "ok": [True, False],
            "day": pa.array([dt.date(2024, 1, 5), None], pa.date32()),
            "at": pa.array([dt.datetime(2024, 1, 5, 10, 30), None], pa.timestamp("us")),
            "aware": pa.array(
                [dt.datetime(2024, 1, 5, 10, 30, tzinfo=paris), None], pa.timestamp("us", "UTC")
            ),
            "nanos": pa.array([1_700_000_000_123_456_789, None], pa.timestamp("ns")),
            "tags": [["a", "b"], []],
            "dims": [{"w": 1, "h": 2}, None],
            "took": pa.array([dt.timedelta(hours=26, seconds=1), None], pa.duration("s")),
        }
    )
    parsed = read(parquet(tmp_path / "t.parquet", table))
    assert parsed.sniffed.format == "parquet" and parsed.sniffed.encoding is None
    assert parsed.header == table.column_names
    first, second = values(parsed)
    assert first[:6] == [1, 0.5, Decimal("12.30"), "apple", True, dt.date(2024, 1, 5)]
    assert first[6] == dt.datetime(2024, 1, 5, 10, 30) and first[6].tzinfo is None
    assert first[7] == dt.datetime(2024, 1, 5, 9, 30, tzinfo=dt.UTC)  # aware, same instant
    assert first[7].tzinfo is not None
    assert first[8] == dt.datetime(2023, 11, 14, 22, 13, 20, 123456)  # cut to microseconds
    assert first[9:] == [["a", "b"], {"w": 1, "h": 2}, "26:00:01"]
    assert second == [
        2,
        None,
        Decimal("-1.05"),
        None,
        False,
        None,
        None,
        None,
        None,
        [],
        None,
        None,
    ]


def test_parquet_row_groups_are_read_in_order(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(1, 1001)), "name": [f"n{i}" for i in range(1, 1001)]})
    path = parquet(tmp_path / "t.parquet", table, row_group_size=100)
    assert pq.ParquetFile(path).num_row_groups == 10
    parsed = read(path)
    seen, progress = [], []
    for row in parsed:
        assert isinstance(row, ParsedRow)
        seen.append(row.values)
        progress.append(parsed.bytes_read)
    assert seen == [[i, f"n{i}"] for i in range(1, 1001)]
    assert [row for row in seen[:2]] == [[1, "n1"], [2, "n2"]]
    assert progress == sorted(progress) and progress[0] < progress[-1]
    assert parsed.bytes_read == path.stat().st_size


def test_parquet_bytes_are_text_or_a_row_problem(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": [1, 2, 3],
            "raw": pa.array([b"caf\xc3\xa9", b"\x89PNG", None], pa.binary()),
            "parts": pa.array([[b"a"], [b"b"], [b"\xff"]], pa.list_(pa.large_binary())),
        }
    )
    rows = list(read(parquet(tmp_path / "t.parquet", table)))
    assert isinstance(rows[0], ParsedRow) and rows[0].values == [1, "café", ["a"]]
    assert isinstance(rows[1], RowProblem) and rows[1].number == 2
    assert rows[1].reason.startswith(
        "column 'raw' holds binary data that is not UTF-8 text (byte 0x89 at offset 0)"
    )
    assert isinstance(rows[2], RowProblem)
    assert rows[2].reason.startswith("column 'parts' holds binary data that is not UTF-8 text")


def test_a_parquet_date_python_cannot_hold_rejects_only_its_row(tmp_path: Path) -> None:
    days = [19000, 3_000_000, 19001]  # the middle one is in the year 10183
    table = pa.table({"id": [1, 2, 3], "day": pa.array(days, pa.date32())})
    rows = list(read(parquet(tmp_path / "t.parquet", table)))
    assert [type(r) for r in rows] == [ParsedRow, RowProblem, ParsedRow]
    assert isinstance(rows[1], RowProblem) and rows[1].number == 2
    assert rows[1].reason.startswith("column 'day' holds a value Python cannot represent")
    assert isinstance(rows[2], ParsedRow) and rows[2].values[0] == 3


def test_text_that_starts_with_par1_is_read_as_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"PAR1_ID,name\n1,a\n2,b\n")
    parsed = read(path)
    assert parsed.sniffed.format == "csv" and parsed.header == ["PAR1_ID", "name"]
    assert values(parsed) == [["1", "a"], ["2", "b"]]


def test_parquet_schema_problems(tmp_path: Path) -> None:
    duplicated = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["id", "id"])
    with pytest.raises(FileFormatError) as info:
        read(parquet(tmp_path / "dup.parquet", duplicated))
    assert str(info.value).startswith(
        "the header row (the Parquet file's schema) names a column more than once: 'id' "
        "(columns 1, 2)"
    )
    unnamed = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["id", ""])
    with pytest.raises(FileFormatError, match="columns without a name: column 2 of 2"):
        read(parquet(tmp_path / "unnamed.parquet", unnamed))


def test_a_damaged_parquet_file(tmp_path: Path) -> None:
    data = parquet(tmp_path / "t.parquet", pa.table({"id": [1, 2]})).read_bytes()
    for damaged in (b"PAR1" + bytes(100), data[: len(data) // 2]):
        with pytest.raises(FileFormatError) as info:
            parse_file(io.BytesIO(damaged))
        assert str(info.value).startswith("the file cannot be read as Parquet (")


def test_parquet_without_pyarrow_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = parquet(tmp_path / "t.parquet", pa.table({"id": [1]}))
    # None in sys.modules makes `import pyarrow` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FileFormatError) as info:
        read(path)
    assert str(info.value) == (
        "the file is a Parquet file, and reading Parquet needs the optional extra: "
        "pip install 'sluice[parquet]'"
    )


def test_the_parquet_reader_holds_one_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are pulled as the rows are consumed: never the whole file, never more than the
    one batch being handed out."""
    path = parquet(tmp_path / "t.parquet", pa.table({"id": list(range(1000))}))
    monkeypatch.setattr(sluice.tabular, "PARQUET_BATCH_ROWS", 10)
    pulled: list[int] = []
    original = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        assert kwargs["batch_size"] == 10
        for batch in original(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    rows = iter(read(path))
    assert pulled == []  # nothing decoded before the first row is asked for
    for expected in range(25):
        row = next(rows)
        assert isinstance(row, ParsedRow) and row.values == [expected]
        assert len(pulled) == expected // 10 + 1 and max(pulled) <= 10


# --- the upload inspector -------------------------------------------------------------------


def _inspect(data: bytes, chunk: int = 3) -> _Inspector:
    inspector = _Inspector(2**30, 500)
    for start in range(0, len(data), chunk):
        inspector.feed(data[start : start + chunk])
    return inspector


def test_the_inspector_does_not_sniff_workbooks_or_parquet(tmp_path: Path) -> None:
    book = workbook(tmp_path / "t.xlsx", ("S", [["id"], [1]])).read_bytes()
    table = parquet(tmp_path / "t.parquet", pa.table({"id": [1]})).read_bytes()
    for data, binary in ((book, "xlsx"), (table, "parquet")):
        inspector = _inspect(data)
        assert inspector.encoding() is None and inspector.error is None
        assert inspector.binary == binary and inspector.compression == "none"
    xls = _inspect(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100))
    assert xls.encoding() is None and xls.error == XLS_REFUSED
    text = _inspect(b"id\n1\n")
    assert text.encoding() == "utf-8" and text.binary is None
    short = _inspect(b"PK")  # shorter than any signature: text
    assert short.encoding() == "utf-8" and short.binary is None


# --- the real stack -------------------------------------------------------------------------

COLUMNS = ["id", "name", "code", "qty", "price", "day", "active", "seen_at"]


def _typed_rows() -> list[list[Any]]:
    rows = []
    for i in range(1, 51):
        rows.append(
            [
                i,
                "Café crème" if i == 7 else f"item {i}",
                1200 + i,  # a number in a text column
                None if i % 7 == 0 else i * 3,
                Decimal(i * 125) / 100,
                dt.date(2024, 1, 1) + dt.timedelta(days=i),
                None if i == 10 else i % 2 == 0,
                # Row 15 is at midnight: the workbook reads it as a date.
                dt.datetime(2024, 1, 1, 9, 0) + dt.timedelta(hours=i, minutes=i % 3 * 15),
            ]
        )
    return rows


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _write_all(tmp_path: Path) -> tuple[Path, Path, Path]:
    rows = _typed_rows()
    csv = tmp_path / "typed.csv"
    csv.write_text(
        "\n".join([",".join(COLUMNS), *(",".join(map(_csv_cell, r)) for r in rows)]) + "\n"
    )
    xlsx = workbook(
        tmp_path / "typed.xlsx",
        (
            "Data",
            [COLUMNS, *([float(v) if isinstance(v, Decimal) else v for v in r] for r in rows)],
        ),
    )
    columns = list(zip(*rows, strict=True))
    table = pa.table(
        {
            "id": pa.array(columns[0], pa.int32()),
            "name": pa.array(columns[1], pa.string()),
            "code": pa.array(columns[2], pa.int64()),
            "qty": pa.array(columns[3], pa.int64()),
            "price": pa.array(columns[4], pa.decimal128(10, 2)),
            "day": pa.array(columns[5], pa.date32()),
            "active": pa.array(columns[6], pa.bool_()),
            "seen_at": pa.array(columns[7], pa.timestamp("us")),
        }
    )
    return csv, xlsx, parquet(tmp_path / "typed.parquet", table, row_group_size=20)


@pytest.mark.stack
async def test_the_same_rows_from_csv_xlsx_and_parquet_land_the_same(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    csv, xlsx, table = _write_all(tmp_path)
    tables = {"t_typed_csv": csv, "t_typed_xlsx": xlsx, "t_typed_parquet": table}
    for importer, path in tables.items():
        done = await finish(client, await client.submit_file(importer, path), stack)
        assert done.status is RunStatus.COMPLETED, (importer, done.error)
        assert done.created_rows == 50 and done.failed_rows == 0, importer
    contents = [
        [dict(r) for r in await db.fetch(f"SELECT * FROM {name} ORDER BY id")] for name in tables
    ]
    assert contents[0] == contents[1] == contents[2]
    assert contents[0][6]["name"] == "Café crème" and contents[0][0]["code"] == "1201"
    midnight = contents[0][14]["seen_at"]
    assert (midnight.hour, midnight.minute) == (0, 0)  # a timestamp again, not a date
    assert contents[0][6]["qty"] is None and contents[0][9]["active"] is None

    done = await finish(client, await client.submit_file("t_typed_xlsx", xlsx), stack)
    assert done.provenance is not None
    assert done.provenance["format"] == "xlsx" and done.provenance.get("sheet") == "Data"
    assert done.provenance["encoding"] is None and done.unchanged_rows == 50


@pytest.mark.stack
async def test_an_adhoc_import_types_a_workbook_like_its_csv(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    csv, xlsx, table = _write_all(tmp_path)
    types = []
    for path in (csv, xlsx, table):
        name = unique("t_adhoc_" + path.suffix[1:])
        run = await client.submit_file("adhoc", path, options={"table": name, "key": ["id"]})
        done = await finish(client, run, stack)
        assert done.status is RunStatus.COMPLETED, (path.name, done.error)
        assert done.created_rows == 50, path.name
        rows = await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            name,
        )
        types.append({r["column_name"]: r["data_type"] for r in rows})
    assert types[0] == types[1] == types[2], types
    assert types[0]["day"] == "date" and types[0]["active"] == "boolean"
