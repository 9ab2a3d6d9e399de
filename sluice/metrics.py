"""Prometheus metrics, computed when scraped from PostgreSQL (the source of truth) and the broker.

Counters come from the runs table, so every API process reports the same numbers and a restart
loses nothing. Consumer lag is the broker's end offset minus the group's committed offset.
"""

from __future__ import annotations

import logging

import asyncpg
from aiokafka import TopicPartition

from sluice.config import Settings
from sluice.schemas.runs import RunStatus
from sluice.streams import kafka as clients
from sluice.streams.topics import Topics

log = logging.getLogger(__name__)


def _line(name: str, value: float, **labels: str) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _header(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


async def render_metrics(pool: asyncpg.Pool, settings: Settings) -> str:
    out: list[str] = []
    totals = await pool.fetchrow(
        "SELECT coalesce(sum(processed_rows), 0) AS processed,"
        " coalesce(sum(created_rows), 0) AS created, coalesce(sum(updated_rows), 0) AS updated,"
        " coalesce(sum(unchanged_rows), 0) AS unchanged, coalesce(sum(skipped_rows), 0) AS skipped,"
        " coalesce(sum(failed_rows), 0) AS failed, coalesce(sum(applied_batches), 0) AS batches"
        " FROM runs WHERE NOT dry_run"
    )
    _header(out, "sluice_rows_total", "counter", "Rows processed by outcome (dry runs excluded).")
    for outcome in ("created", "updated", "unchanged", "skipped", "failed"):
        out.append(_line("sluice_rows_total", totals[outcome], outcome=outcome))
    _header(out, "sluice_rows_processed_total", "counter", "Rows processed (dry runs excluded).")
    out.append(_line("sluice_rows_processed_total", totals["processed"]))
    _header(out, "sluice_batches_applied_total", "counter", "Row batches applied.")
    out.append(_line("sluice_batches_applied_total", totals["batches"]))

    by_status = dict(await pool.fetch("SELECT status, count(*) FROM runs GROUP BY status"))
    _header(out, "sluice_runs", "gauge", "Runs by status.")
    for status in RunStatus:
        out.append(_line("sluice_runs", by_status.get(status.value, 0), status=status.value))
    failures = await pool.fetchval("SELECT count(*) FROM runs WHERE status = 'failed'")
    _header(out, "sluice_run_failures_total", "counter", "Runs that failed.")
    out.append(_line("sluice_run_failures_total", failures))
    pending = await pool.fetchval("SELECT count(*) FROM events WHERE relayed_at IS NULL")
    _header(out, "sluice_outbox_pending", "gauge", "Lifecycle events not yet on the topic.")
    out.append(_line("sluice_outbox_pending", pending))

    lag = await consumer_lag(settings)
    _header(out, "sluice_consumer_lag", "gauge", "Messages not yet consumed, per topic.")
    if lag is None:
        out.append("# consumer lag unavailable: the broker did not answer")
    else:
        for topic, value in sorted(lag.items()):
            out.append(
                _line("sluice_consumer_lag", value, topic=topic, group=settings.kafka.group_id)
            )
    return "\n".join(out) + "\n"


async def consumer_lag(settings: Settings) -> dict[str, int] | None:
    # A consumer of the workers' group that never subscribes: it reads the group's committed
    # offsets without joining the group.
    names = Topics.of(settings.kafka)
    consumer = clients.consumer(
        settings.kafka, group_id=settings.kafka.group_id, request_timeout_ms=5000
    )
    try:
        await consumer.start()
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        parts = [
            TopicPartition(topic, p)
            for topic in (names.requests, names.batches)
            for p in (consumer.partitions_for_topic(topic) or set())
        ]
        ends = await consumer.end_offsets(parts) if parts else {}
        lag: dict[str, int] = {names.requests: 0, names.batches: 0}
        for tp, end in ends.items():
            done = await consumer.committed(tp) or 0
            lag[tp.topic] += max(0, end - done)
        return lag
    except Exception as exc:
        log.warning("consumer lag unavailable: %s", exc)
        return None
    finally:
        await consumer.stop()
