"""Prometheus metrics on the real stack: the two session workers serve theirs on their own
ports (tests/conftest.py gives each one), the API serves the runs queued and running."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from sluice.schemas.runs import Run
from sluice.service import Client
from sluice.streams import kafka as clients
from tests.conftest import ROOT, TOPICS, Stack, api_process, finish
from tests.support.prometheus import Samples, scrape

pytestmark = pytest.mark.stack

ROW_OUTCOMES = ("created", "updated", "unchanged", "skipped", "failed")
HEADER = "id,name,price,qty,day,version\n"


def workers(stack: Stack) -> Samples:
    """Both session workers' metrics, added up."""
    return scrape(*(w.metrics_url for w in stack.workers))


async def quiet(db: asyncpg.Connection, stack: Stack, timeout: float = 240.0) -> None:
    """Wait (for at most ``timeout``) until no run is queued or running and the workers' batch
    counters stand still: other tests' runs must not count into the deltas measured here."""
    deadline = time.monotonic() + timeout
    seen: list[float] = []
    while time.monotonic() < deadline:
        active = await db.fetchval(
            "SELECT count(*) FROM sluice.runs WHERE status IN ('queued', 'running')"
        )
        seen = [*seen[-2:], workers(stack).total("sluice_batches_total")]
        if active == 0 and len(seen) == 3 and len(set(seen)) == 1:
            return
        await asyncio.sleep(1.0)


async def others_since(db: asyncpg.Connection, since: datetime, mine: list[uuid.UUID]) -> int:
    """Batches and rejected rows of other runs written since ``since``."""
    return int(
        await db.fetchval(
            "SELECT (SELECT count(*) FROM sluice.batches WHERE applied_at >= $1"
            "   AND run_id <> ALL($2::uuid[]))"
            " + (SELECT count(*) FROM sluice.row_log WHERE created_at >= $1"
            "   AND run_id <> ALL($2::uuid[]))",
            since,
            mine,
        )
    )


async def import_files(client: Client, stack: Stack, tmp_path: Path, base: int) -> list[Run]:
    """Three runs into one table that between them create, update, leave unchanged, skip and
    reject rows (in the split and in PostgreSQL); their keys start after ``base``."""

    def row(i: int, name: str = "a", price: str = "1.00", qty: str = "1") -> str:
        return f"{base + i},{name},{price},{qty},2024-01-01,1\n"

    first = tmp_path / f"first{base}.csv"
    first.write_text(
        HEADER
        + "".join(row(i) for i in range(1, 61))
        + row(61, price="notanumber")  # rejected by the mapping, in the split
        + row(62, qty="3000000000")  # beyond integer: rejected by PostgreSQL
    )
    second = tmp_path / f"second{base}.csv"
    second.write_text(
        HEADER
        + "".join(row(i) for i in range(1, 31))  # unchanged
        + "".join(row(i, name="b") for i in range(31, 46))  # updated
        + "".join(row(i) for i in range(70, 80))  # created
    )
    third = tmp_path / f"third{base}.csv"
    third.write_text(HEADER + "".join(row(i, name="c") for i in range(1, 11)) + row(90))
    runs = []
    for slug, path in (("t_metrics", first), ("t_metrics", second), ("t_metrics_skip", third)):
        run = await client.submit_file(slug, path)
        runs.append(await finish(client, run, stack))
    return runs


@pytest.fixture(scope="module")
def measured() -> dict[str, object]:
    """What the first test measured, for the next one (prune-rows)."""
    return {}


async def test_worker_counters_count_the_runs_batches_and_rows(
    stack: Stack,
    client: Client,
    db: asyncpg.Connection,
    tmp_path: Path,
    measured: dict[str, object],
) -> None:
    mine: list[uuid.UUID] = []
    await quiet(db, stack)
    for attempt in range(3):  # measured again (other keys) if another run wrote batches
        # quiet() saw nothing running and the counters still for two seconds: a batch older
        # than this cannot count after the first scrape.
        since = await db.fetchval("SELECT now() - interval '2 seconds'")
        before = workers(stack)
        runs = await import_files(client, stack, tmp_path, base=1000 * attempt)
        after = workers(stack)
        mine += [r.id for r in runs]
        if not await others_since(db, since, mine):
            break
        await quiet(db, stack)
    else:
        pytest.fail("other runs kept writing batches; the deltas cannot be measured")

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert [r.status for r in runs] == ["completed_with_errors", "completed", "completed"]
    applied = sum(r.applied_batches for r in runs)
    assert applied >= 4
    assert delta("sluice_batches_total", outcome="applied") == applied
    for outcome in ROW_OUTCOMES:
        expected = sum(getattr(r, f"{outcome}_rows") for r in runs)
        assert expected > 0, f"the files were meant to give {outcome} rows"
        assert delta("sluice_rows_total", outcome=outcome, dry_run="false") == expected, outcome
    assert delta("sluice_rows_total", dry_run="true") == 0
    # One observation per applied batch in the latency histogram.
    assert delta("sluice_batch_apply_seconds_count") == applied
    assert after.types["sluice_batch_apply_seconds"] == "histogram"
    measured.update(runs=runs, after=after)


