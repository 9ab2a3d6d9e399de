"""Retention: stored files and finished runs older than configured go, every
``SLUICE_PRUNE_INTERVAL`` seconds. Deleting is idempotent, so workers pruning at the same time
do no harm."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sluice.agents.deps import Deps
from sluice.agents.wiring import Wiring
from sluice.storage.filestore import prune_files

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)


async def prune_expired(deps: Deps) -> None:
    """Delete the stored files and the finished runs past their retention; never raises (the
    next prune tries again)."""
    pipeline = deps.settings.pipeline
    try:
        files, size = await prune_files(deps.files, pipeline.file_retention_hours)
        runs, rows = await deps.runs.prune(pipeline.run_retention_days)
        if files or runs:
            log.info(
                "pruned %d files (%d bytes), %d runs, %d rejected rows", files, size, runs, rows
            )
    except Exception:
        log.exception("pruning failed; will try again")


def register(app: faust.App, wiring: Wiring) -> None:
    """The retention timer."""

    @app.timer(wiring.deps.settings.pipeline.prune_interval)  # type: ignore[untyped-decorator]
    async def prune() -> None:
        await prune_expired(wiring.deps)
