"""XLSX workbooks, read into the same rows as delimited text.

A workbook is binary and read from its end (the ZIP central directory), so it needs a seekable
file: ``parse_file`` tells it by its first bytes and hands it over here. Cells keep their type
(str, int, float, Decimal, bool, date, datetime, time, None): the mapper fits them to the
fields, so a date column reads the same from a workbook as from a CSV.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Container, Generator, Iterator, Sequence
from typing import Any, BinaryIO, TypeAlias, cast

from openpyxl.cell.text import Text
from openpyxl.reader.excel import ExcelReader
from openpyxl.utils import get_column_letter
from openpyxl.utils.cell import coordinate_to_tuple
from openpyxl.utils.datetime import from_excel, from_ISO8601
from openpyxl.worksheet._read_only import ReadOnlyWorksheet

from sluice.agents.split.parse.archives import archive_refusal
from sluice.agents.split.parse.decompress import check_decompression
from sluice.agents.split.parse.parsed import (
    ParsedFile,
    duration_text,
    file_size,
    refuse_duplicate_names,
)
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem, Sniffed

_MIDNIGHT = dt.time()
# Excel stores every number as a float; integral ones are ints up to 2**53, where a float
# stops holding every integer (Excel keeps 15 significant digits anyway).
_EXACT_FLOAT = 2**53
_FIX_XLSX = (
    "Open it in Excel and save it again as .xlsx (Excel Workbook), or as CSV, and upload that"
)


def _unreadable_xlsx(exc: Exception) -> FileFormatError:
    detail = str(exc) or type(exc).__name__
    return FileFormatError(
        f"the file cannot be read as an XLSX workbook ({detail}): it is damaged, encrypted, or "
        f"another kind of ZIP archive (.xlsb, .ods, .docx, ...). {_FIX_XLSX}"
    )


def _cell_value(value: Any) -> Any:
    """A cell as a record carries it. Excel has no integer and no date type: an integral float
    is an int, and a date and time at midnight a date, as a CSV of the same sheet spells them.
    A duration is interval text."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _EXACT_FLOAT else value
    if isinstance(value, dt.datetime):
        return value.date() if value.time() == _MIDNIGHT else value
    if isinstance(value, dt.timedelta):
        return duration_text(value)
    return value


