"""XLSX workbooks and Parquet files: typed cells, sheets, row and file problems, the memory bound
of the Parquet reader, and, on the real stack, the same rows imported from CSV, XLSX and Parquet.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
import warnings
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl.chart import BarChart
from openpyxl.utils.datetime import CALENDAR_MAC_1904, CALENDAR_WINDOWS_1900

import sluice.agents.split.parse.parquet
import sluice.agents.split.parse.xlsx
from sluice.agents.split.parse import ParsedFile, parse_file
from sluice.agents.split.parse.inspect import Inspector
from sluice.agents.split.parse.sniff import XLS_REFUSED
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish, unique
from tests.support.parsed import values
from tests.support.unseekable import Unseekable


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
    data = path.read_bytes()
    if path.suffix == ".xlsx":  # every workbook the tests read reads the same as with openpyxl
        assert_reader_agrees(data)
    return parse_file(io.BytesIO(data), FormatOptions(**options))


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


def test_a_zip_of_data_files_says_to_unzip_it(tmp_path: Path) -> None:
    """It used to be called a damaged workbook, to be saved again as .xlsx."""
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.csv", "id,name\n1,a\n")
        archive.writestr("__MACOSX/._data.csv", b"\x00\x05")
    with pytest.raises(FileFormatError) as info:
        read(path)
    assert str(info.value) == "this is a ZIP archive of data.csv: unzip it and import the file"
    # The same whatever format the import asks for.
    with path.open("rb") as raw, pytest.raises(FileFormatError) as info:
        parse_file(raw, FormatOptions(format="csv"))
    assert str(info.value) == "this is a ZIP archive of data.csv: unzip it and import the file"

    several = tmp_path / "several.zip"
    with zipfile.ZipFile(several, "w") as archive:
        for i in range(7):
            archive.writestr(f"part-{i}.json", "[]")
    with pytest.raises(FileFormatError) as info:
        read(several)
    assert str(info.value) == (
        "this is a ZIP archive of part-0.json, part-1.json, part-2.json, part-3.json, "
        "part-4.json and 2 more: unzip it and import each file on its own"
    )

    # An Office document that is not a workbook is still said to be one.
    docx = tmp_path / "letter.docx"
    with zipfile.ZipFile(docx, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<document/>")
    with pytest.raises(FileFormatError, match="cannot be read as an XLSX workbook"):
        read(docx)


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
    parsed = parse_file(io.BufferedReader(Unseekable(book.read_bytes())))
    assert values(parsed) == [[1, "a"]]
    table = pa.table({"id": [1, 2]})
    data = parquet(tmp_path / "t.parquet", table).read_bytes()
    assert values(parse_file(io.BufferedReader(Unseekable(data)))) == [[1], [2]]
    # Text read from a stream still starts at its first byte.
    assert values(parse_file(io.BufferedReader(Unseekable(b"id,name\n1,a\n")))) == [["1", "a"]]


# --- the XLSX reader against openpyxl ---------------------------------------------------------

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_STRINGS_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"


def _typed(values: Any) -> list[tuple[type, Any]]:
    """Values with their types: 1 == 1.0 == True, and a date equals no datetime."""
    return [(type(value), value) for value in values]


def _openpyxl_rows(sheet: Any) -> tuple[list[Any], Exception | None]:
    """The rows openpyxl's read-only sheet gives, as the XLSX reader did before it had its
    own: numbered from 1, the empty ones left out, with the indexes of error cells."""
    rows: list[Any] = []
    sheet.reset_dimensions()
    try:
        with warnings.catch_warnings(action="ignore"):
            for number, cells in enumerate(sheet.iter_rows(), 1):
                if cells:
                    values = _typed(cell.value for cell in cells)
                    errors = [i for i, cell in enumerate(cells) if cell.data_type == "e"]
                    rows.append((number, values, errors))
    except Exception as exc:
        return rows, exc
    return rows, None


def _failure(exc: Exception | None) -> tuple[Any, str]:
    return type(exc), str(exc)


def _reader_rows(book: Any, sheet: Any, chunk: int) -> tuple[list[Any], Exception | None]:
    rows: list[Any] = []
    try:
        values = sluice.agents.split.parse.xlsx._sheet_values(
            book._archive,
            sheet._worksheet_path,
            sheet._shared_strings,
            book._date_formats,
            book._timedelta_formats,
            book.epoch,
            chunk,
        )
        for number, cells, errors in values:
            rows.append((number, _typed(cells), errors))
    except Exception as exc:
        return rows, exc
    return rows, None


def assert_reader_agrees(
    data: bytes,
    chunks: tuple[int, ...] = (sluice.agents.split.parse.xlsx._SHEET_CHUNK, 1, 7, 100),
) -> int:
    """Every worksheet of the workbook in `data` reads the same with the XLSX reader, parsing
    `chunks` bytes at a time, as with openpyxl's read-only rows: the same rows, numbers, values
    and types, error cells; if openpyxl fails part way, the same rows before and the same
    error. Returns the rows compared."""
    with warnings.catch_warnings(action="ignore"):
        try:
            book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        except Exception:
            with pytest.raises(Exception):  # noqa: B017 - any failure, as openpyxl's
                sluice.agents.split.parse.xlsx._WorkbookReader(
                    io.BytesIO(data), read_only=True, keep_vba=False, data_only=True
                ).read()
            return 0
    compared = 0
    try:
        for sheet in book.worksheets:
            expected, failure = _openpyxl_rows(sheet)
            for chunk in chunks:
                rows, error = _reader_rows(book, sheet, chunk)
                assert rows == expected, (sheet.title, chunk)
                assert _failure(error) == _failure(failure), chunk
            compared += len(expected)
    finally:
        book.close()
    return compared


def crafted(
    path: Path,
    sheet: str,
    *,
    strings: list[str] | None = None,
    epoch_1904: bool = False,
    encoding: str = "utf-8",
) -> Path:
    """A workbook whose sheet is the XML `sheet`, with the styles 1 date, 2 date and time,
    3 time, 4 duration and 5 number ("0.00"), and the shared strings `strings` (<si> XML)."""
    book = openpyxl.Workbook()
    if epoch_1904:
        book.epoch = CALENDAR_MAC_1904
    book.active.append(  # type: ignore[union-attr]
        [dt.date(2024, 1, 5), dt.datetime(2024, 1, 5, 1), dt.time(1), dt.timedelta(1), 1.5]
    )
    book.active["E1"].number_format = "0.00"  # type: ignore[index]
    base = io.BytesIO()
    book.save(base)
    with zipfile.ZipFile(base) as source, zipfile.ZipFile(path, "w") as archive:
        assert b' s="5" ' in source.read("xl/worksheets/sheet1.xml")
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename == "xl/worksheets/sheet1.xml":
                data = sheet.encode(encoding)
            elif entry.filename == "[Content_Types].xml" and strings is not None:
                override = (
                    f'<Override PartName="/xl/sharedStrings.xml" ContentType="{_STRINGS_TYPE}"/>'
                )
                data = data.replace(b"</Types>", override.encode() + b"</Types>")
            archive.writestr(entry, data)
        if strings is not None:
            table = f'<sst xmlns="{_MAIN}">' + "".join(strings) + "</sst>"
            archive.writestr("xl/sharedStrings.xml", table)
    return path


def _sheet_xml(rows: str, before: str = "", after: str = "") -> str:
    return f'<worksheet xmlns="{_MAIN}">{before}<sheetData>{rows}</sheetData>{after}</worksheet>'


_EVERY_CELL = """
<row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c><c r="C1" t="s"><v>2</v></c>
 <c r="D1" t="inlineStr"><is><t xml:space="preserve"> padded </t></is></c></row>
