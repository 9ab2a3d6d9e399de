"""Fault injection on a real stack: each case injects one fault at a random moment drawn from
the seed, lets the run finish, then compares the final tables with the expected state.

Figures per case and round (written to the report, and asserted): rows lost (missing, or with
other values than expected), rows duplicated (extra rows, rows that should be gone), counters
wrong (run counters that differ from the exact expected values) and the seconds from the fault
to the run's completion (or, for the firehose, to the records table equal to the PDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from sluice.agents.firehose.backfill import IMPORTER as BACKFILL
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from sluice.storage.runs import RUN_COLUMNS, run_from_record
from sluice.subscription import Subscription
from tests.chaos.conftest import SEED, ChaosStack, Db, Report, Supervisor, case_rng
from tests.conftest import PARTITIONS, ROOT, TOPICS, Worker
from tests.support.ports import free_port
from tests.support.servers.atproto import FakeJetstream, FakePds, World
from tests.support.servers.paginated_api import EPOCH, FakeApi

pytestmark = [pytest.mark.chaos, pytest.mark.stack]

Row = tuple[int, str, str, int, str, int]  # id, name, price, qty, day, version
HEADER = "id,name,price,qty,day,version"
POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"


# ------------------------------------------------------------------------------ the record


@dataclass
class Result:
    """What one case in one round measured; written to the report whatever happens."""

    case: str
    chaos_round: int
    lost: int | None = None
    duplicated: int | None = None
    counters_wrong: int | None = None
    recover_seconds: float | None = None
    events_lost: int | None = None  # lifecycle events missing from the topic (broker case)
    restarted_by_supervisor: bool = False
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recorded(report: Report, case: str, chaos_round: int) -> Iterator[Result]:
    result = Result(case, chaos_round)
    outcome = "passed"
    try:
        yield result
    except BaseException as exc:
        outcome = "failed"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.notes.append(f"{type(exc).__name__}: {first[:300]}")
        raise
    finally:
        report.write(
            case=case,
            round=chaos_round,
            seed=SEED,
            lost=result.lost,
            duplicated=result.duplicated,
            counters_wrong=result.counters_wrong,
            recover_seconds=result.recover_seconds,
            events_lost=result.events_lost,
            restarted_by_supervisor=result.restarted_by_supervisor,
            outcome=outcome,
            notes="; ".join(result.notes),
        )


def assert_clean(result: Result, stack: ChaosStack) -> None:
    figures = (result.lost, result.duplicated, result.counters_wrong)
    assert figures == (0, 0, 0), (
        f"{result.case} (seed {SEED}, round {result.chaos_round}): lost {result.lost},"
        f" duplicated {result.duplicated}, counters wrong {result.counters_wrong}"
        f" ({'; '.join(result.notes)})\n{stack.logs()}"
    )


# ------------------------------------------------------------------------------ file data


def make_rows(n: int, rng: random.Random) -> list[Row]:
    colours = ["red", "green", "blue, large", 'say "hi"']
    rows = []
    for i in range(1, n + 1):
        cents = rng.randrange(1, 10_000_000)
        rows.append(
            (
                i,
                f"item {i} {rng.choice(colours)}",
                f"{cents // 100}.{cents % 100:02d}",
                rng.randrange(0, 5000),
                f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
                rng.randrange(1, 100),
            )
        )
    return rows


def write_csv(path: Path, rows: list[Row]) -> Path:
    def cell(v: object) -> str:
        s = str(v)
        return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s

    path.write_text(HEADER + "\n" + "".join(",".join(map(cell, r)) + "\n" for r in rows))
    return path


def checksum(rows: list[Row]) -> str:
    text = "\n".join("|".join(str(v) for v in r) for r in sorted(rows))
    return hashlib.md5(text.encode()).hexdigest()


async def table_checksum(db: asyncpg.Connection, table: str) -> tuple[int, str | None]:
    record = await db.fetchrow(
        f"SELECT count(*) AS n, md5(string_agg(concat_ws('|', id, name, price, qty, day, version),"
        f" E'\\n' ORDER BY id)) AS sum FROM {table}"
    )
    return record["n"], record["sum"]


async def compare_items(db: asyncpg.Connection, table: str, rows: list[Row]) -> tuple[int, int]:
    """(lost, duplicated): expected rows missing or different; rows that should not be there."""
    got = await db.fetch(
        f"SELECT id, name, price::text AS price, qty, day::text AS day, version FROM {table}"
    )
    expected = {r[0]: r for r in rows}
    seen = Counter(r["id"] for r in got)
    duplicated = sum(n - 1 for n in seen.values()) + sum(1 for k in seen if k not in expected)
    by_id = {r["id"]: tuple(r.values()) for r in got}
    lost = sum(1 for k, v in expected.items() if by_id.get(k) != v)
    return lost, duplicated


async def file_counters(db: asyncpg.Connection, run: Run, n: int) -> list[str]:
    """Every counter of a run that imported ``n`` new unique rows, against its exact value."""
    want: dict[str, Any] = {
        "status": RunStatus.COMPLETED,
        "total_rows": n,
        "processed_rows": n,
        "created_rows": n,
        "updated_rows": 0,
        "unchanged_rows": 0,
        "skipped_rows": 0,
        "failed_rows": 0,
    }
    wrong = [f"{k}={getattr(run, k)} (want {v})" for k, v in want.items() if getattr(run, k) != v]
    outcome_sum = (
        run.created_rows + run.updated_rows + run.unchanged_rows + run.skipped_rows
    ) + run.failed_rows
    if outcome_sum != run.processed_rows:
        wrong.append(f"created+updated+unchanged+skipped+failed={outcome_sum}")
    if run.applied_batches != run.total_batches:
        wrong.append(f"applied_batches={run.applied_batches} of {run.total_batches}")
    markers = await db.fetchrow(
        "SELECT count(*) AS batches, coalesce(sum(rows), 0) AS rows,"
        " coalesce(sum(created + updated + unchanged + skipped + failed), 0) AS outcomes"
        " FROM sluice.batches WHERE run_id = $1",
        run.id,
    )
    if markers["batches"] != run.total_batches:
        wrong.append(f"batch markers={markers['batches']} of {run.total_batches}")
    if (markers["rows"], markers["outcomes"]) != (n, n):
        wrong.append(f"batch markers count {markers['rows']} rows, {markers['outcomes']} outcomes")
    return wrong


# ------------------------------------------------------------------------------ waiting


async def record_exactness(
    result: Result, db: asyncpg.Connection, table: str, rows: list[Row], run: Run, n: int
) -> None:
    """The rows lost and doubled in ``table`` against ``rows``, and ``run``'s counters that are
    not exact for ``n`` new rows, in ``result`` (each wrong counter in its notes)."""
    result.lost, result.duplicated = await compare_items(db, table, rows)
    wrong = await file_counters(db, run, n)
    result.counters_wrong = len(wrong)
    result.notes.extend(wrong)


async def resumptions(db: asyncpg.Connection, run_id: uuid.UUID) -> list[str]:
    """How the run was resumed (its run.resumed events), oldest first."""
    rows = await db.fetch(
        "SELECT payload->>'error' AS how FROM sluice.events WHERE run_id = $1"
        " AND type = 'run.resumed' ORDER BY id",
        run_id,
    )
    return [r["how"] for r in rows]


async def poll(
    what: str,
    check: Callable[[], Awaitable[Any]],
    stack: ChaosStack,
    timeout: float,
    interval: float = 0.1,
) -> Any:
    """``check()`` until it returns something true; fails with the workers' logs."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = await check()
            if value:
                return value
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last_error = exc  # PostgreSQL restarting under us
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout:.0f}s (seed {SEED}; last error {last_error!r})\n"
                f"{stack.logs()}"
            )
        await asyncio.sleep(interval)


