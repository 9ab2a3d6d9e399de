"""The run plans of the batch stages: a run's plan does not change once batches flow, so the
upsert and the detail stages read it once per run and process."""

from __future__ import annotations

import uuid

from sluice.agents.deps import Deps
from sluice.schemas.runs import RunStatus
from sluice.storage.writer import TargetPlan


class PlanCache:
    """The plans (and dry-run flags) of the runs seen; at most about a thousand are kept."""

    def __init__(self) -> None:
        self._plans: dict[uuid.UUID, tuple[TargetPlan, bool]] = {}

    async def get(self, deps: Deps, run_id: uuid.UUID) -> tuple[RunStatus, TargetPlan | None, bool]:
        cached = self._plans.get(run_id)
        if cached is not None:
            return RunStatus.RUNNING, cached[0], cached[1]
        status, dry_run, plan = await deps.runs.plan(run_id)
        if plan is None:
            return status, None, dry_run
        target = TargetPlan.from_json(plan)
        if len(self._plans) > 1000:
            self._plans.clear()
        self._plans[run_id] = (target, dry_run)
        return status, target, dry_run
