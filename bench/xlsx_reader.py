"""How fast XLSX rows are read: sluice's reader (sluice.agents.split.parse.xlsx.read_xlsx)
against openpyxl's read-only row iteration, on one workbook, in cells per second.

    python bench/xlsx_reader.py WORKBOOK.xlsx [--rows N] [--skip-openpyxl] [--check]

--check compares every row the reader gives with openpyxl's (values, types, error cells).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import openpyxl

from sluice.agents.split.parse.xlsx import _sheet_rows, read_xlsx
from sluice.schemas.formats import FormatOptions


def openpyxl_rows(path: Path, limit: int | None) -> tuple[int, float]:
    """Cells read by openpyxl's read-only iter_rows(values_only=True), and the seconds."""
    started = time.perf_counter()
    with warnings.catch_warnings(action="ignore"):
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        cells = 0
        for number, row in enumerate(book.worksheets[0].iter_rows(values_only=True), 1):
            cells += len(row)
            if limit and number >= limit:
                break
    book.close()
    return cells, time.perf_counter() - started


def sluice_rows(path: Path, limit: int | None) -> tuple[int, float]:
    """Cells of the records read_xlsx gives (each one typed as a record), and the seconds."""
    started = time.perf_counter()
    parsed = read_xlsx(io.BytesIO(path.read_bytes()), FormatOptions())
    cells = len(parsed.header)
    for number, row in enumerate(parsed, 2):
        cells += len(row.values)
        if limit and number >= limit:
            break
    return cells, time.perf_counter() - started


def typed(value: Any) -> tuple[type, Any]:
    return type(value), value


def check(path: Path) -> tuple[int, int]:
    """Rows compared between the reader and openpyxl, and those that differ (printing the
    first few)."""
    with warnings.catch_warnings(action="ignore"):
        theirs_book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        ours_book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        compared = differ = 0
        for sheet in theirs_book.worksheets:
            ours = _sheet_rows(ours_book, ours_book[sheet.title])
            sheet.reset_dimensions()
            theirs = (
                (
                    number,
                    [c.value for c in row],
                    [i for i, c in enumerate(row) if c.data_type == "e"],
                )
                for number, row in enumerate(sheet.iter_rows(), 1)
                if row
            )
            for left, right in zip(ours, theirs, strict=True):
                compared += 1
                same = left[0] == right[0] and left[2] == right[2]
                same = same and list(map(typed, left[1])) == list(map(typed, right[1]))
                if not same:
                    differ += 1
                    if differ <= 5:
                        print(f"differs: ours {left!r}\n      openpyxl {right!r}")
    return compared, differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workbook", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="stop after this many rows")
    parser.add_argument("--skip-openpyxl", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    runs = [("sluice reader", sluice_rows)]
    if not args.skip_openpyxl:
        runs.insert(0, ("openpyxl iter_rows", openpyxl_rows))
    for label, run in runs:
        cells, seconds = run(args.workbook, args.rows)
        print(f"{label:20} {cells:>10,} cells {seconds:7.2f} s {cells / seconds:>10,.0f} cells/s")
    if args.check:
        compared, differ = check(args.workbook)
        print(f"rows compared with openpyxl: {compared:,}, differing: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
