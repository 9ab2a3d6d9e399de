"""Prometheus metrics of the workers and of the HTTP API.

A worker (``sluice worker``, and ``sluice firehose``) counts what it does in a
:class:`WorkerMetrics` and serves it on ``SLUICE_METRICS_HOST:SLUICE_METRICS_PORT`` (:func:`serve`);
the HTTP API serves an :class:`ApiMetrics` on its own ``/metrics``. Counters only go up, and count
what this process did since it started: sum them over the workers in Prometheus, whose
``rate()`` and ``increase()`` take the restarts in their stride. Nothing here is derived from the
runs table, so pruning runs changes no counter.

This module sits at the bottom of the layers, with sluice.errors and sluice.config, so that
every stage can count: it imports nothing else of Sluice's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import start_http_server

from sluice.config import MetricsSettings
from sluice.errors import InvalidConfig
from sluice.schemas.events import BatchOutcome
from sluice.schemas.firehose import EventOutcome

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

# No <name>_created series beside every counter: Prometheus' text format does not use them, and
# they double what a scrape carries.
disable_created_metrics()  # type: ignore[no-untyped-call]

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
"""Content type of the Prometheus text format that :func:`generate_latest` writes."""

BATCH_OUTCOMES = tuple(BatchOutcome)
ROW_OUTCOMES = ("created", "updated", "unchanged", "skipped", "failed")
FIREHOSE_OUTCOMES = tuple(EventOutcome)
RETRY_STAGES = ("split", "fetch", "detail", "trigger", "backfill", "upsert", "lane", "firehose")
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

TANSU_LAG_NOTE = (
    "Right on Apache Kafka (and any broker that reports a partition's true end offset). On the "
    "embedded broker (Tansu 0.6), which reports the start of a partition's last record batch "
    "plus one, the end is taken as at least the consumer's own fetch position: a lower bound "
    "that can miss at most the rest of the last record batch, never negative."
)


class AppliedRows(Protocol):
    """The rows of one applied batch by outcome (``sluice.storage.writer.BatchResult``)."""

    @property
    def created(self) -> int: ...
    @property
    def updated(self) -> int: ...
    @property
    def unchanged(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def seconds(self) -> float: ...


class WorkerMetrics:
    """What one worker process did. Each instance has a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.batches = Counter(
            "sluice_batches_total",
            "Row batches this worker handled (file batches and pages of API items), by outcome: "
            "applied (written and counted in one transaction), duplicate (a redelivered batch "
            "skipped by its marker), inactive (its run was cancelled or had finished: nothing "
            "written), dead (sent to the dead-letter topic).",
            ["outcome"],
            registry=r,
        )
        self.rows = Counter(
            "sluice_rows_total",
            "Rows this worker counted into runs, by outcome (created, updated, unchanged, "
            "skipped, failed), as the runs' counters count them: failed includes rows the split "
            "rejected (parse, mapping, validation) and items whose detail failed. Dry runs are "
            'labelled dry_run="true" (their rows were not written).',
            ["outcome", "dry_run"],
            registry=r,
        )
        self.apply_seconds = Histogram(
            "sluice_batch_apply_seconds",
            "Seconds per applied batch in PostgreSQL: its transaction (marker, upsert, counters), "
            "and the second one when bad rows had to be isolated.",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sluice_consumer_lag",
            "Messages not yet done, per partition assigned to this worker and consumer group: "
            "the partition's end offset seen by the consumer's last fetch (at least its fetch "
            "position) minus the offset it committed (the firehose applier's group: its "
            "position, committed after each batch); "
            f"updated every SLUICE_METRICS_LAG_INTERVAL seconds. {TANSU_LAG_NOTE}",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.dead_letters = Counter(
            "sluice_dead_letters_total",
            "Messages this worker sent to the dead-letter topic, by the topic they came from "
            "(jetstream: refused by the firehose consumer).",
            ["topic"],
            registry=r,
        )
        self.retries = Counter(
            "sluice_retries_total",
            "Work tried again after a failure (or a wait for an unreachable database), by stage.",
            ["stage"],
            registry=r,
        )
        self.firehose_events = Counter(
            "sluice_firehose_events_total",
            "Firehose events handled by this process, by outcome: applied (a record written), "
            "skipped (older than the stored record or a tombstone), deleted (a record removed), "
            "malformed (not a Jetstream event: dead-lettered).",
            ["outcome"],
            registry=r,
        )
        self.firehose_cursor_lag = Gauge(
            "sluice_firehose_cursor_lag_seconds",
            "Seconds between now and the last saved time_us cursor of the firehose consumer "
            "running in this process (NaN before the first cursor).",
            ["consumer"],
            registry=r,
        )
        for batch_outcome in BATCH_OUTCOMES:
            self.batches.labels(batch_outcome)
        for row_outcome in ROW_OUTCOMES:
            for dry in ("false", "true"):
                self.rows.labels(row_outcome, dry)
        for event_outcome in FIREHOSE_OUTCOMES:
            self.firehose_events.labels(event_outcome)
        # Series that exist at 0 from the start: increase() and rate() see their first step.
        for stage in RETRY_STAGES:
            self.retries.labels(stage)
        self._lag_series: dict[str, set[tuple[str, str]]] = {}

    # ---------------------------------------------------------------- batches and rows

    def batch_done(
        self, outcome: BatchOutcome, rows: AppliedRows | None = None, *, dry_run: bool = False
    ) -> None:
        """One batch handled; ``rows``: what an applied batch counted."""
        self.batches.labels(str(outcome)).inc()
        if rows is None:
            return
        dry = "true" if dry_run else "false"
        for name in ROW_OUTCOMES:
            n = getattr(rows, name)
            if n:
                self.rows.labels(name, dry).inc(n)
        self.apply_seconds.observe(rows.seconds)

    def rows_rejected(self, count: int, *, dry_run: bool) -> None:
        """Rows rejected outside a batch's statement (the split, failed API items)."""
        if count:
            self.rows.labels("failed", "true" if dry_run else "false").inc(count)

    # ---------------------------------------------------------------- failures

    def dead_letter(self, topic: str) -> None:
        self.dead_letters.labels(topic).inc()

    def dead_letters_from(self, *topics: str) -> None:
        """Show the dead letters of ``topics`` at 0 until there are some."""
        for topic in topics:
            self.dead_letters.labels(topic)

    def retried(self, stage: str) -> None:
        self.retries.labels(stage).inc()

    def on_retry(self, stage: str) -> Callable[[], None]:
        """A callback for retry loops: counts one retry of ``stage`` per call."""
        child = self.retries.labels(stage)
        return child.inc

    # ---------------------------------------------------------------- firehose

    def firehose_applied(self, applied: int, skipped: int, deleted: int) -> None:
        for outcome, n in (
            (EventOutcome.APPLIED, applied),
            (EventOutcome.SKIPPED, skipped),
            (EventOutcome.DELETED, deleted),
        ):
            if n:
                self.firehose_events.labels(outcome).inc(n)

    def firehose_malformed(self, count: int = 1) -> None:
        self.firehose_events.labels(EventOutcome.MALFORMED).inc(count)

    def watch_cursor(self, consumer: str, saved_time_us: Callable[[], int | None]) -> None:
        """Report the cursor lag of the named consumer from its last saved ``time_us``, read at
        each scrape."""

        def lag() -> float:
            saved = saved_time_us()
            return math.nan if saved is None else time.time() - saved / 1_000_000

        self.firehose_cursor_lag.labels(consumer).set_function(lag)

    # ---------------------------------------------------------------- consumer lag

    def set_lag(self, group: str, lags: Mapping[tuple[str, int], int]) -> None:
        """The lag of every partition ``group`` has now; partitions it no longer has are
        dropped (they moved to another worker)."""
        now = {(topic, str(partition)) for topic, partition in lags}
        for topic, label in self._lag_series.get(group, set()) - now:
            self.consumer_lag.remove(group, topic, label)
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(group, topic, str(partition)).set(max(0, lag))
        self._lag_series[group] = now

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ApiMetrics:
    """What one HTTP API process serves on /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.runs = Gauge(
            "sluice_runs_active",
            "Runs queued or running, by status (counted in PostgreSQL at each scrape).",
            ["status"],
            registry=r,
        )
        self.outbox = Gauge(
            "sluice_outbox_pending",
            "Lifecycle events in the outbox not yet relayed to the lifecycle topic.",
            registry=r,
        )
        self.requests = Counter(
            "sluice_api_requests_total",
            "HTTP requests this API process answered, by method, route and status code.",
            ["method", "route", "status"],
            registry=r,
        )

    def set_runs(self, by_status: Mapping[Any, int]) -> None:
        """``by_status``: run status (a RunStatus or its value) -> count."""
        for status, count in by_status.items():
            self.runs.labels(str(status)).set(count)

    def request_done(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve(registry: CollectorRegistry, settings: MetricsSettings) -> WSGIServer | None:
    """Serve ``registry`` over HTTP in a thread of this process, or nothing when the port is 0.
    A port that cannot be bound is a configuration error, raised at once."""
    if settings.port == 0:
        return None
    try:
        server, _ = start_http_server(settings.port, addr=settings.host, registry=registry)
    except OSError as exc:
        raise InvalidConfig(
            f"cannot serve metrics on {settings.host}:{settings.port} "
            f"(SLUICE_METRICS_HOST, SLUICE_METRICS_PORT): {exc.strerror or exc}; give every "
            "process on this host its own SLUICE_METRICS_PORT, or set SLUICE_METRICS_PORT=0 "
            "to turn its metrics off"
        ) from exc
    return server
