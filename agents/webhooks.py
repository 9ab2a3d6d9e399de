"""Webhooks: run lifecycle events sent to configured URLs as signed JSON POSTs.

For each event on the lifecycle topic, every hook that wants it (``SLUICE_WEBHOOKS`` and the
importer's own ``webhooks``) gets a row in the delivery log (``sluice webhooks``), and the worker
sends it at once. An attempt that fails (a network error, a timeout, an answer other than 2xx)
is tried again after ``SLUICE_WEBHOOK_BACKOFF`` seconds, doubling each time up to
``SLUICE_WEBHOOK_BACKOFF_MAX``; after ``SLUICE_WEBHOOK_MAX_ATTEMPTS`` attempts the delivery is
failed. Delivery is at least once: a receiver keys on ``Sluice-Event-Id``.

Signature scheme (v1). Every request carries::

    Content-Type: application/json
    Sluice-Event: run.completed
    Sluice-Event-Id: 5f0c...            (the event's UUID, the same on every attempt)
    Sluice-Timestamp: 1718000000        (unix seconds when this attempt was sent)
    Sluice-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The signed message is the ``Sluice-Timestamp`` value, a dot, and the body's bytes exactly as
sent. A receiver recomputes the HMAC over the body as received (before any JSON parsing),
compares in constant time, and rejects timestamps far from its own clock, so a captured request
cannot be replayed later. ``verify_signature`` does all three with the standard library only:
copy it into the receiver.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import orjson
from pydantic import SecretStr, ValidationError

from sluice.agents.deps import Deps
from sluice.agents.fetch.trigger import after_import
from sluice.agents.wiring import Wiring, acknowledged
from sluice.config import WebhookSettings
from sluice.errors import InvalidConfig, TransientError
from sluice.retries import Policy, backoff, retrying
from sluice.schemas.events import LifecycleEvent
from sluice.schemas.importers import Importer
from sluice.schemas.webhooks import WebhookDelivery
from sluice.storage.webhooks import DeliveryLog

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

HEADER_EVENT = "Sluice-Event"
HEADER_EVENT_ID = "Sluice-Event-Id"
HEADER_TIMESTAMP = "Sluice-Timestamp"
HEADER_SIGNATURE = "Sluice-Signature"
SIGNATURE_VERSION = "v1"

# A claimed attempt is leased for the request's timeout plus this margin to record the outcome.
LEASE_MARGIN = 30.0
CLAIM_BATCH = 50


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``Sluice-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: str | bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance: float = 300,
) -> bool:
    """True when ``signature`` (the Sluice-Signature header) is ``secret``'s signature of
    ``body`` (the raw request body) at ``timestamp`` (the Sluice-Timestamp header), and that
    timestamp is within ``tolerance`` seconds of this machine's clock."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    # A list of signatures ("v1=..., v1=...") is accepted so a secret can be rotated.
    for part in signature.split(","):
        version, _, value = part.strip().partition("=")
        if version == "v1" and hmac.compare_digest(expected.encode(), value.encode()):
            return True
    return False


def transient(exc: BaseException) -> bool:
    """Worth recording an event again for: the database is away (or the connection timed
    out), not refusing the row."""
    return isinstance(
        exc, TransientError | OSError | TimeoutError | asyncpg.exceptions.OperatorInterventionError
    )


def origin(url: str) -> str:
    """What logs show of a URL: webhook URLs often carry a token in their path or query."""
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}"


@dataclass(frozen=True)
class Hook:
    """A configured webhook with its secret resolved."""

    url: str
    events: frozenset[str]
    secret: SecretStr = field(repr=False)
    importers: frozenset[str] | None = None
    """Only runs of these importers; None means every importer."""

    def wants(self, event_type: str, importer: str) -> bool:
        return event_type in self.events and (self.importers is None or importer in self.importers)


class HookSet:
    """Every hook a worker knows: shared ones (``SLUICE_WEBHOOKS``) and importers' own."""

    def __init__(
        self, shared: Sequence[Hook] = (), own: Mapping[str, Sequence[Hook]] | None = None
    ) -> None:
        self.shared = tuple(shared)
        self.own = {slug: tuple(hooks) for slug, hooks in (own or {}).items() if hooks}

    def __bool__(self) -> bool:
        return bool(self.shared or self.own)

    def for_event(self, event_type: str, importer: str) -> list[Hook]:
        """The hooks that want this event, one per URL (an importer's own hook first)."""
        found: dict[str, Hook] = {}
        for hook in (*self.own.get(importer, ()), *self.shared):
            if hook.wants(event_type, importer):
                found.setdefault(hook.url, hook)
        return list(found.values())

    def for_delivery(self, delivery: WebhookDelivery) -> Hook | None:
        importer = str(delivery.payload.get("importer", ""))
        for hook in self.for_event(delivery.event_type, importer):
            if hook.url == delivery.url:
                return hook
        return None


