"""Apply AT Protocol events to ``atproto.records``: versions decide, not arrival order.

A write applies only when its rev is newer than the stored record's and than any tombstone of
its URI, and the repository is not deleted; a delete leaves a tombstone with its rev and removes
an older record; an account ``deleted`` event tombstones the whole DID. So the live firehose, a
replay from an earlier cursor and a backfill can arrive in any order and in any number of copies
and end in the same table. Every statement is set-based: one per kind of change per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from sluice.schemas.firehose import JetstreamEvent, Operation, RecordOrigin, RepoStatus, record_uri
from sluice.storage.sql import quote_ident
from sluice.storage.writer import TargetPlan


@dataclass(frozen=True, slots=True)
class RecordWrite:
    did: str
    collection: str
    rkey: str
    rev: str
    cid: str | None
    record: dict[str, Any]

    @property
    def uri(self) -> str:
        return record_uri(self.did, self.collection, self.rkey)


@dataclass
class ApplyCounts:
    applied: int = 0
    """writes that changed a record"""
    skipped: int = 0
    """writes older than the stored record, a tombstone or a deleted repository"""
    deleted: int = 0
    """records removed by a delete or an account deletion"""
    written: list[RecordWrite] = field(default_factory=list)
    """the writes that were applied (for projections)"""
    removed: list[str] = field(default_factory=list)
    """the URIs of the records that were removed (for projections)"""

    def add(self, other: ApplyCounts) -> None:
        self.applied += other.applied
        self.skipped += other.skipped
        self.deleted += other.deleted
        self.written.extend(other.written)
        self.removed.extend(other.removed)


WRITE = """
WITH w AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[])
        AS w(uri, did, collection, rkey, cid, rev, record)
), ok AS (
    SELECT w.* FROM w
    WHERE NOT EXISTS (SELECT 1 FROM tombstones t
                      WHERE t.uri = w.uri AND t.rev >= w.rev COLLATE "C")
      AND NOT EXISTS (SELECT 1 FROM repos p WHERE p.did = w.did AND p.status = 'deleted')
), ins AS (
    INSERT INTO records AS r (uri, did, collection, rkey, cid, rev, record, origin)
    SELECT uri, did, collection, rkey, cid, rev, record::jsonb, $8 FROM ok
    ON CONFLICT (uri) DO UPDATE SET cid = EXCLUDED.cid, rev = EXCLUDED.rev,
        record = EXCLUDED.record, origin = EXCLUDED.origin, indexed_at = now()
    WHERE r.rev < EXCLUDED.rev
    RETURNING uri
)
SELECT coalesce(array_agg(uri), '{}') FROM ins
"""

DELETE = """
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS d(uri, did, rev)
), tomb AS (
    INSERT INTO tombstones AS t (uri, did, rev) SELECT uri, did, rev FROM d
    ON CONFLICT (uri) DO UPDATE SET rev = EXCLUDED.rev, deleted_at = now()
    WHERE t.rev < EXCLUDED.rev
), gone AS (
    DELETE FROM records r USING d WHERE r.uri = d.uri AND r.rev < d.rev COLLATE "C"
    RETURNING r.uri
)
SELECT coalesce(array_agg(uri), '{}') FROM gone
"""


def newest_per_uri(
    events: Iterable[JetstreamEvent],
) -> tuple[list[RecordWrite], list[tuple[str, str, str]]]:
    """Collapse a batch's commits to the newest per URI (revs compare as bytes): the writes
    and the deletes (uri, did, rev) to apply."""
    newest: dict[str, tuple[str, JetstreamEvent]] = {}
    for event in events:
        commit = event.commit
        if commit is None:
            continue
        uri = record_uri(event.did, commit.collection, commit.rkey)
        seen = newest.get(uri)
        if seen is None or seen[0] < commit.rev:
            newest[uri] = (commit.rev, event)
    writes: list[RecordWrite] = []
    deletes: list[tuple[str, str, str]] = []
    for uri, (rev, event) in newest.items():
        c = event.commit
        assert c is not None
        if c.operation is Operation.DELETE:
            deletes.append((uri, event.did, rev))
        else:
            assert c.record is not None
            writes.append(RecordWrite(event.did, c.collection, c.rkey, rev, c.cid, c.record))
    return writes, deletes


async def write_records(
    conn: asyncpg.Connection, writes: Sequence[RecordWrite], origin: RecordOrigin
) -> ApplyCounts:
    if not writes:
        return ApplyCounts()
    uris = await conn.fetchval(
        WRITE,
        [w.uri for w in writes],
        [w.did for w in writes],
        [w.collection for w in writes],
        [w.rkey for w in writes],
        [w.cid for w in writes],
        [w.rev for w in writes],
        [orjson.dumps(w.record).decode() for w in writes],
        origin,
    )
    done = set(uris)
    written = [w for w in writes if w.uri in done]
    return ApplyCounts(applied=len(written), skipped=len(writes) - len(written), written=written)


async def delete_records(
    conn: asyncpg.Connection, deletes: Sequence[tuple[str, str, str]]
) -> ApplyCounts:
    if not deletes:
        return ApplyCounts()
    removed = await conn.fetchval(
        DELETE, [d[0] for d in deletes], [d[1] for d in deletes], [d[2] for d in deletes]
    )
    return ApplyCounts(deleted=len(removed), removed=list(removed))


async def apply_events(conn: asyncpg.Connection, events: Sequence[JetstreamEvent]) -> ApplyCounts:
    """Apply a batch of firehose events in the caller's transaction."""
    counts = ApplyCounts()
    identities = {e.did: e.identity for e in events if e.identity is not None}
    if identities:
        await conn.execute(
            "INSERT INTO repos (did, handle) SELECT * FROM unnest($1::text[], $2::text[])"
            " ON CONFLICT (did) DO UPDATE SET handle = EXCLUDED.handle, updated_at = now()",
            list(identities),
            [i.handle for i in identities.values()],
        )
    for event in events:
        account = event.account
        if account is None:
            continue
        status: str = (
            RepoStatus.ACTIVE if account.active else (account.status or RepoStatus.INACTIVE)
        )
        await conn.execute(
            "INSERT INTO repos (did, status) VALUES ($1, $2) ON CONFLICT (did) DO UPDATE"
            " SET status = CASE WHEN repos.status = 'deleted' THEN 'deleted'"
            " ELSE EXCLUDED.status END, updated_at = now()",
            event.did,
            status,
        )
        if status == RepoStatus.DELETED:
            gone = await conn.fetch("DELETE FROM records WHERE did = $1 RETURNING uri", event.did)
            counts.deleted += len(gone)
            counts.removed.extend(g["uri"] for g in gone)
    writes, deletes = newest_per_uri(events)
    # Deletes first: a write in the same batch is newer (collapsed above) or for another URI.
    counts.add(await delete_records(conn, deletes))
    counts.add(await write_records(conn, writes, RecordOrigin.LIVE))
    revs: dict[str, str] = {}
    for event in events:
        if event.commit is not None and revs.get(event.did, "") < event.commit.rev:
            revs[event.did] = event.commit.rev
    if revs:
        await conn.execute(
            "INSERT INTO repos AS p (did, rev) SELECT * FROM unnest($1::text[], $2::text[])"
            " ON CONFLICT (did) DO UPDATE SET rev = EXCLUDED.rev, updated_at = now()"
            " WHERE p.rev IS NULL OR p.rev < EXCLUDED.rev",
            list(revs),
            list(revs.values()),
        )
    return counts


async def remove_projected(conn: asyncpg.Connection, plan: TargetPlan, uris: Sequence[str]) -> None:
    """Remove the records ``uris``, removed from ``atproto.records``, from a projection's
    table too (rows keyed by ``uri``), in the caller's transaction."""
    await conn.execute(
        f"DELETE FROM {plan.qualified} WHERE {quote_ident('uri')} = ANY($1::text[])",
        uris,
    )
