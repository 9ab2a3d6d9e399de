"""Benchmark: the same rows imported as CSV, XLSX and Parquet; time and the worker's memory.

Generates the 19-column rows of bench/import_csv.py, writes them as CSV, as an XLSX workbook
(openpyxl, write-only; numbers, booleans and dates typed as Excel stores them) and as Parquet
(pyarrow, row groups of 50,000), and imports each with `sluice import --wait` into a fresh
table on its own embedded stack. The worker is restarted before each file, so its peak RSS
(VmHWM) belongs to that file alone: the readers stream (XLSX row by row in read-only mode,
Parquet one row group at a time), so it should stay near the CSV figure whatever the size.

    .venv/bin/python bench/import_formats.py [--rows 200000]

This prints figures; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

from import_csv import (
    COLUMNS,
    generate,
    restart_worker,
    sluice,
    start_stack,
    timed_import,
    vm_hwm_mb,
)

INTS = {"id", "stock", "reorder_level"}
FLOATS = {"price", "cost", "weight_kg", "rating"}


def typed(name: str, text: str) -> Any:
    if name in INTS:
        return int(text)
    if name in FLOATS:
        return float(text)
    if name == "active":
        return text == "true"
    if name == "released":
        return date.fromisoformat(text)
    if name == "updated_at":
        return datetime.fromisoformat(text.replace("Z", "")).replace(microsecond=0)
    return text


def to_xlsx(source: Path, target: Path) -> None:
    from openpyxl import Workbook

    book = Workbook(write_only=True)
    sheet = book.create_sheet("items")
    with source.open(newline="") as f:
        reader = csv.reader(f)
        sheet.append(next(reader))
        for row in reader:
            sheet.append([typed(n, v) for n, v in zip(COLUMNS, row, strict=True)])
    book.save(target)


def to_parquet(source: Path, target: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pacsv.read_csv(source), target, row_group_size=50_000)


CONVERTERS = {"csv": None, "xlsx": to_xlsx, "parquet": to_parquet}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000])
    parser.add_argument(
        "--formats", nargs="+", default=["csv", "xlsx", "parquet"], choices=CONVERTERS
    )
    args = parser.parse_args()

    started = start_stack("sluice-bench-formats-")
    if started is None:
        return 1
    work, home, env = started
    results = []
    try:
        for rows in args.rows:
            source = work / f"items_{rows}.csv"
            generate(source, rows)
            files = {"csv": source}
            for fmt in args.formats:
                convert = CONVERTERS[fmt]
                if convert is None:
                    continue
                started = time.perf_counter()
                files[fmt] = work / f"items_{rows}.{fmt}"
                convert(source, files[fmt])
                print(f"{fmt}: written in {time.perf_counter() - started:.1f}s")
            for fmt, path in files.items():
                if fmt not in args.formats:
                    continue
                size_mb = path.stat().st_size / 2**20
                print(f"\n{rows:,} rows as {fmt} ({size_mb:.1f} MB)")
                pid = restart_worker(home, env)
                took, run = timed_import(path, f"bench_{fmt}_{rows}", env)
                assert run["created_rows"] == rows, run
                rss = vm_hwm_mb(pid)
                results.append((rows, fmt, size_mb, took, rss))
                print(f"  {took:.1f}s  {rows / took:,.0f} rows/s  worker peak RSS {rss:.0f} MB")
    finally:
        sluice("down", env=env)
    print("\n| rows | format | file | sluice import | rows/s | worker peak RSS |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows, fmt, size_mb, took, rss in results:
        print(
            f"| {rows:,} | {fmt} | {size_mb:.1f} MB | {took:.1f}s | {rows / took:,.0f}"
            f" | {rss:.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