def resolve_hooks(
    settings: WebhookSettings, importers: Iterable[Importer], environ: Mapping[str, str]
) -> HookSet:
    """Hooks with their secrets, read from ``environ`` by the entry point. InvalidConfig when a
    hook has no secret: an unsigned webhook is a mistake, found at start rather than later."""

    def secret_for(url: str, secret_env: str | None) -> SecretStr:
        if secret_env:
            value = environ.get(secret_env, "")
            if not value:
                raise InvalidConfig(
                    f"the webhook to {origin(url)} takes its secret from the environment"
                    f" variable {secret_env}, which is not set"
                )
            return SecretStr(value)
        if not settings.secret.get_secret_value():
            raise InvalidConfig(
                f"the webhook to {origin(url)} has no secret: set SLUICE_WEBHOOK_SECRET, or name"
                " an environment variable holding one in the hook's secret_env"
            )
        return settings.secret

    shared = [
        Hook(
            url=t.url,
            events=frozenset(t.events),
            secret=secret_for(t.url, t.secret_env),
            importers=frozenset(t.importers) if t.importers is not None else None,
        )
        for t in settings.hooks
    ]
    own = {
        importer.slug: [
            Hook(url=w.url, events=frozenset(w.events), secret=secret_for(w.url, w.secret_env))
            for w in importer.webhooks
        ]
        for importer in importers
    }
    return HookSet(shared, own)


