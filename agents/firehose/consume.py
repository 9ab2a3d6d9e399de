"""Consume a Jetstream-compatible AT Protocol firehose: validate every event, hand it on, and
keep a resume cursor that only ever covers events made durable.

The consumer reads JSON text frames, validates each with :class:`JetstreamEvent` and passes the
event with its raw bytes to ``publish``; messages that do not validate go to ``dead_letter`` with
the reason and never stop it. Every ``cursor_interval`` seconds a background task takes the
highest ``time_us`` published so far, awaits ``flush`` and only then saves that cursor, so a
stored cursor never names an event that could still be lost. A restart or reconnect resumes
``rewind`` seconds before the cursor; the replayed events are harmless downstream (writes are
idempotent by rev).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidURI, WebSocketException

from sluice.errors import InvalidConfig
from sluice.retries import backoff
from sluice.schemas.firehose import JetstreamEvent, parse_event

log = logging.getLogger(__name__)

Publish = Callable[[JetstreamEvent, bytes], Awaitable[None]]
"""Hand on one event: the parsed event and its raw JSON bytes."""
Flush = Callable[[], Awaitable[None]]
"""Make everything published so far durable (a producer flush)."""
DeadLetter = Callable[[bytes, str], Awaitable[None]]
"""Set aside a refused message: its raw bytes and the reason."""

BINARY_FRAME_REASON = (
    "binary frames (compressed Jetstream) are not supported; connect without compress=true"
)
MAX_MESSAGE_BYTES = 8 * 2**20
# Frames the connection buffers ahead of the consumer; Jetstream events are ~1 KB.
MAX_QUEUE = 1024
MALFORMED_LOG_INTERVAL = 10.0  # seconds between warnings about malformed messages
DEAD_LETTER_KEEP = 64 * 1024
"""Bytes of a refused event kept in its dead letter (which is a Kafka message too)."""
_MAX_ERRORS_IN_REASON = 5


class CursorStore(Protocol):
    """Where a consumer keeps its resume cursor (a Jetstream ``time_us``) by name
    (``sluice.storage.firehose.PgCursorStore`` in PostgreSQL)."""

    async def load(self, name: str) -> int | None: ...

    async def save(self, name: str, time_us: int) -> None: ...


def subscribe_url(
    base: str, *, collections: Sequence[str], dids: Sequence[str], cursor: int | None
) -> str:
    """The Jetstream subscribe URL: ``base`` with the filters and the cursor as query
    parameters. A query already in ``base`` is kept (a ``cursor`` in it is replaced when
    ``cursor`` is given)."""
    parts = urlsplit(base)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if cursor is not None:
        query = [(k, v) for k, v in query if k != "cursor"]
    query += [("wantedCollections", c) for c in collections]
    query += [("wantedDids", d) for d in dids]
    if cursor is not None:
        query.append(("cursor", str(cursor)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def describe_invalid(exc: ValidationError) -> str:
    """A short reason for a refused message, naming the fields that are wrong."""
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"not JSON: {errors[0]['msg']}"
    parts = []
    for err in errors[:_MAX_ERRORS_IN_REASON]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    if len(errors) > _MAX_ERRORS_IN_REASON:
        parts.append(f"and {len(errors) - _MAX_ERRORS_IN_REASON} more errors")
    return "invalid Jetstream event: " + "; ".join(parts)


@dataclass
class ConsumerStats:
    """Counters of one consumer. ``last_time_us`` is the highest ``time_us`` published."""

    received: int = 0
    published: int = 0
    malformed: int = 0
    reconnects: int = 0
    last_time_us: int | None = None


async def _sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


class JetstreamConsumer:
    """One firehose subscription, from its stored cursor on, until stopped.

    ``run()`` returns when ``stop`` is set, after a last flush and cursor save. Connection
    errors and closes are retried with backoff; errors of ``publish``, ``dead_letter`` or the
    final save propagate (the cursor then stays at the last save).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        collections: Sequence[str] = (),
        dids: Sequence[str] = (),
        cursor_store: CursorStore,
        publish: Publish,
        flush: Flush,
        dead_letter: DeadLetter,
        rewind: float = 5.0,
        cursor_interval: float = 1.0,
        backoff: float = 0.5,
        backoff_max: float = 30.0,
        max_event_bytes: int = 0,
    ) -> None:
        if urlsplit(url).scheme not in ("ws", "wss"):
            raise InvalidConfig(
                f"firehose url {url!r} must start with ws:// or wss://"
                " (a Jetstream /subscribe endpoint)"
            )
        if cursor_interval <= 0 or backoff <= 0 or backoff_max < backoff or rewind < 0:
            raise InvalidConfig(
                f"firehose {name!r}: cursor_interval and backoff must be > 0, backoff_max >="
                f" backoff and rewind >= 0 (got cursor_interval={cursor_interval},"
                f" backoff={backoff}, backoff_max={backoff_max}, rewind={rewind})"
            )
        self.url = url
        self.name = name
        self.collections = tuple(collections)
        self.dids = tuple(dids)
        self.rewind = rewind
        self.cursor_interval = cursor_interval
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_event_bytes = max_event_bytes
        """events larger are dead-lettered (0: no limit): the topic's message limit, less the
        record's overhead. Published, one would fail every flush, and the consumer would
        resume before it again and again."""
        self.stats = ConsumerStats()
        self._cursor_store = cursor_store
        self._publish = publish
        self._flush = flush
        self._dead_letter = dead_letter
        # Highest time_us whose publish returned, and the cursor last saved; -1: none.
        self._high_us = -1
        self._saved_us = -1
        self._malformed_log_at = 0.0
        self._malformed_unlogged = 0
        # The open connection, and when (monotonic) the server was last heard on it: a frame,
        # or the pong to a ping of ``heard_from_server``.
        self._ws: ClientConnection | None = None
        self._heard_at: float | None = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or the task is cancelled)."""
        if stop is None:
            stop = asyncio.Event()
        stored = await self._cursor_store.load(self.name)
        if stored is not None:
            self._saved_us = max(self._saved_us, stored)
            self._high_us = max(self._high_us, stored)
        saver = asyncio.create_task(
            self._save_periodically(stop), name=f"firehose-cursor-{self.name}"
        )
        try:
            await self._consume(stop)
        except BaseException:
            saver.cancel()
            await asyncio.wait((saver,))
            raise
        await saver
        await self._checkpoint()
        log.info(
            "firehose %s: stopped at cursor %s (%d events published, %d malformed)",
            self.name,
            self._saved_us if self._saved_us >= 0 else None,
            self.stats.published,
            self.stats.malformed,
        )

    async def heard_from_server(self, within: float) -> bool:
        """Whether the server was heard in the last ``within`` seconds: a frame came, or it
        answers a ping now (a quiet, filtered stream sends no frames for a long time). False
        while not connected, however recently the process was alive."""
        ws = self._ws
        if ws is None:
            return False
        if self._heard_at is not None and time.monotonic() - self._heard_at <= within:
            return True
        try:
            pong = await ws.ping()
            await asyncio.wait_for(pong, within)
        except (TimeoutError, WebSocketException, OSError):
            return False
        if ws is self._ws:
            self._heard_at = time.monotonic()
            return True
        return False

    def saved_cursor(self) -> int | None:
        """The last cursor saved (or loaded at the start); None before there is one."""
        return self._saved_us if self._saved_us >= 0 else None

    def resume_cursor(self) -> int | None:
        """Where a (re)connection starts: the latest saved-or-published cursor minus rewind;
        None (live only) when there is none."""
        if self._high_us < 0:
            return None
        return max(0, self._high_us - round(self.rewind * 1_000_000))

    async def _consume(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            cursor = self.resume_cursor()
            url = subscribe_url(
                self.url, collections=self.collections, dids=self.dids, cursor=cursor
            )
            log.info(
                "firehose %s: connecting to %s from cursor %s (%d collections, %d dids)",
                self.name,
                self.url,
                cursor if cursor is not None else "live",
                len(self.collections),
                len(self.dids),
            )
            published_before = self.stats.published
            try:
                ws = await self._open(url, stop)
                if ws is None:
                    return
                async with ws:
                    log.info("firehose %s: connected", self.name)
                    await self._read(ws, stop)
                reason = f"connection closed (code {ws.close_code} {ws.close_reason!r})"
            except InvalidURI as exc:
                raise InvalidConfig(f"firehose {self.name!r}: bad url {url!r}: {exc}") from exc
            except (OSError, TimeoutError, WebSocketException) as exc:
                reason = f"connection failed: {type(exc).__name__}: {exc}"
            if stop.is_set():
                return
            if self.stats.published > published_before:
                failures = 0
            failures += 1
            # A loop that runs on between failures (and resets them on progress), so the
            # policy's delay rather than its loop: the same backoff with jitter.
            delay = backoff(failures, first=self.backoff, cap=self.backoff_max)
            # A warning: `sluice firehose` shows it without -v, so a consumer that cannot reach
            # its Jetstream says why instead of sitting silent.
            log.warning(
                "firehose %s: %s; reconnecting in %.2fs (%d published so far)",
                self.name,
                reason,
                delay,
                self.stats.published,
            )
            await _sleep_unless_stopped(stop, delay)
            if not stop.is_set():
                self.stats.reconnects += 1

    async def _open(self, url: str, stop: asyncio.Event) -> ClientConnection | None:
        """A new connection, or None when ``stop`` was set before it opened."""
        opening = asyncio.ensure_future(
            connect(url, max_size=MAX_MESSAGE_BYTES, max_queue=MAX_QUEUE, compression=None)
        )
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((opening, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not opening.done():
                opening.cancel()
                await asyncio.wait((opening,))
        if opening.cancelled():
            return None
        return opening.result()

    async def _read(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        # The hot loop: no await per event besides publish; the cursor is saved elsewhere.
        closer = asyncio.create_task(self._close_when_stopped(ws, stop))
        validate = parse_event
        publish = self._publish
        stats = self.stats
        self._ws = ws
        try:
            async for message in ws:
                self._heard_at = time.monotonic()
                stats.received += 1
                if not isinstance(message, str):
                    await self._refuse(message, BINARY_FRAME_REASON)
                    continue
                raw = message.encode()
                if self.max_event_bytes and len(raw) > self.max_event_bytes:
                    await self._refuse(
                        raw,
                        f"an event of {len(raw):,} bytes is larger than the"
                        f" {self.max_event_bytes:,} bytes a Kafka message may hold here; raise"
                        " SLUICE_KAFKA_MAX_MESSAGE_BYTES (and the broker's message.max.bytes)"
                        " to keep such events",
                    )
                    continue
                try:
                    event = validate(raw)
                except ValidationError as exc:
                    await self._refuse(raw, describe_invalid(exc))
                    continue
                await publish(event, raw)
                stats.published += 1
                if event.time_us > self._high_us:
                    self._high_us = stats.last_time_us = event.time_us
        finally:
            self._ws = None
            closer.cancel()

    @staticmethod
    async def _close_when_stopped(ws: ClientConnection, stop: asyncio.Event) -> None:
        await stop.wait()
        await ws.close()

    async def _refuse(self, raw: bytes, reason: str) -> None:
        self.stats.malformed += 1
        now = time.monotonic()
        if now >= self._malformed_log_at:
            log.warning(
                "firehose %s: dead-lettered a malformed message (%d more since the last"
                " warning, %d in all): %s",
                self.name,
                self._malformed_unlogged,
                self.stats.malformed,
                reason,
            )
            self._malformed_log_at = now + MALFORMED_LOG_INTERVAL
            self._malformed_unlogged = 0
        else:
            self._malformed_unlogged += 1
        if len(raw) > DEAD_LETTER_KEEP:
            reason += f" (the dead letter keeps its first {DEAD_LETTER_KEEP:,} bytes)"
            raw = raw[:DEAD_LETTER_KEEP]
        await self._dead_letter(raw, reason)

    async def _save_periodically(self, stop: asyncio.Event) -> None:
        while True:
            await _sleep_unless_stopped(stop, self.cursor_interval)
            if stop.is_set():
                return
            try:
                await self._checkpoint()
            except Exception as exc:
                log.warning(
                    "firehose %s: cursor %d not saved, trying again in %.1fs: %s: %s",
                    self.name,
                    self._high_us,
                    self.cursor_interval,
                    type(exc).__name__,
                    exc,
                )

    async def _checkpoint(self) -> None:
        """Flush, then save the highest time_us published before the flush began."""
        target = self._high_us
        if target <= self._saved_us:
            return
        await self._flush()
        await self._cursor_store.save(self.name, target)
        self._saved_us = target
        log.debug("firehose %s: cursor saved at %d", self.name, target)
