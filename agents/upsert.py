"""Upsert: apply each row batch in one PostgreSQL transaction, exactly once in effect.

Faust acks an event even when the agent raises, so nothing may escape this loop: transient
failures are retried with backoff, and what still fails goes to the dead-letter topic. The
``upsert`` agent applies the batches of each partition in their own lane (``agents.lanes``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sluice.agents.deps import Deps
from sluice.agents.lanes import Lanes
from sluice.agents.plans import PlanCache
from sluice.agents.wiring import Wiring
from sluice.errors import TerminalError
from sluice.retries import Policy, retrying
from sluice.schemas.events import BatchOutcome, PoisonBatch, RowBatch
from sluice.storage.writer import BatchResult

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

DeadLetterFn = Callable[[str], Awaitable[None]]
OUTAGE_SECONDS = 120.0
"""How long a batch waits for an unreachable database before its tries count again."""


async def upsert_batch(
    deps: Deps, key: bytes | None, value: bytes | None, plans: PlanCache, dead_letter: DeadLetterFn
) -> BatchOutcome:
    """Apply one batch message; returns what became of it, and counts it in ``deps.metrics``."""
    result, dry_run = await _upsert(deps, key, value, plans, dead_letter)
    applied = result if result.outcome is BatchOutcome.APPLIED else None
    deps.metrics.batch_done(result.outcome, applied, dry_run=dry_run)
    return result.outcome


async def _upsert(
    deps: Deps, key: bytes | None, value: bytes | None, plans: PlanCache, dead_letter: DeadLetterFn
) -> tuple[BatchResult, bool]:
    """The batch's result, and whether its run is a dry run."""
    dead = BatchResult(BatchOutcome.DEAD)
    try:
        batch = RowBatch.parse(key, value)
    except PoisonBatch as exc:
        await dead_letter(str(exc))
        return dead, False
    attempts = deps.settings.pipeline.apply_attempts
    dry_run = False

    async def apply() -> BatchResult:
        nonlocal dry_run
        status, plan, dry_run = await plans.get(deps, batch.run_id)
        if plan is None:
            if status.terminal:
                return BatchResult(BatchOutcome.INACTIVE)
            raise RuntimeError(f"run {batch.run_id} has no plan yet")
        return await deps.applier.apply(batch, plan, dry_run=dry_run)

    try:
        result = await retrying(
            f"batch {batch.run_id}/{batch.seq}",
            apply,
            Policy(attempts=attempts, first=0.2, cap=5.0, outage=OUTAGE_SECONDS),
            on_retry=deps.metrics.on_retry("upsert"),
        )
        return result, dry_run
    except TerminalError as exc:  # a poison batch, say: trying again cannot help
        cause = str(exc) if isinstance(exc, PoisonBatch) else f"{type(exc).__name__}: {exc}"
        await _give_up(deps, batch, dead_letter, cause, retried=False)
        return dead, dry_run
    except Exception as exc:
        log.exception(
            "batch %s/%d failed %d times; sending it to the dead-letter topic",
            batch.run_id,
            batch.seq,
            attempts,
        )
        await _give_up(deps, batch, dead_letter, f"{type(exc).__name__}: {exc}", retried=True)
        return dead, dry_run


async def _give_up(
    deps: Deps, batch: RowBatch, dead_letter: DeadLetterFn, cause: str, *, retried: bool
) -> None:
    """Dead-letter the batch and fail its run: a run with a missing batch can never complete,
    so it says why instead of hanging."""
    await dead_letter(f"run {batch.run_id} batch {batch.seq}: {cause}")
    tries = f" after {deps.settings.pipeline.apply_attempts} attempts" if retried else ""
    try:
        await deps.runs.fail(
            batch.run_id,
            f"batch {batch.seq} could not be applied{tries} ({cause}); it is on the dead-letter "
            "topic, and the rows applied before it stay",
        )
    except Exception:
        log.exception("could not mark run %s failed", batch.run_id)


def register(app: faust.App, wiring: Wiring) -> None:
    """The ``upsert`` agent."""
    deps = wiring.deps

    async def apply_batch(event: Any) -> None:
        async def to_dead(reason: str) -> None:
            await wiring.dead_letter(event, reason)

        await upsert_batch(deps, event.key, event.value, wiring.plans, to_dead)
        # Only now may the offset be committed; Faust commits a partition up to its first
        # offset not yet acknowledged, so batches finishing out of order lose nothing.
        event.ack()

    @app.agent(wiring.topics.batches, name="upsert")
    async def upsert_agent(stream: Any) -> None:
        # One lane per partition: in order within a partition (its keys, in file order), side
        # by side across partitions (see agents.lanes).
        lanes: Lanes[Any] = Lanes(apply_batch, depth=2, on_retry=deps.metrics.on_retry("lane"))
        try:
            async for event in stream.noack().events():
                await lanes.put(event.message.partition, event)
        finally:
            await lanes.close()