class WebhookDispatcher:
    """Records and sends one worker's webhook deliveries. Its two entry points never raise: the
    agent and the timer that call them must keep running."""

    def __init__(
        self,
        deps: Deps,
        hooks: HookSet,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.deps = deps
        self.hooks = hooks
        self.settings = deps.settings.webhooks
        self.transport = transport

    async def deliveries(self) -> DeliveryLog:
        return DeliveryLog(self.deps.pool)

    async def on_event(self, value: bytes | None) -> None:
        """Record the deliveries one lifecycle message asks for, then try each once."""
        if not self.hooks:
            return
        try:
            event = LifecycleEvent.model_validate_json(value or b"")
        except ValidationError as exc:
            log.warning("webhooks: skipped a lifecycle message that is not an event: %s", exc)
            return
        hooks = self.hooks.for_event(event.type, event.importer)
        if not hooks:
            return
        age = time.time() - event.time.timestamp()
        if age > self.settings.max_event_age:
            log.info(
                "webhooks: event %s (%s of run %s) is %.0fs old, over SLUICE_WEBHOOK_MAX_EVENT_AGE;"
                " not delivered",
                event.event_id,
                event.type,
                event.run_id,
                age,
            )
            return
        try:
            ids = await self._record(event, orjson.loads(value or b""), hooks)
            if ids:
                dlog = await self.deliveries()
                await self._send(await dlog.claim(lease=self.lease, max_attempts=1, ids=ids))
        except Exception:
            log.exception(
                "webhooks: could not deliver event %s (%s of run %s)",
                event.event_id,
                event.type,
                event.run_id,
            )

    async def retry_due(self) -> int:
        """Send the deliveries whose next attempt is due; returns how many were tried."""
        if not self.hooks:
            return 0
        try:
            dlog = await self.deliveries()
            expired = await dlog.expire(self.settings.max_attempts)
            if expired:
                log.warning("webhooks: %d deliveries failed: their last attempt was lost", expired)
            due = await dlog.claim(
                lease=self.lease, max_attempts=self.settings.max_attempts, limit=CLAIM_BATCH
            )
            await self._send(due)
            return len(due)
        except Exception:
            log.exception("webhooks: retrying due deliveries failed; will try again")
            return 0

    @property
    def lease(self) -> float:
        return self.settings.timeout + LEASE_MARGIN

    async def _record(
        self, event: LifecycleEvent, payload: dict[str, Any], hooks: list[Hook]
    ) -> list[int]:
        # Giving up on a passing database error would lose the event for good: the agent's
        # offset moves on. A few tries ride out a restart or failover.
        async def record() -> list[int]:
            dlog = await self.deliveries()
            return await dlog.record(
                event_id=event.event_id,
                run_id=event.run_id,
                event_type=event.type,
                payload=payload,
                urls=[h.url for h in hooks],
            )

        policy = Policy(attempts=self.deps.settings.pipeline.apply_attempts, retry_on=transient)
        return await retrying(f"webhooks: recording event {event.event_id}", record, policy)

    async def _send(self, due: Sequence[WebhookDelivery]) -> None:
        if not due:
            return
        async with httpx.AsyncClient(
            transport=self.transport, timeout=self.settings.timeout, follow_redirects=False
        ) as client:
            await asyncio.gather(*(self._attempt(client, d) for d in due))

    async def _attempt(self, client: httpx.AsyncClient, delivery: WebhookDelivery) -> None:
        try:
            status_code, error = await self._post(client, delivery)
            await self._note_outcome(delivery, status_code, error)
        except Exception:
            # The row stays leased; when the lease runs out the attempt is made again.
            log.exception("webhooks: delivery %d: could not record its outcome", delivery.id)

    async def _post(
        self, client: httpx.AsyncClient, delivery: WebhookDelivery
    ) -> tuple[int | None, str | None]:
        """One attempt: (status code or None, error or None)."""
        hook = self.hooks.for_delivery(delivery)
        if hook is None:
            return None, "no webhook with this URL wants this event in this worker's configuration"
        body = orjson.dumps(delivery.payload)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            HEADER_EVENT: delivery.event_type,
            HEADER_EVENT_ID: str(delivery.event_id),
            HEADER_TIMESTAMP: timestamp,
            HEADER_SIGNATURE: sign(hook.secret.get_secret_value().encode(), timestamp, body),
        }
        try:
            # httpx's timeout bounds each phase; this bounds the whole request, within the lease.
            async with asyncio.timeout(self.settings.timeout):
                async with client.stream(
                    "POST", delivery.url, content=body, headers=headers
                ) as response:
                    if response.is_success:
                        return response.status_code, None
                    excerpt = await _excerpt(response)
                    return response.status_code, f"HTTP {response.status_code}: {excerpt}"
        except TimeoutError:
            return None, f"no answer within {self.settings.timeout:g}s"
        except Exception as exc:  # any failure to send is a failed attempt, retried later
            detail = str(exc)
            return None, f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__

    async def _note_outcome(
        self, delivery: WebhookDelivery, status_code: int | None, error: str | None
    ) -> None:
        dlog = await self.deliveries()
        attempt = delivery.attempts
        where = origin(delivery.url)
        if error is None:
            assert status_code is not None
            await dlog.delivered(delivery.id, attempt, status_code)
            log.info(
                "webhooks: delivery %d (%s of run %s) to %s delivered on attempt %d",
                delivery.id,
                delivery.event_type,
                delivery.run_id,
                where,
                attempt,
            )
            return
        final = attempt >= self.settings.max_attempts
        retry_in = (
            None
            if final
            # Exact, no jitter: the next attempt is a time stored in PostgreSQL, shown to users.
            else backoff(
                attempt, first=self.settings.backoff, cap=self.settings.backoff_max, jitter=False
            )
        )
        await dlog.attempt_failed(
            delivery.id, attempt, status_code=status_code, error=error[:1000], retry_in=retry_in
        )
        log.warning(
            "webhooks: delivery %d (%s of run %s) to %s attempt %d failed: %s; %s",
            delivery.id,
            delivery.event_type,
            delivery.run_id,
            where,
            attempt,
            error[:200],
            "giving up" if retry_in is None else f"retrying in {retry_in:g}s",
        )


async def _excerpt(response: httpx.Response, limit: int = 200) -> str:
    """The start of an error answer, for the delivery log."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit].decode(errors="replace").strip()


def register(app: faust.App, wiring: Wiring, hooks: HookSet) -> None:
    """The ``webhooks`` agent, which reacts to lifecycle events (the webhooks, and moving
    pulled files after their import), and the timer that retries webhook deliveries."""
    deps = wiring.deps
    webhooks = WebhookDispatcher(deps, hooks)

    async def react_to(event: Any) -> None:
        try:
            LifecycleEvent.model_validate_json(event.value or b"")
        except ValidationError as exc:
            await wiring.dead_letter(event, f"not a lifecycle event: {exc.errors()[:3]}")
            return
        for react in (webhooks.on_event, partial(after_import, deps)):
            try:
                await react(event.value)
            except Exception:
                # The delivery log and the next event go on; a webhook retried later.
                log.exception("reacting to a lifecycle event failed")

    @app.agent(wiring.topics.lifecycle, name="webhooks")
    async def webhooks_agent(stream: Any) -> None:
        """Reactions to lifecycle events: webhooks, and moving pulled files after import."""
        async for event in stream.noack().events():
            await acknowledged(event, react_to)

    @app.timer(deps.settings.webhooks.retry_interval)  # type: ignore[untyped-decorator]
    async def retry_webhooks() -> None:
        await webhooks.retry_due()
