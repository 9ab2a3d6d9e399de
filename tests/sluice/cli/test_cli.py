"""The ``sluice`` command line, run as a real process against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from sluice.schemas.runs import Run
from sluice.service import Client
from sluice.stack import find_process_alive, read_state
from tests.conftest import ROOT, TOPICS, Stack
from tests.support.cli import sluice, starting_up

pytestmark = pytest.mark.stack

RUN_FIELDS = {
    "id", "importer", "source", "status", "dry_run", "total_rows", "processed_rows",
    "created_rows", "updated_rows", "unchanged_rows", "skipped_rows", "failed_rows",
    "progress_percent", "queued_at", "started_at", "completed_at", "error", "parent_run_id",
    "requested_by",
}  # fmt: skip


FILE = (
    "ID,Item Name,Unit Price,Quantity,Date,version\n"
    "1,apple,1.20,10,2024-05-01,1\n"
    "2,=SUM(A1),0.80,oops,2024-05-01,1\n"
    "3,plum,2.00,5,2024-05-02,1\n"
)


async def test_run_wait_json_and_status(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute("TRUNCATE t_cli")
    path = tmp_path / "fruit.csv"
    path.write_text(FILE)

    dry = sluice(
        "run", "t_cli", "--file", str(path), "--dry-run", "--wait", "--json", env=stack.env
    )
    assert dry.returncode == 3, dry.stderr  # completed with errors: one row rejected
    projected = json.loads(dry.stdout)
    assert projected["dry_run"] is True
    assert (projected["created_rows"], projected["failed_rows"]) == (2, 1)
    assert await db.fetchval("SELECT count(*) FROM t_cli") == 0

    done = sluice("run", "t_cli", "--file", str(path), "--wait", "--json", env=stack.env)
    assert done.returncode == 3, done.stderr
    run = json.loads(done.stdout)
    assert RUN_FIELDS <= set(run)
    assert run["status"] == "completed_with_errors"
    assert (run["total_rows"], run["processed_rows"], run["created_rows"]) == (3, 3, 2)
    assert run["failed_rows"] == 1 and run["progress_percent"] == 100
    assert run["source"] == "file" and run["requested_by"]
    assert await db.fetchval("SELECT count(*) FROM t_cli") == 2

    status = sluice("status", run["id"], "--json", env=stack.env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == run
    human = sluice("status", run["id"], env=stack.env)
    assert "completed_with_errors" in human.stdout and "created 2" in human.stdout

    rejected = sluice("failed-rows", run["id"], env=stack.env)
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stdout.startswith("row 2: ") and "qty" in rejected.stdout
    exported = sluice("failed-rows", run["id"], "--csv", env=stack.env)
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(table) == 1 and table[0]["row_number"] == "2"
    assert table[0]["name"] == "'=SUM(A1)"  # a formula is neutralised for spreadsheets
    assert table[0]["qty"] == "oops" and "qty" in table[0]["reason"]


async def test_import_without_an_importer_infers_the_table(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    table = f"adhoc_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "stations.tsv"
    path.write_text(
        "Station Code\tName\tOpened\tPlatforms\tLat\n"
        "KGX\tKing's Cross\t1852-10-14\t12\t51.5308\n"
        "PAD\tPaddington\t1854-01-16\t14\t51.5154\n"
    )
    args = ["import", str(path), "--into", table, "--key", "Station Code", "--wait", "--json"]
    first = sluice(*args, env=stack.env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["created_rows"] == 2
    types = dict(
        await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
            table,
        )
    )
    assert types == {
        "station_code": "text",
        "name": "text",
        "opened": "date",
        "platforms": "bigint",
        "lat": "numeric",
    }
    again = sluice(*args, env=stack.env)
    assert json.loads(again.stdout)["unchanged_rows"] == 2


def test_errors_say_what_to_fix(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("id,name\n1,a\n")
    unknown = sluice("run", "no_such_importer", "--file", str(path), env=stack.env)
    assert unknown.returncode == 1
    assert "no_such_importer" in unknown.stderr and "t_cli" in unknown.stderr  # lists known ones
    missing = sluice("run", "t_cli", "--file", str(tmp_path / "nope.csv"), env=stack.env)
    assert missing.returncode == 1 and "nope.csv" in missing.stderr
    bad_id = sluice("status", "not-a-uuid", env=stack.env)
    assert bad_id.returncode == 2 and "not a run id" in bad_id.stderr
    no_run = sluice("status", str(uuid.uuid4()), env=stack.env)
    assert no_run.returncode == 1 and "no run" in no_run.stderr
    env = {k: v for k, v in stack.env.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(tmp_path / "nothing-here")
    nostack = sluice("run", "t_cli", "--file", str(path), env=env)
    assert nostack.returncode == 1 and "sluice up" in nostack.stderr


async def test_lifecycle_events_reach_the_topic_in_order(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    path = tmp_path / "fruit.csv"
    path.write_text(FILE)
    run = await client.submit_file("t_cli", path)
    consumer = AIOKafkaConsumer(
        TOPICS.lifecycle,
        bootstrap_servers=stack.broker.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    seen: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(60):
            while not seen or seen[-1]["type"] not in ("run.completed", "run.failed"):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        try:
                            event = orjson.loads(record.value)
                        except orjson.JSONDecodeError:
                            continue  # poison another test produced; the workers dead-letter it
                        if event["run_id"] == str(run.id):
                            assert record.key == str(run.id).encode()
                            seen.append(event)
    finally:
        await consumer.stop()
    types = [e["type"] for e in seen]
    assert types[0] == "run.started" and types[-1] == "run.completed"
    assert set(types) <= {"run.started", "run.progress", "run.completed"}
    final = seen[-1]
    assert final["status"] == "completed_with_errors"
    counters = final["counters"]
    assert isinstance(counters, dict)
    assert (counters["processed_rows"], counters["failed_rows"]) == (3, 1)
    assert len({e["event_id"] for e in seen}) == len(seen)


@pytest.mark.embedded
def test_up_env_run_down(tmp_path: Path) -> None:
    """`sluice up --detach` starts everything under SLUICE_HOME; other commands find it, with
    the importers it was started with."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(home)
    # An importer module of the user's own, in the folder the stack is started from.
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "my_meters.py").write_text(
        "from sluice.schemas.importers import Field, Importer\n"
        "readings = Importer(slug='my_readings', table='my_readings', key=('mpan',),"
        " fields=(Field('mpan', 'text', required=True), Field('kwh', 'numeric')))\n"
    )
    up_env = {**env, "SLUICE_IMPORTERS": "my_meters"}
    with starting_up():
        up = sluice("up", "--detach", env=up_env, cwd=mine, timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        state = read_state(home)
        assert state is not None
        hint = f"dashboard: {state.api_url}/ui/ (sign in with the token in {home.resolve()}"
        assert hint in up.stdout
        shown = sluice("env", env=env)
        assert f"SLUICE_KAFKA_BOOTSTRAP={state.kafka_bootstrap}" in shown.stdout
        assert f"SLUICE_DATABASE_URL={state.database_url}" in shown.stdout
        assert f"SLUICE_API_URL={state.api_url}" in shown.stdout
        assert "SLUICE_IMPORTERS=my_meters" in shown.stdout
        # From another folder and shell, without SLUICE_IMPORTERS: the stack's importers.
        listed = sluice("importers", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert "my_readings" in {i["slug"] for i in json.loads(listed.stdout)}
        token = (home / "api_token").read_text().strip()
        assert f"SLUICE_API_TOKEN={token}" in shown.stdout and len(token) >= 32
        assert (home / "api_token").stat().st_mode & 0o077 == 0  # readable by its owner only
        assert httpx.get(f"{state.api_url}/healthz", timeout=10).status_code == 200

        sample = ROOT / "sluice" / "samples" / "products.csv"
        run = sluice("run", "products", "--file", str(sample), "--wait", "--json", env=env)
        assert run.returncode == 3, run.stdout + run.stderr
        result = json.loads(run.stdout)
        assert result["failed_rows"] > 0 and result["created_rows"] > 100
        assert result["processed_rows"] == result["total_rows"]

        # The HTTP API of the same stack: upload, follow, and its errors.
        with httpx.Client(
            base_url=state.api_url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            sent = http.post(
                "/api/v1/imports/products/upload",
                files={"file": ("products.csv", sample.read_bytes(), "text/csv")},
                data={"dry_run": "true"},
            )
            assert sent.status_code == 202, sent.text
            run_id = sent.json()["id"]
            assert sent.json()["status"] == "queued" and sent.json()["dry_run"] is True
            for _ in range(200):
                got = http.get(f"/api/v1/runs/{run_id}").json()
                if got["status"] not in ("queued", "running"):
                    break
                time.sleep(0.1)
            assert got["status"] == "completed_with_errors"
            assert got["unchanged_rows"] == result["created_rows"]  # dry run of the same file
            unknown = http.post(
                "/api/v1/imports/nope/upload", files={"file": ("a.csv", b"a\n1\n", "text/csv")}
            )
            assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
            late = http.post(f"/api/v1/runs/{run_id}/cancel")
            assert late.status_code == 409 and late.json()["error"]["code"] == "conflict"
            assert http.get(f"/api/v1/runs/{uuid.uuid4()}").status_code == 404
            assert http.get("/readyz").json() == {"status": "ready"}
    finally:
        down = sluice("down", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert read_state(home) is None
    assert not any(find_process_alive(pid) for pid in state.pids.values())
    assert (home / "pg").is_dir()  # the data stays for the next `sluice up`


@pytest.mark.embedded
def test_up_in_the_foreground_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import time

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(home)
    # A named token of its own: the stack's API takes it as configured, name included.
    token = f"up-{uuid.uuid4().hex}"
    env["SLUICE_API_TOKENS"] = f"operator:{token}"
    with starting_up():
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "up"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while (state := read_state(home)) is None and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.2)
    try:
        assert state is not None, proc.communicate()[0]
        sent = httpx.post(
            f"{state.api_url}/api/v1/imports/products/upload",
            files={"file": ("p.csv", b"sku,name\n", "text/csv")},
            data={"dry_run": "true"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert sent.status_code == 202, sent.text
        assert sent.json()["requested_by"] == "operator"
        assert not (home / "api_token").exists()  # no token made: one is configured
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SLUICE_DATABASE_URL=" in out and "Ctrl-C" in out
    assert f"dashboard: {state.api_url}/ui/ (sign in with one of the tokens in" in out
    assert not any(find_process_alive(pid) for pid in state.pids.values())
    assert not (home / "stack.json").exists()


async def test_cancel_in_the_middle_stops_the_run_and_the_counters_match(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from tests.support.rows import make_rows, write_csv

    await db.execute("TRUNCATE t_cancel")
    rows = make_rows(150_000, seed=21)
    # Rows the split rejects, all through the file: their counters change in the split's own
    # transactions, which must stop with the cancel as the batches' do.
    rows = [(*r[:3], "abc", *r[4:]) if r[0] % 500 == 0 else r for r in rows]
    path = write_csv(tmp_path / "big.csv", rows)
    run = await client.submit_file("t_cancel", path)
    # Until rows were applied and rejected: the split logs its rejections in groups, at each
    # progress report (every second), so the first batches may land before the first of them.
    for _ in range(600):
        current = await client.get_run(run.id)
        if (current.processed_rows > 0 and current.failed_rows > 0) or current.status.terminal:
            break
        await asyncio.sleep(0.05)
    assert current.status.value == "running"

    cancelled = await asyncio.to_thread(sluice, "cancel", str(run.id), "--json", env=stack.env)
    assert cancelled.returncode == 0, cancelled.stderr
    snapshot = json.loads(cancelled.stdout)
    assert snapshot["status"] == "cancelled"
    # While the batches still on the topic are consumed and skipped, and past the point where
    # recovery would take the run for stalled (the stack's SLUICE_STALL_TIMEOUT is 15 s, its
    # rounds every 2 s), the counters stay what the cancel reported.
    stable_until = time.monotonic() + 21
    while True:
        final = await client.get_run(run.id)
        assert final.status.value == "cancelled"
        # The cancel waited for the batch in flight: what it reported is what stays,
        # rejected rows included.
        assert final.processed_rows == snapshot["processed_rows"] < 150_000
        assert final.failed_rows == snapshot["failed_rows"] > 0
        assert final.created_rows == snapshot["created_rows"]
        if time.monotonic() >= stable_until:
            break
        await asyncio.sleep(3)
    # The run.cancelled event carries the same final counters.
    event = await db.fetchval(
        "SELECT payload FROM sluice.events WHERE run_id = $1 AND type = 'run.cancelled'", run.id
    )
    counters = (event if isinstance(event, dict) else json.loads(event))["counters"]
    assert (counters["processed_rows"], counters["failed_rows"]) == (
        final.processed_rows,
        final.failed_rows,
    )
    logged = await db.fetchval("SELECT count(*) FROM sluice.row_log WHERE run_id = $1", run.id)
    assert logged == final.failed_rows
    in_table = await db.fetchval("SELECT count(*) FROM t_cancel")
    assert in_table == final.created_rows + final.updated_rows
    assert final.processed_rows == final.created_rows + final.failed_rows

    again = await asyncio.to_thread(sluice, "cancel", str(run.id), env=stack.env)
    assert again.returncode == 1 and "only queued or running" in again.stderr
    listed = await asyncio.to_thread(
        sluice, "runs", "--status", "cancelled", "--importer", "t_cancel", "--json", env=stack.env
    )
    assert run.id.hex in {uuid.UUID(r["id"]).hex for r in json.loads(listed.stdout)}
    events = await db.fetch("SELECT type FROM sluice.events WHERE run_id = $1 ORDER BY id", run.id)
    assert events[-1]["type"] == "run.cancelled"


async def test_ctrl_c_during_wait_leaves_the_run_going_or_cancels_it_when_asked(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    from tests.support.rows import make_rows, write_csv

    path = write_csv(tmp_path / "long.csv", make_rows(60_000, seed=22))

    async def interrupt(*flags: str) -> tuple[int, str, Run]:
        command = [sys.executable, "-m", "sluice", "run", "t_cancel", "--file", str(path)]
        before = {r.id for r in await client.list_runs(importer="t_cancel", limit=500)}
        proc = subprocess.Popen(
            [*command, "--wait", *flags],
            cwd=ROOT,
            env=stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(1200):  # until the run is under way (the command is waiting)
                new = await client.list_runs(importer="t_cancel", limit=500)
                run = next((r for r in new if r.id not in before and r.processed_rows), None)
                if run is not None:
                    break
                await asyncio.sleep(0.05)
            assert run is not None and run.status.value == "running"
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode, err, run

    code, err, run = await interrupt()
    assert code == 130, err
    assert f"run {run.id} goes on in the background" in err
    assert f"sluice status {run.id}" in err and f"sluice cancel {run.id}" in err
    done = await client.wait(run.id)
    assert done.status.value == "completed" and done.processed_rows == 60_000

    code, err, run = await interrupt("--cancel-on-interrupt")
    assert code == 5, err  # the exit code of a cancelled run
    assert (await client.get_run(run.id)).status.value == "cancelled"
    assert f"interrupted: run {run.id} is cancelled" in err


def test_importers_and_runs_listing(stack: Stack, client: Client) -> None:
    shown = sluice("importers", env=stack.env)
    assert shown.returncode == 0, shown.stderr
    assert any(
        line.startswith("products") and "key (sku)" in line and "policy upsert" in line
        for line in shown.stdout.splitlines()
    )
    defs = {d["slug"]: d for d in json.loads(sluice("importers", "--json", env=stack.env).stdout)}
    assert defs["meter_readings"]["key"] == ["meter", "day", "period"]
    assert defs["t_skip"]["policy"] == "skip"
    table = sluice("runs", "--limit", "5", env=stack.env)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 6  # header + 5 runs
    misplaced = sluice("run", "products", "products.csv", env=stack.env)
    assert misplaced.returncode == 2
    assert "the file goes in --file: sluice run products --file products.csv" in misplaced.stderr
    for command in ("run", "trigger", "status", "runs", "retry", "failed-rows"):
        helped = sluice(command, "--help", env=stack.env)
        assert helped.returncode == 0 and "Example" in helped.stdout, (command, helped.stdout)
    bad = sluice("runs", "--status", "sleeping", env=stack.env)
    assert bad.returncode == 2 and "sleeping" in bad.stderr
    both = sluice(
        "runs", "--status", "completed,cancelled", "--limit", "500", "--json", env=stack.env
    )
    assert both.returncode == 0, both.stderr
    listed = json.loads(both.stdout)
    statuses = {r["status"] for r in listed}
    assert statuses and statuses <= {"completed", "cancelled"}
    clean = next(r for r in listed if r["status"] == "completed" and r["failed_rows"] == 0)
    none = sluice("failed-rows", clean["id"], env=stack.env)
    assert none.returncode == 0 and none.stdout == ""
    assert f"run {clean['id']} rejected no rows" in none.stderr and "ended completed" in none.stderr


async def test_retry_lands_rows_once_the_cause_is_fixed(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    from tests.support.rows import checksum, make_rows, table_checksum, write_csv

    await db.execute("TRUNCATE t_retry")
    await db.execute("ALTER TABLE t_retry DROP CONSTRAINT IF EXISTS qty_limit")
    await db.execute("ALTER TABLE t_retry ADD CONSTRAINT qty_limit CHECK (qty < 4000)")
    rows = make_rows(2000, seed=33)
    too_big = sum(1 for r in rows if r[3] >= 4000)
    assert too_big > 10
    path = write_csv(tmp_path / "rows.csv", rows)
    parent = await client.wait((await client.submit_file("t_retry", path)).id, timeout=120)
    assert parent.status.value == "completed_with_errors"
    assert (parent.created_rows, parent.failed_rows) == (2000 - too_big, too_big)
    reason = await db.fetchval("SELECT reason FROM sluice.row_log WHERE run_id = $1", parent.id)
    assert "qty_limit" in reason

    await db.execute("ALTER TABLE t_retry DROP CONSTRAINT qty_limit")  # the fix
    dry = await asyncio.to_thread(
        sluice, "retry", str(parent.id), "--dry-run", "--wait", "--json", env=stack.env
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["created_rows"] == too_big
    done = await asyncio.to_thread(
        sluice, "retry", str(parent.id), "--wait", "--json", env=stack.env
    )
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    assert child["parent_run_id"] == str(parent.id) and child["source"] == "retry"
    assert (child["total_rows"], child["created_rows"], child["failed_rows"]) == (
        too_big,
        too_big,
        0,
    )
    assert await table_checksum(db, "t_retry") == (2000, checksum(rows))

    nothing = await asyncio.to_thread(sluice, "retry", child["id"], env=stack.env)
    assert nothing.returncode == 1 and "no rejected rows" in nothing.stderr


async def test_prune_files_and_rows(
    stack: Stack, client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "fruit.csv"
    path.write_text(FILE)
    old = await client.wait((await client.submit_file("t_cli", path)).id, timeout=120)
    recent = await client.wait((await client.submit_file("t_cli", path)).id, timeout=120)
    assert old.failed_rows == 1 and old.file_id is not None
    await db.execute(
        "UPDATE sluice.runs SET completed_at = now() - interval '40 days' WHERE id = $1", old.id
    )
    await db.execute(
        "UPDATE sluice.files SET created_at = now() - interval '40 days' WHERE id = $1",
        old.file_id,
    )

    files = await asyncio.to_thread(sluice, "prune-files", "--hours", "24", env=stack.env)
    assert files.returncode == 0, files.stderr
    assert "deleted 1 stored file" in files.stdout
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", old.file_id) == 0
    assert await db.fetchval("SELECT file_id FROM sluice.runs WHERE id = $1", old.id) is None
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", recent.file_id) == 1

    rows = await asyncio.to_thread(sluice, "prune-rows", "--days", "30", env=stack.env)
    assert rows.returncode == 0, rows.stderr
    assert "deleted 1 finished run(s) and 1 rejected row(s)" in rows.stdout
    assert await db.fetchval("SELECT count(*) FROM sluice.runs WHERE id = $1", old.id) == 0
    assert await db.fetchval("SELECT count(*) FROM sluice.row_log WHERE run_id = $1", old.id) == 0
    assert await db.fetchval("SELECT count(*) FROM sluice.runs WHERE id = $1", recent.id) == 1


def test_trigger_items_and_schedules(stack: Stack) -> None:
    from tests.support.servers.paginated_api import FakeApi

    (stack.files / "cli-trigger.csv").write_text(FILE)
    pulled = sluice(
        "trigger", "t_fs", "--path", "cli-trigger.csv", "--wait", "--json", env=stack.env
    )
    assert pulled.returncode == 3, pulled.stderr  # one row rejected
    run = json.loads(pulled.stdout)
    assert run["source"] == "filesystem" and run["created_rows"] + run["updated_rows"] == 2

    refused = sluice("trigger", "t_url", "--url", "http://169.254.169.254/", env=stack.env)
    assert refused.returncode == 1 and "169.254.169.254" in refused.stderr
    assert sluice("trigger", "t_fs", "--param", "oops", env=stack.env).returncode == 2

    api = FakeApi(25, port=stack.api_port, missing={"item-00003"})
    with api:
        done = sluice("trigger", "t_api_small", "--wait", "--json", env=stack.env)
    assert done.returncode == 3, done.stderr
    run = json.loads(done.stdout)
    assert (run["items_discovered"], run["items_completed"], run["items_failed"]) == (25, 24, 1)
    failed = sluice("items", run["id"], "--status", "failed", "--json", env=stack.env)
    assert failed.returncode == 0, failed.stderr
    rows = [json.loads(line) for line in failed.stdout.splitlines()]
    assert [r["external_id"] for r in rows] == ["item-00003"]
    assert "HTTP 404" in rows[0]["last_error"]
    status = sluice("status", run["id"], env=stack.env)
    assert "items: 25 discovered  24 completed  1 failed" in status.stdout

    listed = sluice("schedules", "--json", env=stack.env)
    assert listed.returncode == 0, listed.stderr
    sched = {s["importer"]: s for s in json.loads(listed.stdout)}
    assert sched["t_sched"]["cron"] == "* * * * * */2" and sched["t_sched"]["paused"] is True
    assert sluice("schedules", "pause", "t_exact", env=stack.env).returncode == 1