async def finished(db: Db, run_id: uuid.UUID, stack: ChaosStack, timeout: float) -> Run:
    async def check() -> Run | None:
        conn = await db.get()
        record = await conn.fetchrow(f"SELECT {RUN_COLUMNS} FROM sluice.runs WHERE id = $1", run_id)
        run = run_from_record(record)
        return run if run.status.terminal else None

    run: Run = await poll(f"run {run_id} to finish", check, stack, timeout, interval=0.25)
    return run


async def applying_workers(db: asyncpg.Connection, table: str) -> set[str]:
    """Workers whose connection last ran a statement on ``table`` (pg_stat_activity keeps the
    last statement of an idle connection)."""
    rows = await db.fetch(
        "SELECT DISTINCT application_name FROM pg_stat_activity"
        " WHERE application_name LIKE 'chaos-worker%' AND query LIKE $1",
        f'%"{table}"%',
    )
    return {r["application_name"] for r in rows}


async def progress_to(
    db: Db,
    run_id: uuid.UUID,
    target: int,
    stack: ChaosStack,
    table: str,
    column: str = "processed_rows",
    timeout: float = 120,
) -> set[str]:
    """Until ``column`` of the run reaches ``target``, with both workers seen applying batches;
    returns the workers seen. Fails when the run finished first (the fault would be too late)."""
    seen: set[str] = set()

    async def check() -> bool:
        conn = await db.get()
        seen.update(await applying_workers(conn, table))
        row = await conn.fetchrow(
            f"SELECT status, {column} AS done FROM sluice.runs WHERE id = $1", run_id
        )
        assert row["status"] in ("queued", "running"), (
            f"the run is {row['status']} before the fault ({row['done']} of {target}):"
            " make the input larger"
        )
        return bool(row["done"] >= target and len(seen) == len(stack.workers))

    await poll(f"run {run_id} to reach {target} {column}", check, stack, timeout, 0.02)
    return seen


def log_mark(worker: Worker) -> int:
    return worker.log_path.stat().st_size if worker.log_path.exists() else 0


def log_since(worker: Worker, mark: int) -> str:
    with worker.log_path.open("rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")