<row r="2"><c r="A2"><v>12</v></c><c r="B2" t="n"><v>12.5</v></c><c r="C2"><v>1E3</v></c>
 <c r="D2"><v>-0</v></c><c r="E2"><v> 7 </v></c><c r="F2" s="5"><v>3</v></c>
 <c r="G2" s="0"><v>4</v></c><c r="H2" s=""><v>5</v></c><c r="I2"><v>1.5e-7</v></c>
 <c r="J2"><v>123456789012345678</v></c><c r="K2"><v>9007199254740993.0</v></c></row>
<row r="3"><c r="A3" s="1"><v>45296</v></c><c r="B3" s="2"><v>45296.437501428894</v></c>
 <c r="C3" s="3"><v>0.3440972222222222</v></c><c r="D3" s="4"><v>1.085416666666667</v></c>
 <c r="E3" s="4"><v>-0.5</v></c><c r="F3" s="2"><v>59</v></c><c r="G3" s="2"><v>61</v></c>
 <c r="H3" s="1"><v>0</v></c><c r="I3" s="1"><v>1</v></c><c r="J3" s="3"><v>0.99999999</v></c>
 <c r="K3" s="1"><v>45296</v></c><c r="L3" s="2" t="n"><v>45296.000000001</v></c></row>
<row r="4"><c r="A4" t="b"><v>1</v></c><c r="B4" t="b"><v>0</v></c>
 <c r="C4" t="e"><v>#DIV/0!</v></c><c r="D4" t="e"><v>#N/A</v></c><c r="E4" t="str"><v>text</v></c>
 <c r="F4" t="d"><v>2024-01-05T10:30:00</v></c><c r="G4" t="d"><v>2024-01-05</v></c>
 <c r="H4" t="d"><v>10:30:00.25</v></c><c r="I4" t="x"><v>odd</v></c>
 <c r="J4" t="e"><v>#REF!</v></c>
 <c r="K4" t="s"><v>3</v></c></row>
