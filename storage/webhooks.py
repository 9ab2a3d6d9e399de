"""The webhook delivery log (``sluice.webhook_deliveries``): what is due, what was sent, and how
each attempt ended.

An attempt is claimed before it is sent. The claim counts the attempt and leases the row
(``next_attempt_at`` moves past the request's timeout) under ``FOR UPDATE SKIP LOCKED``: two
workers never send the same attempt, no connection is held during the request, and a worker
that dies mid-request leaves the row due again when the lease runs out. An outcome is recorded
only for the attempt that was claimed, so a late answer cannot overwrite a newer attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from sluice.schemas.webhooks import DeliveryStatus, WebhookDelivery

TABLE = "sluice.webhook_deliveries"
COLUMNS = (
    "id, event_id, run_id, event_type, url, payload, status, attempts, last_status_code,"
    " last_error, next_attempt_at, created_at, delivered_at"
)


def delivery_from_record(record: asyncpg.Record) -> WebhookDelivery:
    return WebhookDelivery.model_validate(dict(record))


class DeliveryLog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(
        self,
        *,
        event_id: uuid.UUID,
        run_id: uuid.UUID | None,
        event_type: str,
        payload: dict[str, Any],
        urls: Sequence[str],
    ) -> list[int]:
        """One pending delivery per URL, due now. Returns the ids of the rows created: none for
        an event recorded before (the lifecycle topic delivers at least once)."""
        records = await self.pool.fetch(
            f"INSERT INTO {TABLE} (event_id, run_id, event_type, url, payload)"
            " SELECT $1, $2, $3, u.url, $4::jsonb FROM unnest($5::text[]) AS u(url)"
            " ON CONFLICT (event_id, url) DO NOTHING RETURNING id",
            event_id,
            run_id,
            event_type,
            payload,
            list(urls),
        )
        return [r["id"] for r in records]

    async def claim(
        self,
        *,
        lease: float,
        max_attempts: int,
        limit: int = 50,
        ids: Sequence[int] | None = None,
    ) -> list[WebhookDelivery]:
        """Take due deliveries (only those in ``ids`` when given) for one attempt each; the
        returned rows carry the number of that attempt in ``attempts``."""
        records = await self.pool.fetch(
            f"UPDATE {TABLE} SET attempts = attempts + 1,"
            " next_attempt_at = now() + make_interval(secs => $1)"
            f" WHERE id IN (SELECT id FROM {TABLE}"
            "   WHERE status = 'pending' AND next_attempt_at <= now() AND attempts < $2"
            "   AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[]))"
            "   ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {COLUMNS}",
            lease,
            max_attempts,
            list(ids) if ids is not None else None,
            limit,
        )
        return sorted((delivery_from_record(r) for r in records), key=lambda d: d.id)

    async def expire(self, max_attempts: int) -> int:
        """Fail deliveries whose last attempt was claimed by a worker that never reported back."""
        result = await self.pool.execute(
            f"UPDATE {TABLE} SET status = 'failed', next_attempt_at = NULL,"
            " last_error = coalesce(last_error || '; ', '')"
            " || 'the worker sending the last attempt stopped before it finished'"
            " WHERE status = 'pending' AND next_attempt_at <= now() AND attempts >= $1",
            max_attempts,
        )
        return int(result.split()[-1])

    async def delivered(self, delivery_id: int, attempt: int, status_code: int) -> bool:
        return await self._finish(
            delivery_id,
            attempt,
            "status = 'delivered', delivered_at = now(), next_attempt_at = NULL,"
            " last_status_code = $3",
            status_code,
        )

    async def attempt_failed(
        self,
        delivery_id: int,
        attempt: int,
        *,
        status_code: int | None,
        error: str,
        retry_in: float | None,
    ) -> bool:
        """Note a failed attempt: due again in ``retry_in`` seconds, or failed for good when
        that is None."""
        if retry_in is None:
            return await self._finish(
                delivery_id,
                attempt,
                "status = 'failed', next_attempt_at = NULL, last_status_code = $3, last_error = $4",
                status_code,
                error,
            )
        return await self._finish(
            delivery_id,
            attempt,
            "next_attempt_at = now() + make_interval(secs => $5), last_status_code = $3,"
            " last_error = $4",
            status_code,
            error,
            retry_in,
        )

    async def _finish(self, delivery_id: int, attempt: int, assignments: str, *args: Any) -> bool:
        result = await self.pool.execute(
            f"UPDATE {TABLE} SET {assignments}"
            " WHERE id = $1 AND attempts = $2 AND status = 'pending'",
            delivery_id,
            attempt,
            *args,
        )
        return bool(result == "UPDATE 1")

    async def for_run(self, run_id: uuid.UUID) -> list[WebhookDelivery]:
        records = await self.pool.fetch(
            f"SELECT {COLUMNS} FROM {TABLE} WHERE run_id = $1 ORDER BY id", run_id
        )
        return [delivery_from_record(r) for r in records]

    async def list(
        self, *, status: DeliveryStatus | None = None, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Newest first."""
        records = await self.pool.fetch(
            f"SELECT {COLUMNS} FROM {TABLE} WHERE ($1::text IS NULL OR status = $1)"
            " ORDER BY id DESC LIMIT $2",
            status.value if status is not None else None,
            limit,
        )
        return [delivery_from_record(r) for r in records]