async def test_pruning_runs_takes_nothing_from_the_counters(
    stack: Stack, db: asyncpg.Connection, measured: dict[str, object]
) -> None:
    runs = measured.get("runs")
    assert isinstance(runs, list), "needs the runs of the test before"
    ids = [r.id for r in runs]
    # Only these runs are old enough: nothing else of the session goes.
    await db.execute(
        "UPDATE sluice.runs SET completed_at = now() - interval '400 days'"
        " WHERE id = ANY($1::uuid[])",
        ids,
    )
    pruned = subprocess.run(
        [sys.executable, "-m", "sluice", "prune-rows", "--days", "365"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 3 finished run(s)" in pruned.stdout
    assert not await db.fetchval("SELECT count(*) FROM sluice.runs WHERE id = ANY($1::uuid[])", ids)
    after = measured["after"]
    assert isinstance(after, Samples)
    now = workers(stack)
    for outcome in ROW_OUTCOMES:
        assert now.total("sluice_rows_total", outcome=outcome) >= after.total(
            "sluice_rows_total", outcome=outcome
        )
    applied = now.total("sluice_batches_total", outcome="applied")
    assert applied >= after.total("sluice_batches_total", outcome="applied") > 0


async def test_a_dead_letter_is_counted_by_its_source_topic(stack: Stack, client: Client) -> None:
    def dead() -> tuple[float, float]:
        samples = workers(stack)
        return (
            samples.total("sluice_dead_letters_total", topic=TOPICS.batches),
            samples.total("sluice_batches_total", outcome="dead"),
        )

    letters, batches = dead()
    producer = clients.producer(stack.settings().kafka)
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS.batches, b"[]", key=b"not-a-batch-key")
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while dead() == (letters, batches):
        assert time.monotonic() < deadline, f"no dead letter counted:\n{stack.logs()}"
        await asyncio.sleep(0.5)
    assert dead() == (letters + 1, batches + 1)


async def test_consumer_lag_has_every_partition_of_the_batches_topic(
    stack: Stack, client: Client
) -> None:
    """Each worker reports the partitions it has; together they have all of them."""
    deadline = time.monotonic() + 60
    while True:
        lag = workers(stack).series("sluice_consumer_lag", group="sluice", topic=TOPICS.batches)
        partitions = sorted(int(dict(labels)["partition"]) for labels in lag)
        if partitions == [0, 1, 2, 3]:
            break
        assert time.monotonic() < deadline, f"lag reported for partitions {partitions}"
        await asyncio.sleep(1.0)
    assert all(value >= 0 for value in lag.values())


@pytest.fixture
def public_api(stack: Stack, tmp_path: Path) -> Iterator[str]:
    with api_process(
        stack, tmp_path / "api.log", SLUICE_API_TOKEN="t-" + uuid.uuid4().hex,
        SLUICE_API_PUBLIC_METRICS="true",
    ) as url:  # fmt: skip
        yield url


async def test_the_api_counts_queued_and_running_runs(
    stack: Stack, client: Client, db: asyncpg.Connection, public_api: str
) -> None:
    await quiet(db, stack)

    def active() -> tuple[float, float]:
        samples = scrape(f"{public_api}/metrics")  # public: SLUICE_API_PUBLIC_METRICS=true
        assert not samples.has("sluice_rows_total")  # the workers' counters are not here
        return (
            samples.total("sluice_runs_active", status="queued"),
            samples.total("sluice_runs_active", status="running"),
        )

    queued, running = active()
    runs = (await client.deps()).runs
    # A run nobody asks a worker for: it stays queued until it is cancelled.
    run = await runs.create(importer="t_metrics", source="file")
    try:
        assert active() == (queued + 1, running)
        await runs.start(run.id)
        assert active() == (queued, running + 1)
    finally:
        await runs.cancel(run.id)
    assert active() == (queued, running)
    requests = scrape(f"{public_api}/metrics")
    assert requests.total("sluice_api_requests_total", route="/metrics", status="200") >= 4


def test_a_taken_metrics_port_stops_the_worker_at_start(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = subprocess.run(
            [sys.executable, "-m", "sluice", "worker"],
            cwd=ROOT,
            env={**stack.env, "SLUICE_METRICS_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert worker.returncode != 0
    assert f"127.0.0.1:{port}" in worker.stderr and "SLUICE_METRICS_PORT" in worker.stderr


def test_metrics_of_a_worker_are_plain_http(stack: Stack) -> None:
    """What Prometheus scrapes: no token, the text format, the process's own series."""
    response = httpx.get(stack.workers[0].metrics_url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = Samples([response.text])
    assert samples.types["sluice_batches"] == "counter"
    assert samples.total("process_resident_memory_bytes") > 0


def test_the_dashboard_and_the_readme_name_the_metrics_served(
    stack: Stack, public_api: str
) -> None:
    served = workers(stack).names() | scrape(f"{public_api}/metrics").names()
    ours = {name for name in served if name.startswith("sluice_")}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    queries = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(queries) >= 10
    for target in queries:
        assert target["datasource"]["uid"] == "${datasource}"
        used = set(re.findall(r"\bsluice_[a-z_]+", target["expr"]))
        assert used and used <= ours, target["expr"]
    readme = (ROOT / "README.md").read_text()
    metrics = readme[readme.index("## Metrics") : readme.index("## Configuration")]
    listed = {name for name in ours if not name.endswith(("_bucket", "_count", "_sum"))}
    for name in listed:
        assert f"`{name}`" in metrics, f"{name} is not in the README's Metrics section"