<row r="5"><c r="A5"><f>1+1</f><v>2</v></c><c r="B5" t="str"><f>"a"&amp;"b"</f><v>ab</v></c>
 <c r="C5" t="b"><f>TRUE()</f><v>1</v></c><c r="D5" t="e"><f>1/0</f><v>#DIV/0!</v></c>
 <c r="E5"><f>SUM(A1)</f></c><c r="F5"><f>SUM(A1)</f><v/></c><c r="G5" t="s"><f>X</f><v>1</v></c>
 <c r="H5" s="1"><f>TODAY()</f><v>45300</v></c>
 <c r="I5"><f t="shared" ref="I5:I6" si="0">A5*2</f><v>4</v></c></row>
<row r="6"><c r="I6"><f t="shared" si="0"/><v>8</v></c></row>
<row r="8"><c r="C8"><v>3</v></c><c r="E8"><v>5</v></c></row>
<row><c><v>1</v></c><c><v>2</v></c><c r="E9"><v>5</v></c><c><v>6</v></c></row>
<row r="10" spans="1:3"><c r="C10"><v>3</v></c><c r="A10"><v>1</v></c><c r="B10"><v>2</v></c></row>
<row r="11"><c r="A11"><v>1</v></c><c r="A11" t="e"><v>#NUM!</v></c><c r="B11"><v>2</v></c></row>
<row r="9"><c r="A9"><v>9</v></c></row>
<row r="12.0"><c r="a12"><v>1</v></c><c r="AB12"><v>28</v></c></row>
<row r="13"/>
<row r="14"><c r="A14" t="inlineStr"><is><r><rPr><b/><sz val="11"/></rPr><t>bold</t></r>
 <r><t xml:space="preserve"> plain</t></r></is></c>
 <c r="B14" t="inlineStr"><is><t>a</t><t>b</t></is></c><c r="C14" t="inlineStr"><is/></c>
 <c r="D14" t="inlineStr"/><c r="E14" t="inlineStr"><v>ignored</v></c>
 <c r="F14" t="inlineStr"><is><t>x</t><rPh sb="0" eb="1"><t>ph</t></rPh></is></c>
 <c r="G14" t="inlineStr"><is><t/></is></c><c r="H14" t="inlineStr"><is><t>a<b/>c</t></is></c>
 <c r="I14"><is><t>not inline</t></is></c>
 <c r="J14" t="inlineStr"><is><t>first</t></is><is><t>second</t></is></c>
 <c r="K14" t="inlineStr"><is>tail<r><t>run</t></r>more</is></c>
 <c r="L14" t="inlineStr"><is><t>x005F_kept</t></is></c></row>
<row r="15"><c r="A15"><v>1<x/>2</v></c><c r="B15"><v>1<!-- c -->2</v></c>
 <c r="C15" t="str"><v>a &amp; b &lt; &#x41;&#233;<![CDATA[<raw>]]></v></c>
 <c r="D15" t="str"><v>line
two\r\nthree</v></c><c r="E15" t="str"><v>   </v></c><c r="F15"><v></v><v>2</v></c>
 <c r="G15"><f>x</f></c><c r="H15" t="str"><x/><v>after</v></c></row>