def _header_name(value: Any) -> str:
    value = _cell_value(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return "" if value is None else str(value).strip()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _SheetProgress:
    """How far into the workbook the rows are, in bytes of the upload: the share of the sheet's
    compressed data read so far (zipfile reads it in order, through the upload's file), applied
    to the file's size. An estimate while reading, exact at the end."""

    def __init__(self, raw: BinaryIO, entry: zipfile.ZipInfo | None, size: int) -> None:
        self._raw = raw
        self._entry = entry
        self._size = size
        self.finished = False

    def __call__(self) -> int:
        if self.finished:
            return self._size
        if self._entry is None:
            return 0
        into = min(max(self._raw.tell() - self._entry.header_offset, 0), self._entry.compress_size)
        return self._size * into // max(self._entry.compress_size, 1)


def read_xlsx(raw: BinaryIO, options: FormatOptions) -> ParsedFile:
    """Read a worksheet of the workbook in `raw` (seekable): ``options.sheet``, else the first
    visible one. Its first row that is not empty is the header, every later row that is not
    empty a record. openpyxl reads the workbook (read-only mode) and :func:`_sheet_values` the
    sheet, streamed: only the shared strings are held in memory whole.
    """
    size = file_size(raw)
    try:
        with zipfile.ZipFile(raw) as archive:
            entries = archive.infolist()
    except Exception as exc:  # a damaged file fails in zipfile in many ways: all mean the same
        raise _unreadable_xlsx(exc) from exc
    refusal = archive_refusal(entries)
    if refusal is not None:
        raise FileFormatError(refusal)
    # zipfile stops every entry at its declared size (and fails its checksum past it), so the
    # declared sizes bound what reading the workbook can unpack.
    check_decompression(
        sum(entry.file_size for entry in entries),
        size,
        max_decompressed_bytes=options.max_decompressed_bytes,
        max_compression_ratio=options.max_compression_ratio,
        fix="Save the data as CSV and upload that",
    )
    try:
        # openpyxl warns about the parts of a workbook it drops (data validation, conditional
        # formatting, a missing default style): none matters for reading values.
        with warnings.catch_warnings(action="ignore"):
            reader = _WorkbookReader(
                raw, read_only=True, keep_vba=False, data_only=True, keep_links=False
            )
            reader.read()
            workbook = reader.wb
    except Exception as exc:  # as above, and openpyxl adds its own (KeyError, XML errors, ...)
        raise _unreadable_xlsx(exc) from exc
    try:
        sheet = _choose_sheet(workbook, options.sheet)
        # The reader ignores the sheet's <dimension>: tools other than Excel write wrong ones,
        # and rows past them would be lost.
        rows = _sheet_rows(workbook, sheet)
        header = _xlsx_header(rows, sheet.title)
    except BaseException:
        workbook.close()
        raise
    # openpyxl keeps the sheet's path in the archive only in a private attribute.
    by_name = {entry.filename: entry for entry in entries}
    progress = _SheetProgress(raw, by_name.get(sheet._worksheet_path), size)
    sheets = tuple(ws.title for ws in workbook.worksheets)
    sniffed = Sniffed("xlsx", None, None, "none", sheet=sheet.title, sheets=sheets)
    records = _xlsx_records(workbook, rows, header, sheet.title, progress)
    return ParsedFile(sniffed, header, records, progress)


class _Worksheet(ReadOnlyWorksheet):  # type: ignore[misc]
    """A read-only worksheet that does not look for its size when the workbook is opened:
    without a <dimension> tag (openpyxl's write-only mode writes none), openpyxl parses the
    whole sheet for it. The reader below ignores sizes."""

    def _get_size(self) -> None:
        pass


class _WorkbookReader(ExcelReader):  # type: ignore[misc]
    """openpyxl's ``load_workbook(read_only=True)``, with :class:`_Worksheet` for worksheets
    (as ``ExcelReader.read_worksheets`` does for a read-only workbook)."""

    def read_worksheets(self) -> None:
        for sheet, rel in self.parser.find_sheets():
            if rel.target not in self.valid_files:
                continue
            if "chartsheet" in rel.Type:
                self.read_chartsheet(sheet, rel)
                continue
            worksheet = _Worksheet(self.wb, sheet.name, rel.target, self.shared_strings)
            worksheet.sheet_state = sheet.state
            self.wb._sheets.append(worksheet)


def _choose_sheet(workbook: Any, name: str | None) -> Any:
    worksheets = workbook.worksheets  # charts are sheets too, but not worksheets
    if name is None:
        if not worksheets:
            raise FileFormatError(
                "the workbook has no worksheet, only charts: put the data in a worksheet, or "
                "export it as CSV"
            )
        visible = [sheet for sheet in worksheets if sheet.sheet_state == "visible"]
        return (visible or worksheets)[0]
    names = ", ".join(repr(sheet.title) for sheet in worksheets)
    if name not in workbook.sheetnames:
        raise FileFormatError(
            f"the workbook has no sheet named {name!r}; its sheets are: {names}. Set the sheet "
            f"option to one of them (the name as Excel shows it on the tab)"
        )
    sheet = workbook[name]
    if sheet not in worksheets:
        raise FileFormatError(
            f"sheet {name!r} of the workbook is a chart, not cells; its worksheets are: {names}"
        )
    return sheet


# The worksheet's rows. openpyxl's read-only worksheet makes a dictionary and a cell object of
# every cell, and reads every inline string with its rich text machinery. This reader parses
# the sheet with the same parser (ElementTree's, over expat), decides each cell's value as
# openpyxl's WorkSheetParser.parse_cell does, and drops each row once read: 1.8 to 3.5 times
# faster (bench/xlsx_reader.py). The rest of the workbook (sheets, shared strings, styles,
# date system) is still openpyxl's.
_SHEET_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_ROW_TAG = _SHEET_NS + "row"
_VALUE_TAG = _SHEET_NS + "v"
_INLINE_TAG = _SHEET_NS + "is"
_TEXT_TAG = _SHEET_NS + "t"
# Bytes of sheet XML parsed at a time, as openpyxl's iterparse reads them: a damaged archive
# member then fails at the same row.
_SHEET_CHUNK = 16 * 1024
# Date cells cached (their text to their value): a date column repeats its days.
_DATE_CACHE = 4096
_DIGITS = "0123456789"
_LAST_COLUMN = 18278  # ZZZ: openpyxl reads no further
_OUT_OF_RANGE = object()
# A row as the reader gives it: its number, its values, the indexes of its error cells.
_SheetRow: TypeAlias = tuple[int, list[Any], list[int]]


@functools.cache
def _column_numbers() -> dict[str, int]:
    """Column letters to column numbers, A to ZZZ as openpyxl reads them."""
    return {get_column_letter(number): number for number in range(1, _LAST_COLUMN + 1)}


@functools.cache
def _column_letters() -> list[str]:
    """Column numbers to column letters (none for 0)."""
    return ["\0", *(get_column_letter(number) for number in range(1, _LAST_COLUMN + 1))]


def _row_attribute(value: str) -> int:
    """A row's ``r`` attribute as openpyxl reads it."""
    try:
        return int(value)
    except ValueError:
        number = float(value)
        if number.is_integer():
            return int(number)
        raise ValueError(f"{value} is not a valid row number") from None


def _row_of(cells: list[tuple[int, Any, bool]]) -> tuple[list[Any], list[int]]:
    """A row whose cells are out of order, as openpyxl lays it out: as wide as its last cell's
    column, a later cell in the same column replacing an earlier one."""
    width = cells[-1][0]
    values: list[Any] = [None] * width
    errors = [False] * width
    for column, value, error in cells:
        if 1 <= column <= width:
            values[column - 1] = value
            errors[column - 1] = error
    return values, [index for index, error in enumerate(errors) if error]


class _Rows:
    """Reads rows from a worksheet's XML tree as it is parsed, as openpyxl's read-only
    worksheet gives them with ``data_only`` (``WorkSheetParser.parse_row`` and ``parse_cell``,
    and ``ReadOnlyWorksheet._cells_by_row`` without dimensions)."""

    def __init__(
        self,
        shared_strings: Sequence[str],
        date_styles: Container[Any],
        duration_styles: Container[Any],
        epoch: dt.datetime,
    ) -> None:
        self.shared_strings = shared_strings
        self.date_styles = date_styles
        self.duration_styles = duration_styles
        self.epoch = epoch
        self.kinds: dict[str | None, int] = {}  # a cell's style attribute to its kind
        self.dates: dict[str, Any] = {}
        self.durations: dict[str, Any] = {}
        self.number = 0  # of the last row read, as openpyxl counts them
        self.next = 1  # openpyxl drops a row numbered before this
        self.read = 0  # row elements read
        self.done: list[_SheetRow] = []  # rows read and not given yet

    def harvest(self, element: ET.Element, complete: bool) -> None:
        """Reads the rows in `element` (not a row) that are complete, in order: all if
        `element` is complete; else those before its last child, and those complete in its
        last child. Drops what it read from the tree."""
        count = len(element) if complete else len(element) - 1
        if count > 0:
            for child in element[:count]:
                if child.tag == _ROW_TAG:
                    self.row(child)
                else:
                    for row in child.iter(_ROW_TAG):
                        self.row(row)
            del element[:count]
        if not complete and len(element) and element[-1].tag != _ROW_TAG:
            self.harvest(element[-1], False)

    def kind(self, style: str | None) -> int:
        """0 if a number in a cell of `style` (its ``s`` attribute) is a number, 1 if a date, 2
        if a duration, as openpyxl decides."""
        style_id: Any = 0 if style is None else style
        if style_id:
            style_id = int(style_id)
        kind = 0
        if style_id in self.date_styles:
            kind = 2 if style_id in self.duration_styles else 1
        if len(self.kinds) < 1000:
            self.kinds[style] = kind
        return kind

    def row(self, row: ET.Element) -> None:
        """Reads a row: openpyxl's WorkSheetParser.parse_row and parse_cell."""
        self.read += 1
        number = row.get("r")
        row_number = self.number + 1 if number is None else _row_attribute(number)
        self.number = row_number
        suffix = str(row_number) if row_number >= 0 else "\0"  # as in its cells' references
        kinds = self.kinds
        columns = _column_numbers()
        letters = _column_letters()
        shared_strings = self.shared_strings
        values: list[Any] = []
        errors: list[int] = []
        placed: list[tuple[int, Any, bool]] | None = None  # the cells, once out of order
        column = 0
        for cell in row:  # every element in a row is a cell to openpyxl
            get = cell.attrib.get
            data_type = get("t", "n")
            style = get("s")
            kind = kinds.get(style)
            if kind is None:
                kind = self.kind(style)
            last = column
            ref = get("r")
            if not ref or (column < _LAST_COLUMN and ref == letters[column + 1] + suffix):
                column += 1
            else:
                found = columns.get(ref.rstrip(_DIGITS))
                if found is None or ref[-1] not in _DIGITS:
                    found = coordinate_to_tuple(ref)[1]
                column = found
            value: Any
            if data_type == "inlineStr":
                value = None
                inline = cell.find(_INLINE_TAG)
                if inline is not None:
                    data_type = "s"
                    if len(inline) == 1 and inline[0].tag == _TEXT_TAG and not inline.attrib:
                        value = inline[0].text or ""
                    else:  # rich text, phonetic runs, ...
                        value = Text.from_tree(inline).content
            else:
                value = cell.findtext(_VALUE_TAG) or None
                if value is not None:
                    if data_type == "n":
                        text = value
                        if "." in text or "E" in text or "e" in text:
                            value = float(text)
                        else:
                            value = int(text)
                        if kind:
                            value, data_type = self.date(text, value, kind)
                    elif data_type == "s":
                        value = shared_strings[int(value)]
                    elif data_type == "b":
                        value = bool(int(value))
                    elif data_type == "d":
                        value = from_ISO8601(value)
            if column > last and placed is None:  # as many values as the last column
                if column > last + 1:
                    values.extend([None] * (column - 1 - last))
                values.append(value)
                if data_type == "e":
                    errors.append(column - 1)
            else:
                if placed is None:
                    placed = [(i, v, i - 1 in errors) for i, v in enumerate(values, 1)]
                placed.append((column, value, data_type == "e"))
        if placed is not None:
            values, errors = _row_of(placed)
        if row_number >= self.next:
            if values:
                self.done.append((row_number, values, errors))
            self.next = row_number + 1

    def date(self, text: str, number: float, kind: int) -> tuple[Any, str]:
        """A number in a date (or duration) cell, and the cell's type: "e" if out of range."""
        cache = self.dates if kind == 1 else self.durations
        when = cache.get(text)
        if when is None:
            try:
                when = from_excel(number, self.epoch, timedelta=kind == 2)
            except (OverflowError, ValueError):
                when = _OUT_OF_RANGE
            if len(cache) >= _DATE_CACHE:
                cache.clear()
            cache[text] = when
        return ("#VALUE!", "e") if when is _OUT_OF_RANGE else (when, "d")


def _sheet_values(
    archive: zipfile.ZipFile,
    path: str,
    shared_strings: Sequence[str],
    date_styles: Container[Any],
    duration_styles: Container[Any],
    epoch: dt.datetime,
    chunk: int = _SHEET_CHUNK,
) -> Iterator[_SheetRow]:
    """The rows of the worksheet at `path` in `archive`, parsed `chunk` bytes at a time, as
    openpyxl's read-only worksheet gives them with ``data_only``: the values of a row's cells,
    None where a cell is missing, an error cell's value its text ("#N/A"). A row that has no
    cells, or whose number is not past the last row given (openpyxl drops it), is left out.
    """
    rows = _Rows(shared_strings, date_styles, duration_styles, epoch)
    # Start events only give the root; the rows are read from the tree.
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start",))
    root: ET.Element | None = None
    with archive.open(path) as source:
        while True:
            failure: Exception | None = None
            data = b""
            try:
                data = source.read(chunk)
                if data:
                    parser.feed(data)
                else:
                    parser.close()
                if root is None:
                    for event in parser.read_events():
                        root = cast(ET.Element, event[-1])
                        break
                collections.deque(parser.read_events(), maxlen=0)  # dropped unread, in C
            except Exception as exc:  # the rows before the damage are given first
                failure = exc
            try:
                with warnings.catch_warnings(action="ignore"):
                    if root is None:
                        pass
                    elif failure is not None:
                        _harvest_damaged(rows, root, archive, path, chunk)
                    elif root.tag != _ROW_TAG:
                        rows.harvest(root, complete=not data)
                    elif not data:  # a sheet that is a row
                        rows.row(root)
            except Exception as exc:  # a bad cell before the damage fails first
                failure = exc
            yield from rows.done
            rows.done.clear()
            if failure is not None:
                raise failure
            if not data:
                return


def _harvest_damaged(
    rows: _Rows, root: ET.Element, archive: zipfile.ZipFile, path: str, chunk: int
) -> None:
    """Reads the rows complete before the sheet's XML (or its archive member) broke. The tree
    does not tell whether the last row was closed before the damage: the sheet is parsed
    again, counting the rows openpyxl's parser saw end."""
    if root.tag != _ROW_TAG:
        rows.harvest(root, complete=False)
    last = root
    while len(last) and last.tag != _ROW_TAG:
        last = last[-1]
    if last.tag == _ROW_TAG and _rows_ended(archive, path, chunk) > rows.read:
        rows.row(last)


def _rows_ended(archive: zipfile.ZipFile, path: str, chunk: int) -> int:
    """How many rows of the sheet openpyxl's parser sees end before the sheet breaks."""
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("end",))
    ended = 0
    try:
        with archive.open(path) as source:
            while data := source.read(chunk):
                parser.feed(data)
                for event in parser.read_events():
                    element = event[-1]
                    if isinstance(element, ET.Element) and element.tag == _ROW_TAG:
                        ended += 1
                        element.clear()
    except Exception:  # the damage, where it was met the first time
        pass
    return ended


