"""Benchmark: a paginated API source at the rate the API allows.

Starts its own embedded stack (`sluice up --detach` under a temporary SLUICE_HOME, plus a
second `sluice worker`) and a local paginated API (the test suite's FakeApi, a real HTTP server
on 127.0.0.1) that enforces a token bucket of ``--rate`` requests/s with a burst of ``--burst``
(a 429 with Retry-After in whole seconds when the bucket is empty). Of its ``--items`` items,
5% fail with 503 one to three times before they answer, and 1% always answer 500. The importer
(bench/api_importers.py) asks at the documented limit with ApiSource's default retries (5
attempts, backoff 0.5 s doubling, so a permanent failure costs 7.5 s of backoff) unless
``--max-attempts`` / ``--backoff`` say otherwise.

It runs the import ``--runs`` times and prints for each, from the server's own record of every
request:

- accepted requests per second over the run (from the run's start to its completion, and over
  the span from the first request to the last) against the rate;
- the share of requests answered 429; the most requests accepted in any one second (the server
  never lets more than rate + burst through; this shows how close the client came);
- how the detail requests spread over the two workers;
- exactness: the table holds every good item with its fields, each transient item was fetched
  exactly as often as it failed plus one, each permanent one ``max_attempts`` times and is
  ``failed`` with its reason, every other item once, and the run's counters add up.

Targets (printed with met / NOT met): >= 90% of the rate, <= 5% of requests answered 429,
never above rate + burst in any second, exact.

    .venv/bin/python bench/api_rate.py [--items 600] [--rate 20] [--burst 5] [--runs 2]

This prints figures; it is not a test. The exit status is 1 when a run is not exact.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg
from firehose import ROOT, sluice, spawn, stop, tail, wait_group

sys.path.insert(0, str(ROOT))

from tests.support.rows import item_states
from tests.support.servers.paginated_api import FakeApi, Hit, most_in_window


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


async def one_run(
    args: argparse.Namespace, port: int, db: asyncpg.Connection, n: int
) -> tuple[bool, bool]:
    """One import against a fresh API; returns (exact, targets met)."""
    from sluice import sdk

    rng = random.Random(n)
    api = FakeApi(args.items, per_second=args.rate, burst=args.burst, port=port)
    order = list(api.ids)
    rng.shuffle(order)
    n_broken = max(1, round(args.items * 0.01))
    n_flaky = max(1, round(args.items * 0.05))
    broken = set(order[:n_broken])
    flaky = {i: rng.randint(1, 3) for i in order[n_broken : n_broken + n_flaky]}
    api.broken = frozenset(broken)
    api.flaky.update(flaky)
    await db.execute("DROP TABLE IF EXISTS public.bench_api")
    await db.execute("DELETE FROM sluice.rate_limits")
    with api:
        run = await sdk.trigger("bench_api")
        done = await sdk.wait(run.id, timeout=args.timeout)
        hits: list[Hit] = api.snapshot()
    if not done.status.terminal:
        print(f"run {run.id} did not finish in {args.timeout:.0f}s: {done.status}")
        return False, False
    assert done.started_at is not None and done.completed_at is not None
    span = (done.completed_at - done.started_at).total_seconds()
    accepted = [h for h in hits if h.status != 429]
    throttled = len(hits) - len(accepted)
    first, last = min(h.time for h in hits), max(h.time for h in hits)
    per_run = len(accepted) / span
    per_span = len(accepted) / max(last - first, 1e-9)
    peak = most_in_window([h.time for h in accepted])
    share = throttled / len(hits)

    # Exactness, from the server's record and the database.
    fetched = Counter(h.what for h in accepted if h.kind == "detail")
    wrong: list[str] = []
    for item in api.ids:
        want = flaky[item] + 1 if item in flaky else args.max_attempts if item in broken else 1
        if fetched[item] != want:
            wrong.append(f"{item} fetched {fetched[item]} times, not {want}")
    rows = {r["id"]: r for r in await db.fetch("SELECT id, name FROM public.bench_api")}
    good = set(api.ids) - broken
    if set(rows) != good:
        wrong.append(f"table: {len(rows)} rows, {len(set(rows) ^ good)} differ from the good items")
    wrong += [f"{i}: {r['name']!r}" for i, r in rows.items() if r["name"] != api.item(i)["name"]]
    states = await item_states(db, run.id)
    for item in broken:
        s = states[item]
        failures = s["failure_count"]
        if (
            s["status"] != "failed"
            or failures != args.max_attempts
            or "HTTP 500" not in s["last_error"]
        ):
            wrong.append(f"{item}: {dict(s)}")
    for item, k in flaky.items():
        s = states[item]
        if s["status"] != "completed" or s["failure_count"] != k:
            wrong.append(f"{item}: {dict(s)} (failed {k} times)")
    counters = (done.items_discovered, done.items_completed, done.items_failed, done.created_rows)
    want_counters = (args.items, args.items - len(broken), len(broken), args.items - len(broken))
    if counters != want_counters or done.rate_limit_hits != throttled:
        wrong.append(
            f"counters (discovered, completed, failed, created) {counters}, not {want_counters};"
            f" 429s counted {done.rate_limit_hits}, served {throttled}"
        )
    workers = Counter(h.agent.rsplit("pid/", 1)[-1] for h in accepted if h.kind == "detail")

    print(f"\nrun {n}: {done.status.value} in {span:.1f}s ({run.id})")
    print(
        f"  requests: {len(hits)} ({len(accepted)} accepted: "
        f"{sum(1 for h in accepted if h.kind == 'list')} list, "
        f"{sum(1 for h in accepted if h.kind == 'detail')} detail; {throttled} answered 429)"
    )
    print(
        f"  accepted per second over the run: {per_run:.2f} = {per_run / args.rate:.0%} of the"
        f" rate {args.rate:g}/s ({per_span:.2f}/s = {per_span / args.rate:.0%} from the first"
        " request to the last)"
    )
    print(f"  answered 429: {share:.2%} of requests")
    print(f"  most accepted in any second: {peak} (rate + burst = {args.rate + args.burst:g})")
    shares = ", ".join(f"pid {pid}: {k}" for pid, k in sorted(workers.items()))
    print(f"  detail requests per worker: {shares}")
    print(
        f"  rate-limit waits: {done.rate_limit_sleeps} ({done.total_sleep_seconds:.1f}s);"
        f" transient items {len(flaky)} (failing {sum(flaky.values())} times), permanent"
        f" {len(broken)}"
    )
    exact = not wrong
    print(f"  exact: {'yes' if exact else 'NO'}")
    for line in wrong[:20]:
        print(f"    {line}")
    met = per_run >= 0.9 * args.rate and share <= 0.05 and peak <= args.rate + args.burst
    print(
        f"  targets: >= 90% of the rate {verdict(per_run >= 0.9 * args.rate)};"
        f" <= 5% 429 {verdict(share <= 0.05)};"
        f" never above rate + burst {verdict(peak <= args.rate + args.burst)};"
        f" exact {verdict(exact)}"
    )
    return exact, met


async def run(args: argparse.Namespace, home: Path, work: Path, env: dict[str, str]) -> int:
    import json

    state = json.loads((home / "stack.json").read_text())
    bootstrap, url = state["kafka_bootstrap"], state["database_url"]
    worker_env = {**env, "SLUICE_KAFKA_BOOTSTRAP": bootstrap, "SLUICE_DATABASE_URL": url}
    from sluice.stack import free_port

    log = work / "worker-2.log"
    extra = spawn(["worker"], {**worker_env, "SLUICE_METRICS_PORT": str(free_port())}, log)
    os.environ.update(env)
    db = await asyncpg.connect(url)
    try:
        await wait_group(bootstrap, 2, args.startup_timeout)
        results = [await one_run(args, args.port, db, n) for n in range(1, args.runs + 1)]
    except Exception as exc:
        print(f"\nthe benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for path in (home / "logs" / "worker.log", log):
            print(f"\n--- {path} (tail)\n{tail(path)}", file=sys.stderr)
        return 1
    finally:
        await db.close()
        stop(extra)
    print(
        f"\n{sum(m for _, m in results)} of {len(results)} runs met every target;"
        f" {sum(e for e, _ in results)} exact"
    )
    return 0 if all(e for e, _ in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args()
    from sluice.stack import free_port

    args.port = free_port()
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-api-"))
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(
        SLUICE_HOME=str(home),
        SLUICE_IMPORTERS="bench.api_importers",
        SLUICE_BENCH_API_URL=f"http://127.0.0.1:{args.port}",
        SLUICE_BENCH_RATE=str(args.rate),
        SLUICE_BENCH_BURST=str(args.burst),
        SLUICE_BENCH_MAX_ATTEMPTS=str(args.max_attempts),
        SLUICE_BENCH_BACKOFF=str(args.backoff),
        SLUICE_URL_ALLOW_HOSTS="127.0.0.1",
        PYTHONPATH=str(ROOT),
    )
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cores: {os.cpu_count()}  load average before: {load}  work dir: {work}")
    started = time.monotonic()
    up = sluice("up", "--detach", env=env)
    if up.returncode != 0:
        print(up.stdout, up.stderr, file=sys.stderr)
        print(f"--- up.log (tail)\n{tail(home / 'logs' / 'up.log')}", file=sys.stderr)
        sluice("down", env=env)
        return 1
    print(
        f"stack up in {time.monotonic() - started:.1f}s; the source asks at {args.rate:g}/s"
        f" (burst {args.burst}), {args.max_attempts} attempts, backoff {args.backoff:g}s doubling"
    )
    try:
        return asyncio.run(run(args, home, work, env))
    finally:
        sluice("down", env=env)


if __name__ == "__main__":
    sys.exit(main())
