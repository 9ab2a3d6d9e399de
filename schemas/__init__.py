"""Pydantic models of every event and record that crosses a process boundary."""

from sluice.schemas.events import (
    BatchOutcome,
    DeadLetter,
    FileRef,
    ImportRequested,
    LifecycleEvent,
    LifecycleEventType,
    PoisonBatch,
    RowBatch,
)
from sluice.schemas.runs import DuplicatePolicy, Run, RunCounters, RunStatus
from sluice.schemas.webhooks import DeliveryStatus, WebhookDelivery

__all__ = [
    "BatchOutcome",
    "DeadLetter",
    "DeliveryStatus",
    "DuplicatePolicy",
    "FileRef",
    "ImportRequested",
    "LifecycleEvent",
    "LifecycleEventType",
    "PoisonBatch",
    "RowBatch",
    "Run",
    "RunCounters",
    "RunStatus",
    "WebhookDelivery",
]