def assigned_batches(worker: Worker, mark: int) -> set[int] | None:
    """The partitions of the batches topic Faust last assigned to ``worker`` (from its log)."""
    found = re.findall(
        r"Setting newly assigned partitions.*?\| sluice\.batches\s*\| \{([\d, -]*)\}",
        log_since(worker, mark),
        flags=re.DOTALL,
    )
    if not found:
        return None
    partitions: set[int] = set()
    for part in found[-1].split(","):  # "0, 2" or "0-3"
        first, _, last = part.strip().partition("-")
        if first:
            partitions.update(range(int(first), int(last or first) + 1))
    return partitions


async def lifecycle_lost(
    db: Db, stack: ChaosStack, run_id: uuid.UUID, since: datetime
) -> tuple[int, str]:
    """Lifecycle events of the run written to the outbox after ``since`` (so relayed to the
    restarted broker): how many the outbox marked relayed but the lifecycle topic does not have
    (lost), and how many are not relayed 10 s after the run finished (stuck)."""
    events: list[asyncpg.Record] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conn = await db.get()
        events = await conn.fetch(
            "SELECT event_id, type, relayed_at FROM sluice.events WHERE run_id = $1"
            " AND created_at > $2",
            run_id,
            since,
        )
        if all(e["relayed_at"] is not None for e in events):
            break
        await asyncio.sleep(0.2)
    relayed = [e for e in events if e["relayed_at"] is not None]
    seen: set[str] = set()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.broker.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        # The topic watch recreates a lost lifecycle topic within a few of its intervals and
        # relays again what went to the lost one: wait for that, as a subscriber would.
        deadline = time.monotonic() + 20
        while not (exists := TOPICS.lifecycle in await consumer.topics()):
            if not relayed or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if relayed and exists:
            consumer.subscribe([TOPICS.lifecycle])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    seen.update(orjson.loads(r.value)["event_id"] for r in records)
                if not batch and consumer.assignment():
                    ends = await consumer.end_offsets(list(consumer.assignment()))
                    positions = {tp: await consumer.position(tp) for tp in ends}
                    if all(positions[tp] >= end for tp, end in ends.items()):
                        break
    finally:
        await consumer.stop()
    lost = [e["type"] for e in relayed if str(e["event_id"]) not in seen]
    stuck = [e["type"] for e in events if e["relayed_at"] is None]
    return len(lost), (
        f"{len(events)} written, {len(lost)} marked relayed but not on the topic"
        f" {dict(Counter(lost))}, {len(stuck)} not relayed {dict(Counter(stuck))}"
        f" (lifecycle topic {'exists' if exists else 'missing'})"
    )


def seconds_since(fault_at: float, run: Run) -> float:
    assert run.completed_at is not None
    return round(run.completed_at.timestamp() - fault_at, 2)


# ------------------------------------------------------------------------------ cases