<row r="16"><c r="A16"><v>1</v></c><extLst/><c><v>3</v></c></row>
<row r="17"><c r="A17" s="1"><v>3000000</v></c><c r="B17" s="1"><v>-1</v></c></row>
<row r="18"><c r="ZZZ18"><v>1</v></c></row>
<row r="19"><c r="B19" t="e"><v>#N/A</v></c><c r="A19" t="str"><v>x</v></c></row>
"""
_STRINGS = [
    "<si><t>plain</t></si>",
    '<si><r><rPr><b/></rPr><t>rich</t></r><r><t xml:space="preserve"> text</t></r></si>',
    "<si><t>_x005F_x000D_ and Ünïcødé</t></si>",
    "<si><t/></si>",
]


@pytest.mark.parametrize("epoch_1904", [False, True], ids=["1900", "1904"])
def test_the_reader_reads_every_kind_of_cell_as_openpyxl(tmp_path: Path, epoch_1904: bool) -> None:
    path = crafted(
        tmp_path / "t.xlsx",
        _sheet_xml(_EVERY_CELL, before='<dimension ref="A1:L19"/>'),
        strings=_STRINGS,
        epoch_1904=epoch_1904,
    )
    assert assert_reader_agrees(path.read_bytes()) == 17
    with warnings.catch_warnings(action="ignore"):
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    assert book.epoch == (CALENDAR_MAC_1904 if epoch_1904 else CALENDAR_WINDOWS_1900)
    rows = {
        number: cells
        for number, cells, _ in sluice.agents.split.parse.xlsx._sheet_rows(book, book.active)
    }
    book.close()
    # What the cases are (openpyxl agreeing is checked above).
    assert rows[1] == ["plain", "rich text", "_x000D_ and Ünïcødé", " padded "]
    assert rows[4][:5] == [True, False, "#DIV/0!", "#N/A", "text"]
    assert rows[5][:7] == [2, "ab", True, "#DIV/0!", None, None, "rich text"]
    assert rows[10] == [1, 2] and rows[11] == ["#NUM!", 2] and rows[19] == ["x"]
    assert rows[9] == [1, 2, None, None, 5, 6]  # not row 9 again, out of order, [9]
    assert 13 not in rows  # without cells
    assert rows[14] == [
        "bold plain",
        "b",
        "",
        None,
        None,
        "x",
        "",
        "a",
        None,
        "first",
        "run",
        "x005F_kept",
    ]
    assert rows[15][:6] == [1, 12, "a & b < Aé<raw>", "line\ntwo\nthree", "   ", None]
    assert rows[16] == [1, None, 3] and rows[17][0] == "#VALUE!"
    assert len(rows[18]) == 18278
    if not epoch_1904:
        assert rows[3][:4] == [
            dt.datetime(2024, 1, 5),
            dt.datetime(2024, 1, 5, 10, 30, 0, 123000),
            dt.time(8, 15, 30),
            dt.timedelta(days=1, seconds=7380),
        ]


def test_the_reader_reads_prefixed_pretty_printed_and_utf16_sheets_as_openpyxl(
    tmp_path: Path,
) -> None:
    rows = """
      <x:row r="1">
        <x:c r="A1" t="inlineStr">
          <x:is>
            <x:t>id</x:t>
          </x:is>
        </x:c>
        <x:c r="B1" t="str">
          <x:v>name</x:v>
        </x:c>
        <x:c r="C1" t="s" xmlns:x="urn:other"><x:v>0</x:v></x:c>
      </x:row>
      <x:row r="2"><x:c r="A2"><x:v>1</x:v></x:c><c r="B2"><v>in no namespace</v></c></x:row>
      <row r="3"><x:c r="A3"><x:v>3</x:v></x:c></row>
    """
    sheet = (
        f'<?xml version="1.0" encoding="{{}}"?>\n<x:worksheet xmlns:x="{_MAIN}">\n'
        f"<x:sheetData>{rows}</x:sheetData>\n</x:worksheet>\n"
    )
    for encoding in ("utf-8", "utf-16"):
        path = crafted(
            tmp_path / f"{encoding}.xlsx",
            sheet.format(encoding.upper()),
            strings=["<si><t>s</t></si>"],
            encoding=encoding,
        )
        assert assert_reader_agrees(path.read_bytes()) == 2


def test_the_reader_reads_rows_where_openpyxl_finds_them(tmp_path: Path) -> None:
    """Rows outside <sheetData>, in other elements, or a sheet that is one row: no spreadsheet
    writes them, but openpyxl reads every row element, and so does the reader."""
    odd = _sheet_xml(
        '<row r="2"><c r="A2"><v>2</v></c></row><x><row r="3"><c><v>3</v></c></row></x><y/>',
        before='<cols><row r="1"><c r="A1"><v>1</v></c></row></cols>',
        after='<extLst><row r="4"><c r="A4" t="str"><v>4</v></c></row></extLst>',
    )
    assert assert_reader_agrees(crafted(tmp_path / "odd.xlsx", odd).read_bytes()) == 4
    alone = f'<row xmlns="{_MAIN}" r="7"><c r="B7"><v>1</v></c></row>'
    assert assert_reader_agrees(crafted(tmp_path / "row.xlsx", alone).read_bytes()) == 1


_ROW_1 = '<row r="1"><c r="A1"><v>1</v></c></row>'
_ROW_2 = '<row r="2"><c r="A2"><v>2</v></c></row>'


@pytest.mark.parametrize(
    ("rows", "given"),
    [
        (f'{_ROW_1}<row r="2"><v>2</v></row><row r="3"><c✂', 2),
        (f"{_ROW_1}{_ROW_2}✂", 2),
        (f'{_ROW_1}<row r="2"><c r="A2"><v>2✂', 1),
        (f'{_ROW_1}{_ROW_2}&bad;<row r="3"><c r="A3"><v>3</v></c></row>', 2),
        (f'{_ROW_1}{_ROW_2}<<row r="3"><c r="A3"><v>3</v></c></row>', 2),
        (f'{_ROW_1}{_ROW_2}<row r="3"><c r="A3"><v>3</v></c></row></row>', 3),
        (f'{_ROW_1}<row r="2"><c r="A2" t="s"><v>5</v></c></row>', 1),
        (f'{_ROW_1}<row r="2"><c r="A2"><v>x</v></c></row>', 1),
        (f'{_ROW_1}<row r="2"><c r="2A"><v>2</v></c></row>', 1),
        (f'{_ROW_1}<row r="2"><c r="AAAA2"><v>2</v></c></row>', 1),
        (f'{_ROW_1}<row r="2"><c r="A"><v>2</v></c></row>', 1),
        (f'{_ROW_1}<row r="2.5"><c r="A2"><v>2</v></c></row>', 1),
        ('<row r="1"><c r="A1" s="x"><v>1</v></c></row>', 0),
        ('<row r="1"><c r="A1" t="b"><v>true</v></c></row>', 0),
        ('<row r="1"><c r="A1" t="d"><v>soon</v></c></row>', 0),
        (f'{_ROW_1}<row r="2"><c r="A2"><v>&bad;</v></c></row>', 1),
    ],
    ids=[
        "cut-in-a-cell",
        "cut-after-a-row",
        "cut-in-a-value",
        "entity-after-a-row",
        "token-after-a-row",
        "tag-mismatch-after-a-row",
        "no-such-string",
        "not-a-number",
        "bad-reference",
        "column-past-zzz",
        "reference-without-row",
        "fractional-row",
        "bad-style",
        "bad-boolean",
        "bad-iso-date",
        "undefined-entity",
    ],
)
def test_a_damaged_sheet_fails_where_openpyxl_does(tmp_path: Path, rows: str, given: int) -> None:
    """The rows before the damage are given, and then the same error; the tree does not show
    whether a row right before the damage was closed, openpyxl's parser does."""
    sheet = _sheet_xml(rows, before='<dimension ref="A1:A2"/>')
    if "✂" in sheet:
        sheet = sheet[: sheet.index("✂")]
    path = crafted(tmp_path / "t.xlsx", sheet, strings=["<si><t>s</t></si>"])
    assert assert_reader_agrees(path.read_bytes()) == given
    with pytest.raises(FileFormatError, match="cannot be read as an XLSX workbook"):
        list(read(path))


