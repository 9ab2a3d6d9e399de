"""The consumer lag gauges, every ``SLUICE_METRICS_LAG_INTERVAL`` seconds: of the app's Faust
consumer and of the consumers outside Faust (the firehose applier's)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sluice.agents.wiring import Wiring
from sluice.streams.lag import aiokafka_lag, faust_lag

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)


def register(app: faust.App, wiring: Wiring) -> None:
    """The lag timer."""
    metrics = wiring.deps.metrics

    @app.timer(wiring.deps.settings.metrics.lag_interval)  # type: ignore[untyped-decorator]
    async def measure_lag() -> None:
        """The consumer lag gauges, from what the consumers know already (the end offsets of
        their last fetches, the offsets committed): no request to the broker."""
        try:
            metrics.set_lag(wiring.group, await faust_lag(app.consumer))
            for group, consumer in wiring.consumers:
                metrics.set_lag(group, await aiokafka_lag(consumer))
        except Exception as exc:
            log.debug("consumer lag not measured: %s: %s", type(exc).__name__, exc)