def _sheet_rows(workbook: Any, sheet: Any) -> Generator[_SheetRow, None, None]:
    """The rows of `sheet`. openpyxl keeps the archive and the sheet's path in it in private
    attributes, and a read-only workbook's shared strings in its sheets."""
    rows = _sheet_values(
        workbook._archive,
        sheet._worksheet_path,
        sheet._shared_strings,
        workbook._date_formats,
        workbook._timedelta_formats,
        workbook.epoch,
    )
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # the sheet's XML is damaged, or cut short in the archive
            raise _unreadable_xlsx(exc) from exc
        yield row


def _xlsx_header(rows: Iterator[_SheetRow], title: str) -> list[str]:
    header: list[str] = []
    number = 0
    while not header:
        number, cells, _ = next(rows, (0, [], []))
        if not number:
            raise FileFormatError(
                f"sheet {title!r} of the workbook is empty: it has no header row. The first row "
                f"with values must name the columns"
            )
        header = [_header_name(value) for value in cells]
        while header and not header[-1]:
            header.pop()
    where = f"row {number} of sheet {title!r}"
    empty = [get_column_letter(index) for index, name in enumerate(header, 1) if not name]
    if empty:
        raise FileFormatError(
            f"the header row ({where}) has columns without a name: column {', '.join(empty)}. "
            f"Name every column, or delete the empty ones"
        )
    refuse_duplicate_names(header, where, get_column_letter)
    return header