def test_a_corrupt_sheet_in_the_archive_fails_where_openpyxl_does(tmp_path: Path) -> None:
    """A stored sheet whose bytes no longer match its checksum fails at its last read: the
    rows read before are given, as openpyxl reads them (16 KiB at a time)."""
    path = workbook(
        tmp_path / "t.xlsx", ("S", [["id", "name"], *([i, f"n{i}"] for i in range(3000))])
    )
    stored = tmp_path / "stored.xlsx"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stored, "w") as archive:
        assert (
            len(source.read("xl/worksheets/sheet1.xml"))
            > 3 * sluice.agents.split.parse.xlsx._SHEET_CHUNK
        )
        for entry in source.infolist():
            archive.writestr(entry.filename, source.read(entry), zipfile.ZIP_STORED)
    data = stored.read_bytes()
    assert data.count(b"<v>2998</v>") == 1
    corrupt = data.replace(b"<v>2998</v>", b"<v>2999</v>")
    # Read as openpyxl reads, a chunk at a time: the last one, which fails, is lost.
    given = assert_reader_agrees(corrupt, chunks=(sluice.agents.split.parse.xlsx._SHEET_CHUNK,))
    assert 1000 < given < 3000
    with pytest.raises(FileFormatError, match="Bad CRC-32"):
        list(parse_file(io.BytesIO(corrupt)))


