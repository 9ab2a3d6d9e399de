"""Webhook deliveries: one lifecycle event sent to one URL, and what came of it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from sluice.schemas.events import LifecycleEventType

DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = (
    LifecycleEventType.COMPLETED.value,
    LifecycleEventType.FAILED.value,
    LifecycleEventType.CANCELLED.value,
)
"""What a webhook receives when its configuration names no events: how each run ended."""


def check_webhook_target(url: str, events: Iterable[str]) -> None:
    """ValueError, saying what to fix, unless ``url`` is http(s) and every event type exists."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook url {url!r} must start with http:// or https://")
    known = {t.value for t in LifecycleEventType}
    unknown = sorted(set(events) - known)
    if unknown:
        raise ValueError(
            f"webhook {url}: unknown event type(s) {', '.join(unknown)};"
            f" use some of {', '.join(sorted(known))}"
        )


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    """Not delivered yet; tried again at ``next_attempt_at``."""
    DELIVERED = "delivered"
    """The receiver answered 2xx."""
    FAILED = "failed"
    """Every attempt failed (or the URL is no longer configured); not tried again."""


class WebhookDelivery(BaseModel):
    """A row of the delivery log (``sluice.webhook_deliveries``)."""

    id: int
    event_id: UUID
    run_id: UUID | None
    event_type: str
    url: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
