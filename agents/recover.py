"""Recovery: runs that PostgreSQL says are in flight are resumed from what it holds.

Three ways in:

- **Stalled runs** (the backstop): a queued or running run with no change for
  ``SLUICE_STALL_TIMEOUT`` seconds (doubling with every resumption) is resumed; after
  ``SLUICE_MAX_RECOVERIES`` it fails with the reason.
- **Overdue retry batches** of API runs: a retry batch is sent by the worker that made it when
  it is due; a worker that died first leaves its items ``pending`` in PostgreSQL. Two recovery
  rounds after they were due, the worker holding the recovery lock sends the batch again (a
  duplicate of one still on its way finds its items done and does nothing), so the run goes on
  without waiting to stall.
- **A broker that lost its topics** (a restart of an in-memory broker, a cluster rebuilt): every
  worker checks every ``SLUICE_TOPIC_CHECK_INTERVAL`` seconds that the deployment's topics exist.
  The worker that recreates missing topics resumes every run in flight at once, without waiting
  for a stall, and has the outbox relay again what it relayed since the topics were last seen:
  those messages went to topics that no longer exist (some brokers even acknowledge a produce
  to a missing topic). Every worker that learns of the loss (``sluice.topic_losses``) reads its
  partitions of the new topics from the start (``sluice.streams.rewind``): its positions in the
  old log would skip what was sent since.

Resuming publishes the run's import request, trigger or backfill request again; every stage
skips what was done (batch markers, the discovery cursor and item states, backfill cursors), so
resuming a run that was not lost costs work, never correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sluice.agents.deps import Deps
from sluice.agents.wiring import Wiring
from sluice.errors import TerminalError
from sluice.schemas.events import ImportRequested
from sluice.schemas.firehose import BACKFILL_IMPORTER
from sluice.schemas.runs import PULL_KINDS, Run
from sluice.storage.items import overdue_retries
from sluice.storage.outbox import (
    last_topic_loss,
    loss_recorded_since,
    record_topic_loss,
    topic_losses_after,
)
from sluice.storage.recovery import (
    database_now,
    fail_stalled,
    in_flight_runs,
    mark_resumed,
    relay_again_since,
    stalled_runs,
    try_recovery_lock,
    wait_for_recovery_lock,
)
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.rewind import rewind
from sluice.streams.topics import Topics

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)


class CannotResume(TerminalError):
    """What a run needs to go on is gone (its stored file was pruned)."""


PublishRequest = Callable[[ImportRequested], Awaitable[None]]
PublishTrigger = Callable[[Run, str, dict[str, Any]], Awaitable[None]]
PublishBackfill = Callable[[str, list[str]], Awaitable[None]]
SendItemPage = Callable[[Any, int], Awaitable[Awaitable[Any]]]
Flush = Callable[[], Awaitable[None]]
Rewind = Callable[[list[str]], Awaitable[int]]


class Recovery:
    """Resumes runs; the publishers confirm each message before they return."""

    def __init__(
        self,
        deps: Deps,
        *,
        publish_request: PublishRequest,
        publish_trigger: PublishTrigger,
        publish_backfill: PublishBackfill,
        flush: Flush,
        rewind: Rewind | None = None,
        send_item_page: SendItemPage | None = None,
    ) -> None:
        self.deps = deps
        self.rewind = rewind
        self.send_item_page = send_item_page
        self.publish_request = publish_request
        self.publish_trigger = publish_trigger
        self.publish_backfill = publish_backfill
        self.flush = flush
        self._admin: Any = None
        self._topics_seen_at: datetime | None = None
        self._loss_seen: int | None = None  # the latest topic loss this worker knows of

    async def resume(self, run: Run) -> str:
        """Publish what ``run`` needs to go on; returns how it was resumed."""
        options = run.options
        if run.importer == BACKFILL_IMPORTER:
            did = options["did"]
            await self.publish_backfill(did, list(options.get("collections") or []))
            return f"backfill of {did} requested again"
        if run.file_id is not None:
            ref = await self.deps.files.ref(run.file_id)
            if ref is None:
                raise CannotResume("its stored file is gone (pruned?); import the file again")
            await self.publish_request(ImportRequested.for_run(run, ref))
            return "import request published again; applied batches are skipped"
        if run.source in PULL_KINDS:
            await self.publish_trigger(run, run.source, dict(options.get("params") or {}))
            return f"{run.source} trigger published again"
        # The file store's foreign key clears file_id when the file is pruned.
        raise CannotResume("its stored file is gone (pruned?); import the file again")

    async def resume_stalled(self) -> None:
        """One worker at a time resumes stalled runs, and sends again the retry batches of API
        runs overdue by two recovery rounds (their message died with the worker that was to
        send it when due): those runs go on without waiting to stall."""
        pipeline = self.deps.settings.pipeline
        pool = self.deps.pool
        async with pool.acquire() as conn, conn.transaction():
            if not await try_recovery_lock(conn):
                return
            if self.send_item_page is not None:
                overdue = await overdue_retries(conn, 2 * pipeline.recovery_interval)
                for run_id, seq in overdue:
                    await (await self.send_item_page(run_id, seq))
                    log.warning("run %s: retry batch %d was overdue: sent again", run_id, seq)
            stalled = await stalled_runs(conn, pipeline.stall_timeout)
            if not stalled:
                return
            # A broker that restarted may have lost the topics with everything on them.
            await ensure_topics(self.deps.settings.kafka)
            for run, recoveries in stalled:
                if recoveries >= pipeline.max_recoveries:
                    await fail_stalled(
                        conn,
                        run,
                        f"stalled: no progress after {recoveries} resumptions; see the "
                        "workers' logs, then import again",
                    )
                    continue
                try:
                    how = await self.resume(run)
                except CannotResume as exc:
                    await fail_stalled(conn, run, f"stalled and cannot be resumed: {exc}")
                    continue
                await mark_resumed(conn, run, how)
                log.warning("run %s was stalled: %s", run.id, how)
            await self.flush()

    async def check_topics(self) -> None:
        """Recreate the deployment's topics when the broker lost them; the worker that did
        resumes every run in flight at once."""
        kafka = self.deps.settings.kafka
        ours = {spec.name for spec in Topics.of(kafka).specs(kafka.partitions)}
        pool = self.deps.pool
        if self._admin is None:
            admin = clients.admin(kafka)
            await admin.start()
            self._admin = admin
        if self._topics_seen_at is None:
            # Only the first look starts the clock. A reconnection after the broker went away
            # keeps it: what was relayed while it was away may have gone to lost topics.
            self._topics_seen_at = await database_now(pool)
        try:
            existing = set(await self._admin.list_topics())
        except Exception:
            await self.close()  # a new connection next time
            raise
        missing = ours - existing
        if not missing:
            self._topics_seen_at = await database_now(pool)
        else:
            created = await ensure_topics(kafka)
            log.warning(
                "the broker lost topics %s; %s",
                ", ".join(sorted(missing)),
                "recreated them" if created else "another worker recreated them",
            )
            if created:
                await self._after_topic_loss(sorted(missing))
        await self._rewind_after_losses()

    async def _rewind_after_losses(self) -> None:
        """Read the topics of a loss recorded since the last look (by any worker) from the
        start of their new log; the first look only notes the latest loss."""
        async with self.deps.pool.acquire() as conn:
            if self._loss_seen is None:
                self._loss_seen = await last_topic_loss(conn)
                return
            losses = await topic_losses_after(conn, self._loss_seen)
        if not losses:
            return
        self._loss_seen = losses[-1][0]
        topics = sorted({t for _, lost in losses for t in lost})
        if self.rewind is not None:
            count = await self.rewind(topics)
            log.warning(
                "the broker lost topics %s: read %d partitions of them from the start",
                ", ".join(topics),
                count,
            )

    async def _after_topic_loss(self, lost: list[str]) -> None:
        since = self._topics_seen_at
        reason = f"the broker lost topics {', '.join(lost)}"
        pool = self.deps.pool
        async with pool.acquire() as conn, conn.transaction():
            # The stall recovery waits: the runs are resumed here.
            await wait_for_recovery_lock(conn)
            if since is not None and await loss_recorded_since(conn, since):
                # Two workers that each recreated some of the topics: the first to get here
                # resumed the runs; resuming them twice would only split the files twice.
                log.warning("%s: another worker resumed the runs in flight", reason)
                return
            # Subscribers of the lifecycle topic watch for this (sluice.subscription).
            await record_topic_loss(conn, lost, since)
            if since is not None:
                again = await relay_again_since(conn, since)
                if again:
                    log.warning("%s: %d lifecycle events will be relayed again", reason, again)
            runs = await in_flight_runs(conn)
            for run in runs:
                try:
                    how = await self.resume(run)
                except CannotResume as exc:
                    await fail_stalled(conn, run, f"{reason} and it cannot be resumed: {exc}")
                    continue
                await mark_resumed(conn, run, f"{reason}: {how}", count=False)
            await self.flush()
        log.warning("%s: resumed %d runs in flight", reason, len(runs))

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except Exception:
                log.debug("closing the topic watch's admin client failed", exc_info=True)


def register(app: faust.App, wiring: Wiring) -> None:
    """The timers of the stall recovery and of the topic watch."""
    deps = wiring.deps
    recovery = Recovery(
        deps,
        publish_request=wiring.publish_request,
        publish_trigger=wiring.publish_trigger,
        publish_backfill=wiring.publish_backfill,
        flush=wiring.flush,
        rewind=lambda topics: rewind(app.consumer, topics),
        send_item_page=wiring.send_item_page,
    )

    @app.timer(deps.settings.pipeline.recovery_interval)  # type: ignore[untyped-decorator]
    async def recover() -> None:
        """One worker at a time resumes stalled runs from what PostgreSQL holds."""
        try:
            await recovery.resume_stalled()
        except Exception:
            log.exception("recovery of stalled runs failed; will try again")

    @app.timer(deps.settings.pipeline.topic_check_interval)  # type: ignore[untyped-decorator]
    async def watch_topics() -> None:
        """A broker that lost its topics: recreate them and resume the runs in flight."""
        try:
            await recovery.check_topics()
        except Exception as exc:
            log.warning(
                "could not check the topics (%s: %s); will try again", type(exc).__name__, exc
            )