def test_the_reader_agrees_with_openpyxl_on_written_workbooks(tmp_path: Path) -> None:
    rows = _typed_rows()
    rows.append([None, "  ", "#N/A", dt.time(23, 59, 59, 999000), dt.timedelta(hours=-3)])
    rows.append(["=1+1", "x" * 40_000, 1e300, -1e-300, 2**53 + 1])
    _, typed, _ = _write_all(tmp_path)
    assert assert_reader_agrees(typed.read_bytes()) == 51
    path = workbook(tmp_path / "more.xlsx", ("Data", [COLUMNS, *rows]))
    assert (
        assert_reader_agrees(
            path.read_bytes(), chunks=(sluice.agents.split.parse.xlsx._SHEET_CHUNK, 1000)
        )
        == 53
    )
    streamed = openpyxl.Workbook(write_only=True)  # inline strings, no <dimension>
    sheet = streamed.create_sheet("Data")
    for row in [COLUMNS, *rows]:
        sheet.append(row)
    streamed.save(tmp_path / "streamed.xlsx")
    assert b"inlineStr" in zipfile.ZipFile(tmp_path / "streamed.xlsx").read(
        "xl/worksheets/sheet1.xml"
    )
    assert (
        assert_reader_agrees(
            (tmp_path / "streamed.xlsx").read_bytes(),
            (sluice.agents.split.parse.xlsx._SHEET_CHUNK, 999),
        )
        == 53
    )


def test_the_workbook_reader_finds_the_sheets_openpyxl_does(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    book.active.title = "First"  # type: ignore[union-attr]
    book.create_chartsheet("Chart").add_chart(BarChart())
    hidden = book.create_sheet("Hidden")
    hidden.sheet_state = "hidden"
    book.create_sheet("Last").append([1])
    book.save(tmp_path / "t.xlsx")
    data = (tmp_path / "t.xlsx").read_bytes()
    with warnings.catch_warnings(action="ignore"):
        theirs = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        reader = sluice.agents.split.parse.xlsx._WorkbookReader(
            io.BytesIO(data), read_only=True, keep_vba=False, data_only=True
        )
        reader.read()
    ours = reader.wb

    def sheets(book: Any) -> list[Any]:
        return [
            (
                s.title,
                type(s).__name__ == "Chartsheet",
                s.sheet_state,
                getattr(s, "_worksheet_path", None),
            )
            for s in book._sheets
        ]

    assert sheets(ours) == sheets(theirs)
    assert [s.title for s in ours.worksheets] == ["First", "Hidden", "Last"]
    assert ours.epoch == theirs.epoch and ours._date_formats == theirs._date_formats
    theirs.close()
    ours.close()


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
    monkeypatch.setattr(sluice.agents.split.parse.parquet, "PARQUET_BATCH_ROWS", 10)
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


def _inspect(data: bytes, chunk: int = 3) -> Inspector:
    inspector = Inspector(2**30, 500)
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


@pytest.mark.stack
async def test_a_workbook_whose_first_sheet_lacks_the_key_names_its_sheets_and_the_option(
    client: Client, stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The first visible sheet is a cover page: the run fails with the workbook's other sheets
    and how to pick one; with the sheet named (a run option) the same file lands."""
    rows: list[list[Any]] = [["id", "name"], [1, "apple"], [2, "pear"]]
    path = workbook(
        tmp_path / "book.xlsx", ("Cover", [["Prices 2024"], ["see the next sheet"]]), ("Data", rows)
    )
    table = unique("t_sheets")
    options: dict[str, Any] = {"table": table, "key": ["id"]}
    failed = await finish(client, await client.submit_file("adhoc", path, options=options), stack)
    assert failed.status is RunStatus.FAILED and failed.error is not None
    assert "key column 'id' is not in the file" in failed.error
    assert "This read the sheet 'Cover'; the workbook's other sheets are: 'Data'." in failed.error
    assert "--sheet NAME" in failed.error
    through = await finish(
        client, await client.submit_file("t_typed_xlsx", path, options={"sheet": "Cover"}), stack
    )
    assert through.status is RunStatus.FAILED and "'Data'" in (through.error or "")
    picked = {**options, "sheet": "Data"}
    done = await finish(client, await client.submit_file("adhoc", path, options=picked), stack)
    assert done.status is RunStatus.COMPLETED and done.created_rows == 2, done.error
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2
