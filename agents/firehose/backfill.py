"""Backfill: import a repository's history from its PDS, combined with the live firehose
without gaps, stale writes or resurrected deletes.

For each DID: check that the firehose covers it (so whatever changes from now on arrives live),
resolve its PDS (did:plc through the directory, did:web through its document), read the repo's
current rev (``com.atproto.sync.getLatestCommit``) and tag every backfilled record with it, then
page through ``com.atproto.repo.listRecords`` per collection. ``storage.atproto`` applies a
write only when its rev is newer than what is stored, so a record changed live during the
backfill keeps its newer version. The cursor per (did, collection) is stored with each page:
an interrupted backfill resumes where it stopped. A 429 backs the PDS off for the whole cluster
and is never terminal.

Every request (the PLC directory, a did:web document, the PDS, and each redirect) goes through
the host policy of ``SLUICE_URL_*`` (``sluice.agents.fetch.guard``): a DID document cannot point
the workers at an internal address.

Each repository's backfill is a run (importer ``atproto.backfill``) with lifecycle events
``backfill.started``, ``backfill.progress`` (per page), ``backfill.completed`` and
``backfill.failed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import asyncpg
import httpx

from sluice.agents.fetch.api import limited_get, source_unavailable
from sluice.agents.fetch.guard import GuardedClient, check_url
from sluice.config import FirehoseSettings, UrlSettings
from sluice.errors import SourceError, SourceUnavailable, TerminalError, TransientError
from sluice.retries import Policy, retrying
from sluice.schemas.firehose import (
    BACKFILL_IMPORTER,
    BackfillRequested,
    BackfillState,
    BackfillStatus,
    RecordOrigin,
)
from sluice.schemas.runs import Run
from sluice.storage import backfill as store
from sluice.storage.atproto import RecordWrite, write_records
from sluice.storage.db import CONFLICT
from sluice.storage.ratelimit import RateLimiter, RateStats

if TYPE_CHECKING:
    from sluice.agents.firehose.project import Projections

log = logging.getLogger(__name__)

IMPORTER = BACKFILL_IMPORTER


class BackfillError(TerminalError):
    """The repository cannot be backfilled as asked (unknown DID, no PDS, deleted repo)."""


class PdsUnavailable(TransientError):
    """The PDS or the directory did not answer; the backfill can be resumed."""


class PdsClient:
    """XRPC calls to PDSes and DID resolution, under a per-PDS rate limit shared by the cluster
    and the host policy (``policy``) for every request and redirect."""

    def __init__(
        self, settings: FirehoseSettings, policy: UrlSettings, limiter: RateLimiter
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.limiter = limiter
        self.http = GuardedClient(policy, timeout=30, headers={"User-Agent": "sluice-backfill/0.1"})

    async def close(self) -> None:
        await self.http.aclose()

    async def get(self, url: str, stats: RateStats, params: dict[str, Any] | None = None) -> Any:
        """GET JSON; 429s wait (never terminal), 5xx and network errors retried, other 4xx
        raise BackfillError with the server's error, and so does a URL or redirect the host
        policy refuses (nothing is sent to it)."""
        limit = (f"pds:{urlsplit(url).netloc}", self.settings.pds_rate, 5)

        async def get() -> httpx.Response:
            try:
                return await limited_get(self.http, self.limiter, limit, stats, url, params=params)
            except SourceError as exc:
                raise BackfillError(f"GET {url}: {exc}") from exc

        policy = Policy(attempts=self.settings.max_attempts, cap=30.0, retry_on=source_unavailable)
        try:
            response = await retrying(f"GET {url}", get, policy)
        except SourceUnavailable as exc:
            raise PdsUnavailable(
                f"GET {url} failed {self.settings.max_attempts} times ({exc})"
            ) from exc
        if not response.is_success:
            try:
                body = response.json()
                detail = f"{body.get('error')}: {body.get('message')}"
            except ValueError:
                detail = response.text[:200]
            raise BackfillError(f"GET {url} answered HTTP {response.status_code} ({detail})")
        try:
            return response.json()
        except ValueError:
            raise BackfillError(f"GET {url} answered with invalid JSON") from None

    async def resolve_pds(self, did: str, stats: RateStats) -> str:
        if did.startswith("did:plc:"):
            doc = await self.get(f"{self.settings.plc_url.rstrip('/')}/{did}", stats)
        elif did.startswith("did:web:"):
            host = unquote(did.removeprefix("did:web:"))
            doc = await self.get(self.settings.did_web_url.format(host=host), stats)
        else:
            raise BackfillError(f"{did}: only did:plc and did:web can be resolved")
        services = doc.get("service") if isinstance(doc, dict) else None
        for service in services if isinstance(services, list) else []:
            if isinstance(service, dict) and str(service.get("id", "")).endswith("#atproto_pds"):
                endpoint = service.get("serviceEndpoint")
                if not isinstance(endpoint, str):
                    raise BackfillError(f"{did}: its #atproto_pds serviceEndpoint is not a URL")
                pds = endpoint.rstrip("/")
                try:
                    await check_url(pds, self.policy)
                except SourceUnavailable as exc:
                    raise PdsUnavailable(f"{did}: its PDS {pds}: {exc}") from exc
                except SourceError as exc:
                    raise BackfillError(
                        f"{did}: its DID document names the PDS {pds}, which is refused: {exc}"
                    ) from exc
                return pds
        raise BackfillError(f"{did}: its DID document names no #atproto_pds service")

    async def latest_rev(self, pds: str, did: str, stats: RateStats) -> str:
        body = await self.get(f"{pds}/xrpc/com.atproto.sync.getLatestCommit", stats, {"did": did})
        return str(body["rev"])

    async def collections(self, pds: str, did: str, stats: RateStats) -> list[str]:
        body = await self.get(f"{pds}/xrpc/com.atproto.repo.describeRepo", stats, {"repo": did})
        return [str(c) for c in body.get("collections") or []]

    async def list_records(
        self, pds: str, did: str, collection: str, cursor: str | None, stats: RateStats
    ) -> tuple[list[dict[str, Any]], str | None]:
        params: dict[str, Any] = {
            "repo": did,
            "collection": collection,
            "limit": self.settings.page_limit,
        }
        if cursor:
            params["cursor"] = cursor
        body = await self.get(f"{pds}/xrpc/com.atproto.repo.listRecords", stats, params)
        records = body.get("records") or []
        return records, body.get("cursor") or None


NAMED_CONSUMERS = 5
"""How many consumers a refused backfill names."""


async def firehose_covers(
    pool: asyncpg.Pool, did: str, collections: Sequence[str], freshness: float
) -> str | None:
    """None when a live firehose consumer lets ``did`` and each of ``collections`` through;
    else why not and what to do. Live: it heard from its server (a frame, or the answer to a
    ping) within ``freshness`` seconds and has saved a cursor; a consumer whose process runs
    but cannot reach its server is not."""
    consumers = await store.consumer_cursors(pool)
    start = (
        "start one (`sluice firehose`, or SLUICE_FIREHOSE_ENABLED=true on the workers) before "
        "the backfill, so nothing changed during it is missed"
    )
    if not consumers:
        return f"no firehose consumer has run: {start}"
    live = [c for c in consumers if c.age <= freshness and c.time_us is not None]
    if not live:
        # Rows of consumers long gone stay in sluice.firehose_cursors: the message names a
        # few, those that never heard from their server first (starting, or pointed at the
        # wrong place), then those that heard from it last.
        recent = sorted(consumers, key=lambda c: (c.heard_at is not None, c.age))
        named = "; ".join(_not_live(c) for c in recent[:NAMED_CONSUMERS])
        if len(recent) > NAMED_CONSUMERS:
            named += f"; and {len(recent) - NAMED_CONSUMERS} more that heard from it earlier"
        return (
            f"no live firehose consumer (one that heard from its server in the last "
            f"{freshness:.0f}s and saved a cursor): {named}. Check that it runs and that"
            " SLUICE_FIREHOSE_URL (or `sluice firehose --url`)"
            " reaches a Jetstream, then start the backfill"
        )
    for_did = [c for c in live if not c.dids or did in c.dids]
    if not for_did:
        names = ", ".join(c.name for c in live)
        return (
            f"no live firehose consumer lets {did} through (its DID filter: {names}): add "
            f"{did} to SLUICE_FIREHOSE_DIDS of one of them, or leave that filter empty"
        )
    best, missing = None, list(collections)
    for consumer in for_did:
        uncovered = [
            c for c in collections if consumer.collections and not _matches(c, consumer.collections)
        ]
        if not uncovered:
            return None
        if best is None or len(uncovered) < len(missing):
            best, missing = consumer, uncovered
    assert best is not None
    return (
        f"the collection {missing[0]} of {did} is not covered: firehose consumer {best.name} "
        f"lets only {', '.join(best.collections)} through, so changes to {missing[0]} during "
        f"the backfill would be lost; add {missing[0]} to its SLUICE_FIREHOSE_COLLECTIONS, or "
        "name only covered collections in the backfill"
    )


def _not_live(consumer: store.ConsumerCursor) -> str:
    """Why ``consumer`` is not live, in a few words."""
    if consumer.heard_at is None:
        return f"{consumer.name} never heard from its server"
    heard = consumer.heard_at.isoformat(timespec="seconds")
    if consumer.time_us is None:
        return (
            f"{consumer.name} last heard from its server at {heard} but saved no cursor yet "
            "(no event matched its filters)"
        )
    return f"{consumer.name} last heard from its server at {heard} ({consumer.age:.0f}s ago)"


def _matches(collection: str, wanted: Sequence[str]) -> bool:
    return any(
        collection == w or (w.endswith(".*") and collection.startswith(w[:-1])) for w in wanted
    )


async def record_queued(pool: asyncpg.Pool, did: str, collections: Sequence[str]) -> None:
    """Show a backfill handed to the workers in ``backfill-status`` at once: ``pending`` for
    each collection it names (or ``*``), before the request is sent, so a worker that takes it
    at once finds the row. A collection already backfilled stays ``completed``; a failed one
    is pending again."""
    await store.record_queued(pool, did, collections)


class Backfiller:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: FirehoseSettings,
        policy: UrlSettings,
        projections: Projections | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.projections = projections
        self.limiter = RateLimiter(pool)
        self.pds = PdsClient(settings, policy, self.limiter)

    async def close(self) -> None:
        await self.pds.close()

    async def states(
        self, did: str | None = None, status: str | None = None
    ) -> list[BackfillState]:
        return await store.states(self.pool, did, status)

    async def unfinished_dids(self) -> list[str]:
        return await store.unfinished_dids(self.pool)

    async def reset(self, did: str, collections: Sequence[str]) -> None:
        await store.reset_states(self.pool, did, collections)

    async def backfill(self, request: BackfillRequested) -> Run:
        """Backfill one repository; returns its run (completed or failed)."""
        if request.reset:
            await self.reset(request.did, request.collections)
        run = await store.start_run(self.pool, request)
        stats = RateStats()
        try:
            pds = await self.pds.resolve_pds(request.did, stats)
            # The collections first (describeRepo when none are named): each is checked
            # against the firehose's filters before the first page is read.
            collections = list(request.collections) or await self.pds.collections(
                pds, request.did, stats
            )
            why = await firehose_covers(
                self.pool, request.did, collections, self.settings.freshness
            )
            if why is not None:
                raise BackfillError(why)
            async with self._pds_slot(pds, request.did, run):
                await self._backfill_repo(run, request.did, collections, pds, stats)
        except (BackfillError, PdsUnavailable) as exc:
            log.warning("backfill of %s failed: %s", request.did, exc)
            await store.fail_run(self.pool, run.id, request.did, str(exc))
        finally:
            await store.add_rate_stats(self.pool, run.id, stats)
        return await store.read_run(self.pool, run.id)

    async def _backfill_repo(
        self, run: Run, did: str, collections: list[str], pds: str, stats: RateStats
    ) -> None:
        states = {s.collection: s for s in await self.states(did)}
        todo = [
            c
            for c in collections
            if states.get(c) is None or states[c].status != BackfillStatus.COMPLETED
        ]
        rev = next(
            (s.rev for s in states.values() if s.rev and s.status != BackfillStatus.COMPLETED), None
        )
        if rev is None and todo:
            # Read before the first page: every record of this pass is at least this new.
            rev = await self.pds.latest_rev(pds, did, stats)
        for collection in todo:
            await store.mark_in_progress(self.pool, did, collection, rev, pds, run.id)
        # The collections are known now: the queued placeholder (see record_queued) goes.
        await store.delete_queued_placeholder(self.pool, did)
        for collection in todo:
            state = await self.states(did)
            current = next(s for s in state if s.collection == collection)
            cursor = current.cursor
            tag = current.rev or rev
            assert tag is not None
            while True:
                records, next_cursor = await self.pds.list_records(
                    pds, did, collection, cursor, stats
                )
                await self._record_page(run, did, collection, tag, records, next_cursor)
                if next_cursor is None or not records:
                    break
                cursor = next_cursor
                if self.settings.page_delay:
                    await asyncio.sleep(self.settings.page_delay)
            await store.mark_completed(self.pool, did, collection)
        await store.complete_run(self.pool, run.id)
        log.info("backfill of %s completed (%d collections)", did, len(todo))

    async def _record_page(
        self,
        run: Run,
        did: str,
        collection: str,
        rev: str,
        records: list[dict[str, Any]],
        next_cursor: str | None,
    ) -> None:
        writes = []
        failed = 0
        for r in records:
            uri, value = r.get("uri"), r.get("value")
            parts = str(uri or "").removeprefix("at://").split("/")
            if len(parts) != 3 or parts[0] != did or not isinstance(value, dict):
                failed += 1
                continue
            writes.append(RecordWrite(did, parts[1], parts[2], rev, r.get("cid"), value))
        try:
            await retrying(
                f"backfill page of {did} {collection}",
                partial(
                    self._write_page,
                    run,
                    did,
                    collection,
                    writes,
                    failed,
                    next_cursor,
                    len(records),
                ),
                CONFLICT,  # a live write of the same record committed meanwhile: go again
            )
        except asyncpg.exceptions.SerializationError as exc:
            raise PdsUnavailable(
                f"{did}: page of {collection} kept conflicting with live writes"
            ) from exc

    async def _write_page(
        self,
        run: Run,
        did: str,
        collection: str,
        writes: list[RecordWrite],
        failed: int,
        next_cursor: str | None,
        listed: int,
    ) -> None:
        # Serializable, like the live path: see agents/firehose.py.
        async with self.pool.acquire() as conn, conn.transaction(isolation="serializable"):
            counts = await write_records(conn, writes, RecordOrigin.BACKFILL)
            if self.projections is not None and self.projections.importers:
                await self.projections.apply(conn, counts)
            await store.record_page(
                conn, run.id, did, collection, next_cursor, counts, failed, listed
            )

    @asynccontextmanager
    async def _pds_slot(self, pds: str, did: str, run: Run) -> AsyncIterator[None]:
        """One backfill per repository and at most ``per_pds`` repositories of one PDS at a
        time, across the cluster (advisory locks: they go with a dead process's connection)."""
        async with self.pool.acquire() as conn:
            await store.lock_repo(conn, did)
            try:
                # Whatever else ran for this repository died with its process: say so.
                await store.fail_interrupted_runs(conn, did, run.id)
                async with self._slot(conn, pds):
                    yield
            finally:
                await store.unlock_repo(conn, did)

    @asynccontextmanager
    async def _slot(self, conn: asyncpg.Connection, pds: str) -> AsyncIterator[None]:
        while True:
            for slot in range(self.settings.per_pds):
                if await store.try_lock_pds_slot(conn, pds, slot):
                    try:
                        yield
                    finally:
                        await store.unlock_pds_slot(conn, pds, slot)
                    return
            await asyncio.sleep(0.5)