async def test_sigkill_of_one_of_two_workers_during_a_file_import(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """Both workers apply batches; one is SIGKILLed at a random point and stays down until the
    other has taken over every batches partition (its session expired), then a random pause
    more, then it starts again."""
    rng = case_rng("kill-file", chaos_round)
    n = 60_000
    rows = make_rows(n, rng)
    path = write_csv(tmp_path / "kill.csv", rows)
    with recorded(
        chaos_report, "SIGKILL of 1 of 2 workers, file import (partitions move)", chaos_round
    ) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_kill")
        run = await chaos_client.submit_file("chaos_kill", path)
        target = int(n * rng.uniform(0.1, 0.6))
        victim = rng.choice(chaos_stack.workers)
        survivor = next(w for w in chaos_stack.workers if w is not victim)
        pause = rng.uniform(0.0, 3.0)
        seen = await progress_to(chaos_db, run.id, target, chaos_stack, "chaos_kill")
        before = assigned_batches(survivor, 0)
        mark = log_mark(survivor)
        at = await conn.fetchval("SELECT processed_rows FROM sluice.runs WHERE id = $1", run.id)
        victim.kill()
        fault_at = time.time()

        async def taken_over() -> bool:
            return assigned_batches(survivor, mark) == set(range(PARTITIONS))

        await poll(f"{survivor.name} to take every partition", taken_over, chaos_stack, 90)
        moved_after = time.time() - fault_at
        await asyncio.sleep(pause)
        applied_alone = await conn.fetchval(
            "SELECT count(*) FROM sluice.batches WHERE run_id = $1 AND applied_at > $2",
            run.id,
            datetime.fromtimestamp(fault_at, UTC),
        )
        victim.start()
        result.notes.append(
            f"killed {victim.name} at {at}/{n} rows (applying before: {sorted(seen)});"
            f" {survivor.name} went from batches partitions {sorted(before or ())} to all"
            f" {PARTITIONS} after {moved_after:.1f}s and applied {applied_alone} batches alone;"
            f" {victim.name} restarted {pause:.1f}s later"
        )
        done = await finished(chaos_db, run.id, chaos_stack, timeout=240)
        result.recover_seconds = seconds_since(fault_at, done)
        conn = await chaos_db.get()
        await record_exactness(result, conn, "chaos_kill", rows, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert_clean(result, chaos_stack)
        assert await table_checksum(conn, "chaos_kill") == (n, checksum(rows))


async def test_sigkill_of_both_workers_one_restarted_during_a_file_import(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """Both workers are SIGKILLed at once in the middle of an import; after a random pause one
    of them starts again and finishes the run alone (the other stays down until the end)."""
    rng = case_rng("kill-both", chaos_round)
    n = 40_000
    rows = make_rows(n, rng)
    path = write_csv(tmp_path / "kill-both.csv", rows)
    with recorded(chaos_report, "SIGKILL of both workers, one restarted", chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_kill")
        run = await chaos_client.submit_file("chaos_kill", path)
        target = int(n * rng.uniform(0.1, 0.6))
        pause = rng.uniform(0.0, 3.0)
        await progress_to(chaos_db, run.id, target, chaos_stack, "chaos_kill")
        at = await conn.fetchval("SELECT processed_rows FROM sluice.runs WHERE id = $1", run.id)
        for worker in chaos_stack.workers:
            worker.kill()
        fault_at = time.time()
        await asyncio.sleep(pause)
        back = rng.choice(chaos_stack.workers)
        back.start()
        result.notes.append(
            f"killed both at {at}/{n} rows; {back.name} restarted {pause:.1f}s later, alone"
        )
        done = await finished(chaos_db, run.id, chaos_stack, timeout=240)
        result.recover_seconds = seconds_since(fault_at, done)
        conn = await chaos_db.get()
        recoveries = await conn.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id)
        result.notes.append(f"resumed {recoveries} time(s) by the stall recovery")
        await record_exactness(result, conn, "chaos_kill", rows, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert recoveries == 0, "the run waited for the stall recovery"
        assert_clean(result, chaos_stack)
        assert await table_checksum(conn, "chaos_kill") == (n, checksum(rows))


async def test_sigkill_of_a_worker_during_an_api_run(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
) -> None:
    """A paginated API run (discovery, then per-item details) loses a worker at a random point:
    every item ends completed exactly once and nothing completed is fetched again."""
    rng = case_rng("kill-api", chaos_round)
    n = 400
    with recorded(chaos_report, "SIGKILL of a worker, API-source run", chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_api")
        api = FakeApi(n, port=chaos_stack.api_port, list_latency=0.3)
        with api:
            run = await chaos_client.trigger("chaos_api", {})
            target = rng.randint(n // 20, n * 6 // 10)
            victim = rng.choice(chaos_stack.workers)
            pause = rng.uniform(0.5, 6.0)

            async def reached() -> bool:
                c = await chaos_db.get()
                done = await c.fetchval(
                    "SELECT count(*) FROM sluice.items WHERE run_id = $1 AND status = 'completed'",
                    run.id,
                )
                status = await c.fetchval("SELECT status FROM sluice.runs WHERE id = $1", run.id)
                assert status in ("queued", "running"), f"the run is {status} before the kill"
                return bool(done >= target)

            await poll("API items to complete", reached, chaos_stack, 120, 0.02)
            victim.kill()
            fault_at = time.time()
            completed = {
                r["external_id"]
                for r in await conn.fetch(
                    "SELECT external_id FROM sluice.items WHERE run_id = $1"
                    " AND status = 'completed'",
                    run.id,
                )
            }
            pages = await conn.fetchval(
                "SELECT pages FROM sluice.discovery WHERE run_id = $1", run.id
            )
            result.notes.append(
                f"killed {victim.name} with {len(completed)}/{n} items completed, discovery at"
                f" page {pages}/{n // 50}; restarted after {pause:.1f}s"
            )
            await asyncio.sleep(pause)
            victim.start()
            done = await finished(chaos_db, run.id, chaos_stack, timeout=180)
            hits = api.snapshot()
        result.recover_seconds = seconds_since(fault_at, done)
        conn = await chaos_db.get()
        expected = {i: api.item(i) for i in api.ids}
        got = await conn.fetch("SELECT id, name, price::text AS price, updated_at FROM chaos_api")
        by_id = {r["id"]: r for r in got}
        result.lost = sum(
            1
            for i, item in expected.items()
            if i not in by_id
            or (by_id[i]["name"], by_id[i]["price"], by_id[i]["updated_at"])
            != (item["name"], item["price"], EPOCH + timedelta(hours=int(i[5:])))
        )
        states = await conn.fetch(
            "SELECT external_id, status FROM sluice.items WHERE run_id = $1", run.id
        )
        per_item = Counter(s["external_id"] for s in states)
        result.duplicated = (
            len(got)
            - len({r["id"] for r in got})
            + sum(1 for r in got if r["id"] not in expected)
            + sum(c - 1 for c in per_item.values())
        )
        want = {
            "status": RunStatus.COMPLETED,
            "items_discovered": n,
            "items_completed": n,
            "items_failed": 0,
            "processed_rows": n,
            "created_rows": n,
            "updated_rows": 0,
            "unchanged_rows": 0,
            "skipped_rows": 0,
            "failed_rows": 0,
        }
        wrong = [
            f"{k}={getattr(done, k)} (want {v})" for k, v in want.items() if getattr(done, k) != v
        ]
        not_completed = sum(1 for s in states if s["status"] != "completed")
        if not_completed or len(per_item) != n:
            wrong.append(f"{not_completed} items not completed, {len(per_item)} items of {n}")
        result.counters_wrong = len(wrong)
        result.notes.extend(wrong)
        again = {h.what for h in hits if h.kind == "detail" and h.time > fault_at} & completed
        result.notes.append(f"{len(again)} completed items fetched again")
        assert done.status is RunStatus.COMPLETED, done.error
        assert_clean(result, chaos_stack)
        assert not again, f"{len(again)} items completed before the kill were fetched again"


class Firehose:
    """A ``sluice firehose`` process reading the fake Jetstream, with a cursor of its own."""

    def __init__(self, stack: ChaosStack, url: str, name: str, log: Path) -> None:
        self.stack, self.url, self.name, self.log = stack, url, name, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **self.stack.env,
            "SLUICE_FIREHOSE_CURSOR_INTERVAL": "0.5",
            "SLUICE_FIREHOSE_NAME": self.name,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice", "firehose", "--url", self.url],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


async def records_state(
    conn: asyncpg.Connection, dids: list[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    rows = await conn.fetch(
        "SELECT uri, cid, record FROM atproto.records WHERE did = ANY($1::text[])", dids
    )
    return {r["uri"]: (r["cid"], r["record"]) for r in rows}  # jsonb decoded by the codec


def world_state(world: World, dids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {u: v for u, v in world.state().items() if u.split("/")[2] in dids}


async def test_sigkill_of_a_worker_during_firehose_and_backfill(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """Backfills of several repositories race the live firehose (the PDS keeps changing); a
    worker is SIGKILLed mid-way. At the end the records table equals the PDS."""
    rng = case_rng("kill-firehose", chaos_round)
    tag = f"{SEED % 100000:05d}r{chaos_round}"
    dids = [f"did:plc:chaos{tag}d{i}" for i in range(8)]
    world = World()
    for i, did in enumerate(dids):
        world.add_repo(did, f"chaos{i}.test", {POST: 200, LIKE: 100})
    initial = len(world_state(world, dids))
    stop = threading.Event()

    def mutate() -> None:
        live = random.Random(rng.random())
        while not stop.is_set():
            world.random_mutation(live, dids)
            time.sleep(0.02)

    jetstream_port = free_port()
    url = f"ws://127.0.0.1:{jetstream_port}/subscribe"
    firehose = Firehose(chaos_stack, url, f"chaos-{tag}", tmp_path / "firehose.log")
    with (
        recorded(chaos_report, "SIGKILL of a worker, firehose + backfill", chaos_round) as result,
        FakePds(world, port=chaos_stack.pds_port),
        FakeJetstream(world, port=jetstream_port) as jetstream,
    ):
        mutator = threading.Thread(target=mutate, daemon=True)
        try:
            firehose.start()
            assert await asyncio.to_thread(jetstream.wait_connected, 1, 60), firehose.tail()
            mutator.start()
            conn = await chaos_db.get()

            async def fresh() -> bool:
                c = await chaos_db.get()
                return bool(
                    await c.fetchval(
                        "SELECT count(*) FROM sluice.firehose_cursors WHERE name = $1"
                        " AND time_us IS NOT NULL AND updated_at > now() - interval '5 seconds'",
                        f"chaos-{tag}",
                    )
                )

            await poll("the firehose consumer to save a cursor", fresh, chaos_stack, 60)
            queued_at = time.time()
            assert await chaos_client.backfill(dids, requested_by="chaos") == dids
            target = int(initial * rng.uniform(0.15, 0.6))
            victim = rng.choice(chaos_stack.workers)
            pause = rng.uniform(0.5, 8.0)

            async def synced() -> bool:
                c = await chaos_db.get()
                got = await c.fetchval(
                    "SELECT coalesce(sum(records_synced + records_skipped), 0)"
                    " FROM sluice.backfill WHERE did = ANY($1::text[])",
                    dids,
                )
                completed = await c.fetchval(
                    "SELECT count(*) FROM sluice.backfill WHERE did = ANY($1::text[])"
                    " AND status = 'completed'",
                    dids,
                )
                assert completed < 2 * len(dids), "every backfill finished before the kill"
                return bool(got >= target)

            await poll("backfills to progress", synced, chaos_stack, 120, 0.02)
            victim.kill()
            fault_at = time.time()
            states = await conn.fetch(
                "SELECT status, count(*) AS n, sum(records_synced + records_skipped) AS synced"
                " FROM sluice.backfill WHERE did = ANY($1::text[]) GROUP BY status",
                dids,
            )
            result.notes.append(
                f"killed {victim.name} at {sum(s['synced'] for s in states)}/{initial} records"
                f" synced (collections: { {s['status']: s['n'] for s in states} }),"
                f" restarted after {pause:.1f}s"
            )
            await asyncio.sleep(pause)
            victim.start()

            async def backfilled() -> list[asyncpg.Record] | None:
                c = await chaos_db.get()
                latest: list[asyncpg.Record] = await c.fetch(
                    "SELECT DISTINCT ON (options->>'did') options->>'did' AS did, status, error"
                    " FROM sluice.runs WHERE importer = $1 AND options->>'did' = ANY($2::text[])"
                    " ORDER BY options->>'did', queued_at DESC",
                    BACKFILL,
                    dids,
                )
                running = await c.fetchval(
                    "SELECT count(*) FROM sluice.runs WHERE importer = $1"
                    " AND options->>'did' = ANY($2::text[]) AND status IN ('queued', 'running')",
                    BACKFILL,
                    dids,
                )
                if len(latest) == len(dids) and not running:
                    return latest
                return None

            latest = await poll("every backfill to finish", backfilled, chaos_stack, 180, 0.5)
        finally:
            stop.set()
            if mutator.is_alive():
                mutator.join()
        conn = await chaos_db.get()
        deadline = time.monotonic() + 90
        while True:
            got = await records_state(conn, dids)
            want = world_state(world, dids)
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        result.recover_seconds = round(time.time() - fault_at, 2)
        missing = set(want) - set(got)
        stale = {u for u in set(want) & set(got) if want[u] != got[u]}
        extra = set(got) - set(want)
        result.lost = len(missing) + len(stale)
        result.duplicated = len(extra)
        states = await conn.fetch(
            "SELECT did, collection, status FROM sluice.backfill WHERE did = ANY($1::text[])", dids
        )
        wrong = [
            f"{r['did']} backfill {r['status']}: {r['error']}"
            for r in latest
            if r["status"] != "completed"
        ]
        wrong += [
            f"{s['did']}/{s['collection']} {s['status']}"
            for s in states
            if s["status"] != "completed"
        ]
        if len(states) != 2 * len(dids):
            wrong.append(f"{len(states)} backfill states of {2 * len(dids)}")
        interrupted = await conn.fetchval(
            "SELECT count(*) FROM sluice.runs WHERE importer = $1"
            " AND options->>'did' = ANY($2::text[]) AND error LIKE 'interrupted%'",
            BACKFILL,
            dids,
        )
        result.counters_wrong = len(wrong)
        result.notes.extend(wrong)
        result.notes.append(
            f"{interrupted} backfill runs interrupted and resumed; {len(world.events)} live"
            f" events; backfills done {time.time() - queued_at:.0f}s after queueing;"
            f" missing {sorted(missing)[:2]} stale {sorted(stale)[:2]} extra {sorted(extra)[:2]}"
        )
        firehose_ok = firehose.alive
        firehose.stop()
        assert firehose_ok, f"the firehose consumer died:\n{firehose.tail()}"
        assert_clean(result, chaos_stack)


@pytest.mark.embedded
async def test_broker_restart_losing_its_topics_during_a_file_import(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """The broker stops in the middle of an import and comes back empty (no topics, no groups,
    no offsets). The run is resumed from PostgreSQL (stored file, batch markers). A worker
    process that exits is started again, as a supervisor would, and the report says so."""
    rng = case_rng("broker", chaos_round)
    n = 30_000
    rows = make_rows(n, rng)
    path = write_csv(tmp_path / "broker.csv", rows)
    with recorded(chaos_report, "broker restart (topics lost), file import", chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_broker")
        # Two subscribers follow the importer's runs across the restart, one in a group.
        followers = [
            Follower(Subscription(chaos_stack.settings(), importers="chaos_broker")),
            Follower(
                Subscription(
                    chaos_stack.settings(),
                    importers="chaos_broker",
                    group_id=f"chaos-follower-{uuid.uuid4().hex[:6]}",
                )
            ),
        ]
        for follower in followers:
            await follower.start()
        # Long histories on every partition: after the restart the followers' positions are
        # far past the end of the new, empty log, as for a subscriber of a busy cluster.
        await pad_lifecycle_topic(chaos_stack, chaos_db, per_partition=300)
        run = await chaos_client.submit_file("chaos_broker", path)
        target = int(n * rng.uniform(0.1, 0.6))
        down = rng.uniform(0.5, 3.0)
        await progress_to(chaos_db, run.id, target, chaos_stack, "chaos_broker")
        marks = {w.name: log_mark(w) for w in chaos_stack.workers}
        with Supervisor(chaos_stack) as supervisor:
            at = await conn.fetchval("SELECT processed_rows FROM sluice.runs WHERE id = $1", run.id)
            # A crash: SIGTERM lets Tansu serve on for seconds while it drains its clients.
            fault_at = time.time()
            chaos_stack.broker.kill()
            await asyncio.sleep(down)
            chaos_stack.broker.start()
            restarted_at = datetime.now(UTC)
            result.notes.append(f"broker SIGKILLed at {at}/{n} rows, down {down:.1f}s")
            done = await finished(chaos_db, run.id, chaos_stack, timeout=240)
        result.recover_seconds = seconds_since(fault_at, done)
        result.restarted_by_supervisor = bool(supervisor.restarts)
        result.notes.extend(supervisor.restarts)
        conn = await chaos_db.get()
        hows = await resumptions(conn, run.id)
        result.notes.append(f"resumed {len(hows)} time(s) by recovery")
        for worker in chaos_stack.workers:
            text = log_since(worker, marks[worker.name])
            errors = Counter(re.findall(r"\b([A-Z][A-Za-z]+(?:Error|Exception))\b", text))
            result.notes.append(f"{worker.name} after the restart: {dict(errors.most_common(4))}")
        # The relay marks an event relayed only once the broker acknowledged it.
        result.events_lost, detail = await lifecycle_lost(
            chaos_db, chaos_stack, run.id, restarted_at
        )
        result.notes.append(f"lifecycle events after the restart: {detail}")
        await record_exactness(result, conn, "chaos_broker", rows, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert_clean(result, chaos_stack)
        assert result.events_lost == 0, f"lifecycle events lost: {detail}"
        assert await table_checksum(conn, "chaos_broker") == (n, checksum(rows))
        # At most one round: the worker that recreated the topics resumed the run at once (a
        # second worker that recreated some of them too leaves it at that), and the stall
        # recovery (the backstop) had nothing left to do. No round at all is right too: the
        # workers may have fetched every batch before the broker went down.
        assert len(hows) <= 1 and all("the broker lost topics" in how for how in hows), hows
        # The subscribers that followed the run saw it complete, once each.
        for follower in followers:
            completed = await follower.wait_for(run.id, "run.completed", timeout=30)
            await follower.stop()
            assert completed == 1, (
                f"a subscriber (group {follower.subscription.group_id}) saw run.completed "
                f"{completed} times; it saw {follower.types(run.id)}"
            )


@pytest.mark.embedded
@pytest.mark.parametrize("loss", ["broker restart", "topics deleted"])
async def test_a_run_started_right_after_the_topics_were_lost_is_read_at_once(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
    loss: str,
) -> None:
    """The topics are lost between two runs: the broker comes back empty, or someone deleted
    them (the cluster, its consumer group and the group's members live on). Every worker still
    holds its positions in the old log, past the start of the new one where the next run's
    batches now go: they must be read at once (the workers rewind when the loss is recorded),
    not after the stall timeout re-sends the run."""
    rng = case_rng(f"between-{loss}", chaos_round)
    n = 20_000
    first, second = make_rows(n, rng), make_rows(n, rng)
    case = f"{loss} between runs (topics lost), the next run"
    with recorded(chaos_report, case, chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_broker")
        run = await chaos_client.submit_file("chaos_broker", write_csv(tmp_path / "a.csv", first))
        done = await finished(chaos_db, run.id, chaos_stack, timeout=120)
        assert done.status is RunStatus.COMPLETED, done.error
        await conn.execute("TRUNCATE chaos_broker")  # the next run creates every row again
        losses = await conn.fetchval("SELECT count(*) FROM sluice.topic_losses")
        with Supervisor(chaos_stack) as supervisor:
            fault_at = time.time()
            if loss == "broker restart":
                chaos_stack.broker.kill()
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                chaos_stack.broker.start()
            else:
                await delete_topics(chaos_stack)

            async def recorded_loss() -> bool:
                conn = await chaos_db.get()
                count = await conn.fetchval("SELECT count(*) FROM sluice.topic_losses")
                return bool(count > losses)

            await poll("the topic loss to be recorded", recorded_loss, chaos_stack, 60)
            path = write_csv(tmp_path / "b.csv", second)
            run = await chaos_client.submit_file("chaos_broker", path)
            done = await finished(chaos_db, run.id, chaos_stack, timeout=240)
        result.recover_seconds = seconds_since(fault_at, done)
        result.restarted_by_supervisor = bool(supervisor.restarts)
        conn = await chaos_db.get()
        hows = await resumptions(conn, run.id)
        result.notes.append(f"the next run resumed {len(hows)} time(s)")
        await record_exactness(result, conn, "chaos_broker", second, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert_clean(result, chaos_stack)
        # Read at once: the stall recovery did not have to send it again.
        assert hows == []


async def delete_topics(chaos_stack: ChaosStack) -> None:
    """Delete the deployment's topics, as an operator could; the broker stays up."""
    from sluice.streams import kafka as clients
    from sluice.streams.topics import Topics

    kafka = chaos_stack.settings().kafka
    admin = clients.admin(kafka)
    await admin.start()
    try:
        await admin.delete_topics([spec.name for spec in Topics.of(kafka).specs(kafka.partitions)])
    finally:
        await admin.close()


async def pad_lifecycle_topic(chaos_stack: ChaosStack, chaos_db: Db, per_partition: int) -> None:
    """Lifecycle events of another importer (copies of a real one), on every partition."""
    conn = await chaos_db.get()
    model = await conn.fetchval("SELECT payload FROM sluice.events ORDER BY id DESC LIMIT 1")
    template = orjson.loads(model) if isinstance(model, str) else dict(model)
    template["importer"] = "chaos_padding"
    producer = AIOKafkaProducer(bootstrap_servers=chaos_stack.broker.bootstrap, linger_ms=20)
    await producer.start()
    try:
        for partition in range(PARTITIONS):
            for _ in range(per_partition):
                value = orjson.dumps({**template, "event_id": str(uuid.uuid4())})
                await producer.send(TOPICS.lifecycle, value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


class Follower:
    """A lifecycle subscription read in the background, as a downstream service reads it."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.events: list[tuple[uuid.UUID, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.subscription.start()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.subscription:
            self.events.append((event.run_id, event.type))

    def types(self, run_id: uuid.UUID) -> list[str]:
        return [t for r, t in self.events if r == run_id]

    async def wait_for(self, run_id: uuid.UUID, type_: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while type_ not in self.types(run_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self.types(run_id).count(type_)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.subscription.aclose()


@pytest.mark.embedded
async def test_postgres_restart_during_a_file_import(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """PostgreSQL stops (fast shutdown: transactions in flight are aborted) and starts again on
    the same data directory and port; the workers reconnect and retry the batches in flight."""
    rng = case_rng("postgres", chaos_round)
    n = 30_000
    rows = make_rows(n, rng)
    path = write_csv(tmp_path / "pg.csv", rows)
    with recorded(chaos_report, "PostgreSQL restart, file import", chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_pg")
        run = await chaos_client.submit_file("chaos_pg", path)
        target = int(n * rng.uniform(0.1, 0.6))
        # Up to 4 s: past the upsert agent's retries (about 3 s) a batch is dead-lettered and
        # the run goes on through the recovery of stalled runs.
        down = rng.uniform(0.2, 4.0)
        await progress_to(chaos_db, run.id, target, chaos_stack, "chaos_pg")
        marks = {w.name: log_mark(w) for w in chaos_stack.workers}
        at = await conn.fetchval("SELECT processed_rows FROM sluice.runs WHERE id = $1", run.id)
        await chaos_db.close()
        fault_at = time.time()
        await asyncio.to_thread(chaos_stack.postgres.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(chaos_stack.postgres.start)
        back = time.time() - fault_at
        result.notes.append(f"stopped at {at}/{n} rows, back after {back:.1f}s")
        done = await finished(chaos_db, run.id, chaos_stack, timeout=180)
        result.recover_seconds = seconds_since(fault_at, done)
        retried = sum(
            len(re.findall(r"attempt \d+ failed", log_since(w, marks[w.name])))
            for w in chaos_stack.workers
        )
        conn = await chaos_db.get()
        recoveries = await conn.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id)
        result.notes.append(f"{retried} retried attempts in the workers' logs")
        result.notes.append(f"resumed {recoveries} time(s) by recovery")
        await record_exactness(result, conn, "chaos_pg", rows, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert all(w.alive for w in chaos_stack.workers), chaos_stack.logs()
        assert_clean(result, chaos_stack)
        assert await table_checksum(conn, "chaos_pg") == (n, checksum(rows))


async def test_postgres_sigkill_during_a_file_import(
    chaos_stack: ChaosStack,
    chaos_client: Client,
    chaos_report: Report,
    chaos_round: int,
    workers_up: None,
    chaos_db: Db,
    tmp_path: Path,
) -> None:
    """PostgreSQL is SIGKILLed (no shutdown: crash recovery at the next start) and started
    again after a random pause; the workers wait it out and the run ends exact."""
    rng = case_rng("postgres-kill", chaos_round)
    n = 30_000
    rows = make_rows(n, rng)
    path = write_csv(tmp_path / "pg-kill.csv", rows)
    with recorded(chaos_report, "PostgreSQL SIGKILL, file import", chaos_round) as result:
        conn = await chaos_db.get()
        await conn.execute("TRUNCATE chaos_pg")
        run = await chaos_client.submit_file("chaos_pg", path)
        target = int(n * rng.uniform(0.1, 0.6))
        down = rng.uniform(0.2, 4.0)
        await progress_to(chaos_db, run.id, target, chaos_stack, "chaos_pg")
        at = await conn.fetchval("SELECT processed_rows FROM sluice.runs WHERE id = $1", run.id)
        await chaos_db.close()
        fault_at = time.time()
        await asyncio.to_thread(chaos_stack.postgres.kill)
        await asyncio.sleep(down)
        await asyncio.to_thread(chaos_stack.postgres.start)
        back = time.time() - fault_at
        result.notes.append(f"SIGKILLed at {at}/{n} rows, back after {back:.1f}s")
        done = await finished(chaos_db, run.id, chaos_stack, timeout=180)
        result.recover_seconds = seconds_since(fault_at, done)
        conn = await chaos_db.get()
        recoveries = await conn.fetchval("SELECT recoveries FROM sluice.runs WHERE id = $1", run.id)
        result.notes.append(f"resumed {recoveries} time(s) by the stall recovery")
        await record_exactness(result, conn, "chaos_pg", rows, done, n)
        assert done.status is RunStatus.COMPLETED, done.error
        assert recoveries == 0, "the run waited for the stall recovery"
        assert all(w.alive for w in chaos_stack.workers), chaos_stack.logs()
        assert_clean(result, chaos_stack)
        assert await table_checksum(conn, "chaos_pg") == (n, checksum(rows))