def _xlsx_records(
    workbook: Any,
    rows: Generator[_SheetRow, None, None],
    header: list[str],
    title: str,
    progress: _SheetProgress,
) -> Iterator[ParsedRow | RowProblem]:
    width = len(header)
    last_column = get_column_letter(width)
    number = 0
    try:
        for sheet_row, cells, error_cells in rows:
            values = [_cell_value(value) for value in cells]
            used = len(values)
            while used and _blank(values[used - 1]):
                used -= 1
            if not used:
                continue
            number += 1
            del values[used:]
            if used > width:
                yield RowProblem(
                    number,
                    values,
                    f"expected {width} fields as in the header, found {used} (row {sheet_row} of "
                    f"sheet {title!r}: cell {get_column_letter(used)}{sheet_row} is right of the "
                    f"last named column, {last_column}). Name the column in the header, or clear "
                    f"the cell",
                )
                continue
            # An error cell's value is its text ("#DIV/0!"): only its type tells it from a
            # string typed in.
            errors = [
                f"column {header[index]!r} holds the Excel error {cells[index]}; fix the "
                f"formula or clear the cell ({get_column_letter(index + 1)}{sheet_row} on sheet "
                f"{title!r})"
                for index in error_cells
                if index < used
            ]
            if errors:
                yield RowProblem(number, values, "; ".join(errors))
                continue
            values.extend([None] * (width - used))
            yield ParsedRow(number, values)
        progress.finished = True
    finally:
        rows.close()
        workbook.close()
