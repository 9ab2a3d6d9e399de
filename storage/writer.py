"""The upsert writer: applies one row batch in one transaction, exactly once in effect.

A batch is sent to PostgreSQL as one JSON document and applied by one set-based statement:
``json_to_recordset`` types the rows, ``DISTINCT ON`` collapses duplicate keys inside the batch,
``INSERT ... ON CONFLICT DO UPDATE ... WHERE <row differs>`` writes only what changed. A batch
whose statement fails on bad data is bisected to isolate the bad rows, which go to the row log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from sluice.schemas.events import BatchOutcome, LifecycleEventType, RowBatch, decode_rows
from sluice.schemas.importers import Lookup
from sluice.schemas.runs import DuplicatePolicy, RowFailure
from sluice.storage.copy import NoticesMissed, copy_skipping, explain_skipped, skips_bad_rows
from sluice.storage.lookups import LookupResolver
from sluice.storage.runs import (
    RUN_COLUMNS,
    emit_event,
    finalize_if_done,
    insert_row_failures,
    run_from_record,
)

# Re-exported: the modules that build and apply batches know them from here.
from sluice.storage.sql import ROW as ROW
from sluice.storage.sql import ROW_ERRORS as ROW_ERRORS
from sluice.storage.sql import SUB as SUB
from sluice.storage.sql import quote_ident as quote_ident

log = logging.getLogger(__name__)


Also = Callable[[asyncpg.Connection], Awaitable[None]]
"""More writes that belong to a batch's transaction (item states of an API run)."""


@dataclass(frozen=True)
class Refresh:
    """A full refresh: after the run completes, rows of the target (within the scope the
    import touched) that it did not contain are deleted, or get ``soft_delete`` set."""

    scope: tuple[str, ...] = ()
    soft_delete: str | None = None
    max_failed: int = 0


@dataclass(frozen=True)
class TargetPlan:
    """What a run's batches are applied to. Stored with the run as JSON."""

    table: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    policy: DuplicatePolicy = DuplicatePolicy.UPSERT
    version_column: str | None = None
    schema: str = "public"
    refresh: Refresh | None = None
    lookups: tuple[Lookup, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "schema": self.schema,
            "columns": [list(c) for c in self.columns],
            "key": list(self.key),
            "policy": str(self.policy),
            "version_column": self.version_column,
            "refresh": None
            if self.refresh is None
            else {
                "scope": list(self.refresh.scope),
                "soft_delete": self.refresh.soft_delete,
                "max_failed": self.refresh.max_failed,
            },
            "lookups": [dataclasses.asdict(lookup) for lookup in self.lookups],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetPlan:
        return cls(
            table=data["table"],
            schema=data.get("schema", "public"),
            columns=tuple((c[0], c[1]) for c in data["columns"]),
            key=tuple(data["key"]),
            policy=DuplicatePolicy(data.get("policy", "upsert")),
            version_column=data.get("version_column"),
            refresh=Refresh(
                scope=tuple(data["refresh"]["scope"]),
                soft_delete=data["refresh"]["soft_delete"],
                max_failed=data["refresh"]["max_failed"],
            )
            if data.get("refresh")
            else None,
            lookups=tuple(Lookup(**lookup) for lookup in data.get("lookups", ())),
        )

    @property
    def copyable(self) -> bool:
        """Batches of text values can be applied by COPY into a temporary table: the plan needs
        no rows in Python (lookups, the 'fail' policy's report), and every column
        reads the same text the same way from COPY as from a JSON string (not json, jsonb or
        arrays, which json_to_recordset takes as JSON)."""
        return (
            not self.lookups
            and self.policy is not DuplicatePolicy.FAIL
            and not any(t.lower().startswith("json") or t.endswith("]") for _, t in self.columns)
        )

    def create_table_sql(self) -> str:
        cols = [
            f"{quote_ident(c)} {t}{' NOT NULL' if c in self.key else ''}" for c, t in self.columns
        ]
        cols.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.qualified} (\n  " + ",\n  ".join(cols) + "\n)"


@dataclass
class Counts:
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[RowFailure] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.skipped += other.skipped
        self.failures.extend(other.failures)


@dataclass(frozen=True)
class BatchResult:
    """What applying one batch did: its outcome and, when it was applied, its rows by outcome
    (the numbers added to the run's counters)."""

    outcome: BatchOutcome
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    """rows PostgreSQL refused, isolated and put in the row log"""
    seconds: float = 0.0
    """time in PostgreSQL on the batch's connection: its transaction, and the second one when
    bad rows had to be isolated"""


class _Fragments:
    """The pieces of SQL every statement of one plan is built from."""

    def __init__(self, plan: TargetPlan) -> None:
        q = quote_ident
        self.plan = plan
        self.names = [c for c, _ in plan.columns]
        self.nonkey = [c for c in self.names if c not in plan.key]
        self.recordset = ", ".join(f"{q(c)} {t}" for c, t in plan.columns)
        self.keys = ", ".join(q(k) for k in plan.key)
        self.cols = ", ".join(q(c) for c in self.names)
        self.join = " AND ".join(f"t.{q(k)} = d.{q(k)}" for k in plan.key)
        self.t_row = "ROW(" + ", ".join(f"t.{q(c)}" for c in self.nonkey) + ")"
        self.d_row = "ROW(" + ", ".join(f"d.{q(c)}" for c in self.nonkey) + ")"
        self.x_row = "ROW(" + ", ".join(f"EXCLUDED.{q(c)}" for c in self.nonkey) + ")"
        # Each batch row's stored row ``t``, found through the key's unique index. Written so
        # that the planner cannot turn it into a hash join that reads the whole table: these
        # statements are prepared once per connection and keep the plan made for the table as
        # it was then (asyncpg's statement cache; a statement without parameters has one
        # generic plan), and a plan made for the empty table of a fresh import read all of it
        # for every batch (8 s of PostgreSQL's time at 1,000,000 rows).
        lookup = f"(SELECT * FROM {plan.qualified} t WHERE {self.join} LIMIT 1) t ON true"
        self.stored = f"LEFT JOIN LATERAL {lookup}"
        self.stored_only = f"JOIN LATERAL {lookup}"
        self.absent = f"NOT EXISTS (SELECT 1 FROM {plan.qualified} t WHERE {self.join} OFFSET 0)"

    def prefix(self, src: str) -> str:
        """The batch's rows as ``src``, and ``d``: one row per key, the one that wins: the last
        in the file, or the first for 'skip' and 'fail'. For 'update_if_newer' the batch gives
        what applying its rows one by one gives (``newer``: a row replaces the stored one when
        that has no version or an older one): the first row of the highest version, or the
        last row when no row has a version. The same rule holds across batches."""
        plan, q = self.plan, quote_ident
        keep_first = plan.policy in (DuplicatePolicy.SKIP, DuplicatePolicy.FAIL)
        order = "ASC" if keep_first else "DESC"
        version = plan.version_column
        if version and plan.policy is DuplicatePolicy.UPDATE_IF_NEWER:
            v = q(version)
            ties = (
                f"{v} DESC NULLS LAST, CASE WHEN {v} IS NULL THEN -{ROW} ELSE {ROW} END,"
                f" CASE WHEN {v} IS NULL THEN -{SUB} ELSE {SUB} END"
            )
        else:
            ties = f"{ROW} {order}, {SUB} {order}"
        return (
            f"WITH src AS ({src}),"
            f" d AS (SELECT DISTINCT ON ({self.keys}) * FROM src ORDER BY {self.keys}, {ties}),"
        )

    def questions(self) -> str:
        """The answers beside the counts. Ask only what the policy needs: each extra question is
        another index lookup per row."""
        plan = self.plan
        same = " NULL::bigint AS same"
        if plan.policy is DuplicatePolicy.UPDATE_IF_NEWER:
            same_cond = f"{self.t_row} IS NOT DISTINCT FROM {self.d_row}" if self.nonkey else "true"
            same = f" (SELECT count(*) FROM d {self.stored_only} WHERE {same_cond}) AS same"
        if plan.policy is not DuplicatePolicy.FAIL:
            return f"{same}, '[]'::json AS existing, '[]'::json AS dups"
        existing = (
            f" (SELECT coalesce(json_agg(json_build_array(d.{ROW}, d.{SUB})), '[]')"
            f" FROM d {self.stored_only}) AS existing"
        )
        dups = (
            f" (SELECT coalesce(json_agg(json_build_array({ROW}, {SUB})), '[]') FROM"
            f" (SELECT {ROW}, {SUB} FROM src EXCEPT SELECT {ROW}, {SUB} FROM d) z) AS dups"
        )
        return f"{same},{existing},{dups}"

    def newer(self, row: str) -> str:
        """For 'update_if_newer': the condition that ``row``'s version is newer than the table's."""
        version = self.plan.version_column
        if self.plan.policy is not DuplicatePolicy.UPDATE_IF_NEWER or not version:
            return ""
        v = quote_ident(version)
        return f" AND (t.{v} IS NULL OR {row}.{v} > t.{v})"

    @property
    def updates(self) -> bool:
        """The policy updates a stored row whose values differ."""
        policy = self.plan.policy
        return policy in (DuplicatePolicy.UPSERT, DuplicatePolicy.UPDATE_IF_NEWER) and bool(
            self.nonkey
        )

    def apply(self, *, changed_only: bool = False, copied: bool = False) -> str:
        """Insert the winning rows; update a key's row only when a value changed.

        ``changed_only``: the rows equal to the stored ones are left out before the INSERT.
        ON CONFLICT DO UPDATE locks each conflicting row (a WAL record and a dirtied page)
        before its WHERE finds the row unchanged; a look-up that finds it equal writes nothing.
        A new or changed row pays that look-up on top of the INSERT's own (a fresh import's
        statement 0.9 -> 1.5 s for 500,000 rows), so it is for batches whose rows are mostly
        stored as they are (``Statements.unchanged_share``).

        ``copied``: the rows are those COPY put into the temporary table, whose count the COPY
        gave (``n`` is left to it: counting them again was 6% of the statement)."""
        plan, q = self.plan, quote_ident
        source = "d"
        if changed_only and self.updates:
            k0 = q(plan.key[0])
            source = (
                f"(SELECT d.* FROM d {self.stored}"
                f" WHERE t.{k0} IS NULL OR {self.t_row} IS DISTINCT FROM {self.d_row}) c"
            )
        insert = f"INSERT INTO {plan.qualified} AS t ({self.cols}) SELECT {self.cols} FROM {source}"
        if self.updates:
            sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in self.nonkey)
            conflict = (
                f" ON CONFLICT ({self.keys}) DO UPDATE SET {sets}"
                f" WHERE {self.t_row} IS DISTINCT FROM {self.x_row}{self.newer('EXCLUDED')}"
            )
        else:
            if plan.policy is DuplicatePolicy.FAIL:
                insert += f" WHERE {self.absent}"
            conflict = f" ON CONFLICT ({self.keys}) DO NOTHING"
        n = "NULL::bigint" if copied else "(SELECT count(*) FROM src)"
        return (
            f" ins AS ({insert}{conflict} RETURNING (xmax = 0) AS inserted)"
            f" SELECT {n} AS n, (SELECT count(*) FROM d) AS distinct_n,"
            f" (SELECT count(*) FROM ins WHERE inserted) AS created,"
            f" (SELECT count(*) FROM ins WHERE NOT inserted) AS updated,"
            f"{self.questions()}"
        )

    def dry(self) -> str:
        """The same questions without the INSERT: what would be created, changed, left as it
        is. Keys repeated across batches of one dry run count as new each time."""
        plan = self.plan
        k0 = quote_ident(plan.key[0])
        upd_cond = f"{self.t_row} IS DISTINCT FROM {self.d_row}" if self.nonkey else "false"
        upd_cond += self.newer("d")
        return (
            f" plan AS (SELECT d.{ROW}, (t.{k0} IS NULL) AS is_new,"
            f" (t.{k0} IS NOT NULL AND {upd_cond}) AS is_update"
            f" FROM d {self.stored})"
            f" SELECT (SELECT count(*) FROM src) AS n, (SELECT count(*) FROM d) AS distinct_n,"
            f" (SELECT count(*) FROM plan WHERE is_new) AS created,"
            f" (SELECT count(*) FROM plan WHERE is_update) AS updated,"
            f"{self.questions()}"
        )

    def run_keys(self, temp: str) -> tuple[str | None, str | None]:
        """For a full refresh: the statements recording the keys a fresh run imported (from a
        JSON batch, and from the COPY table), typed as the table types them. Only the key and
        scope columns are read: a refused value elsewhere is the upsert's to isolate."""
        plan, q = self.plan, quote_ident
        if plan.refresh is None:
            return None, None
        scope = plan.refresh.scope
        key_expr = "jsonb_build_array(" + ", ".join(f"x.{q(k)}" for k in plan.key) + ")::text"
        scope_expr = (
            "jsonb_build_array(" + ", ".join(f"x.{q(c)}" for c in scope) + ")::text"
            if scope
            else "NULL"
        )
        types = dict(plan.columns)
        wanted = ", ".join(f"{q(c)} {types[c]}" for c in dict.fromkeys((*plan.key, *scope)))
        return (
            "INSERT INTO run_keys (run_id, key, scope)"
            f" SELECT $2, {key_expr}, {scope_expr}"
            f" FROM json_to_recordset($1::text::json) AS x({wanted})"
            " ON CONFLICT DO NOTHING",
            "INSERT INTO run_keys (run_id, key, scope)"
            f" SELECT $1, {key_expr}, {scope_expr} FROM pg_temp.{temp} x"
            " ON CONFLICT DO NOTHING",
        )


class Statements:
    """The SQL for one plan, built once and reused for every batch of the run. The batch's rows
    come as a JSON array ($1), or as rows COPY put into a temporary table."""

    def __init__(self, plan: TargetPlan) -> None:
        self.plan = plan
        parts = _Fragments(plan)
        json_src = (
            f"SELECT * FROM json_to_recordset($1::text::json)"
            f" AS x({ROW} bigint, {SUB} integer, {parts.recordset})"
        )
        digest = hashlib.sha1(parts.recordset.encode()).hexdigest()[:16]
        self.temp = f"sluice_batch_{digest}"
        copy_src = f"SELECT * FROM pg_temp.{self.temp}"
        # ON COMMIT DELETE ROWS: each transaction finds it empty, and leaves it so.
        self.create_temp = (
            f"CREATE TEMP TABLE IF NOT EXISTS {self.temp}"
            f" ({ROW} bigint, {SUB} integer, {parts.recordset}) ON COMMIT DELETE ROWS"
        )
        self.temp_columns = frozenset((ROW, SUB, *parts.names)) if plan.copyable else frozenset()
        apply, dry = parts.apply(), parts.dry()
        self.apply = parts.prefix(json_src) + apply
        self.apply_copied = parts.prefix(copy_src) + parts.apply(copied=True)
        self.apply_copied_changed: str | None = None
        self.unchanged_share: str | None = None
        if parts.updates:
            self.apply_copied_changed = parts.prefix(copy_src) + parts.apply(
                changed_only=True, copied=True
            )
            self.unchanged_share = (
                f"SELECT count(*) FILTER (WHERE t.{quote_ident(plan.key[0])} IS NOT NULL"
                f" AND {parts.t_row} IS NOT DISTINCT FROM {parts.d_row})::float8"
                " / greatest(count(*), 1)"
                f" FROM (SELECT * FROM pg_temp.{self.temp} LIMIT {UNCHANGED_SAMPLE}) d"
                f" {parts.stored}"
            )
        self.dry = parts.prefix(json_src) + dry
        self.dry_copied = parts.prefix(copy_src) + dry
        self.keys, self.keys_copied = parts.run_keys(self.temp)
        self.lookups = LookupResolver(plan.lookups) if plan.lookups else None
        self.probe = {
            c: f"SELECT * FROM json_to_recordset($1::text::json) AS x({quote_ident(c)} {t})"
            for c, t in plan.columns
        }

    def counts(
        self,
        record: asyncpg.Record,
        rows: Callable[[], list[dict[str, Any]]],
        copied: int | None = None,
    ) -> Counts:
        """Turn the statement's answer into counters that add up to the batch's rows;
        ``copied``: the rows COPY put into the temporary table (the statement leaves ``n`` to
        it)."""
        n = record["n"] if record["n"] is not None else copied
        assert n is not None, "a statement that does not count its rows is given the count"
        distinct_n = record["distinct_n"]
        created, updated, same = record["created"], record["updated"], record["same"]
        superseded = n - distinct_n
        c = Counts(rows=n, created=created)
        policy = self.plan.policy
        if policy is DuplicatePolicy.UPSERT:
            # A key repeated in the batch was written, then overwritten by its later row.
            c.updated = updated + superseded
            c.unchanged = distinct_n - created - updated
        elif policy is DuplicatePolicy.UPDATE_IF_NEWER:
            c.updated = updated
            c.unchanged = same
            c.skipped = distinct_n - created - updated - same + superseded
        elif policy is DuplicatePolicy.SKIP:
            c.skipped = n - created
        else:  # FAIL: existing keys and repeats inside the file are rejected rows
            rejected = record["existing"] or record["dups"]
            by_pos = {(r[ROW], r[SUB]): r for r in rows()} if rejected else {}
            for row_no, sub in record["existing"]:
                c.failures.append(
                    RowFailure(
                        row_no,
                        sub,
                        by_pos.get((row_no, sub)),
                        "key already exists and the importer's duplicate policy is 'fail'",
                    )
                )
            for row_no, sub in record["dups"]:
                c.failures.append(
                    RowFailure(
                        row_no,
                        sub,
                        by_pos.get((row_no, sub)),
                        "key repeats a row earlier in the file and the duplicate policy is 'fail'",
                    )
                )
            c.created = created
        return c


UNCHANGED_SAMPLE = 16
"""Rows of a COPY batch compared with the stored ones to choose how it is applied."""


class BatchApplier:
    """Applies batches of any run; keeps one ``Statements`` per plan."""

    def __init__(self, pool: asyncpg.Pool, *, progress_interval: float = 1.0) -> None:
        self.pool = pool
        self.progress_interval = progress_interval
        self._statements: dict[str, Statements] = {}
        self.use_temp = True  # COPY batches into a temporary table (see _apply_copied)

    def statements(self, plan: TargetPlan) -> Statements:
        cache_key = orjson.dumps(plan.to_json()).decode()
        found = self._statements.get(cache_key)
        if found is None:
            found = self._statements[cache_key] = Statements(plan)
        return found

    async def apply(
        self, batch: RowBatch, plan: TargetPlan, *, dry_run: bool, also: Also | None = None
    ) -> BatchResult:
        """Apply ``batch``. The outcome is APPLIED, DUPLICATE (already applied) or INACTIVE
        (the run was cancelled or failed: nothing is written). Raises PoisonBatch when the
        message is not an array of row objects. ``also`` writes more in the same transaction
        (before the run's counters, so a completion event counts it), once per batch."""
        stmts = self.statements(plan)
        async with self.pool.acquire() as conn:
            started = time.perf_counter()

            async def attempt() -> BatchResult:
                try:
                    return await self._apply_once(conn, batch, stmts, dry_run, also, isolate=False)
                except RETRY_ISOLATED:
                    # The fast path has no savepoint, so the whole transaction rolled back: do
                    # it again, this time isolating the bad rows.
                    return await self._apply_once(conn, batch, stmts, dry_run, also, isolate=True)

            try:
                result = await attempt()
            except asyncpg.InsufficientPrivilegeError:
                if not self.use_temp or not _copyable(batch, stmts):
                    raise
                # A role without the TEMPORARY privilege cannot COPY into a temporary table:
                # this applier reads every batch from JSON from now on.
                log.warning("no TEMPORARY privilege on the database: batches are read as JSON")
                self.use_temp = False
                result = await attempt()
            return dataclasses.replace(result, seconds=time.perf_counter() - started)

    async def _apply_once(
        self,
        conn: asyncpg.Connection,
        batch: RowBatch,
        stmts: Statements,
        dry_run: bool,
        also: Also | None,
        *,
        isolate: bool,
    ) -> BatchResult:
        try:
            async with conn.transaction():
                fresh = await conn.fetchval(
                    "INSERT INTO batches (run_id, seq, rows) VALUES ($1, $2, 0)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    batch.run_id,
                    batch.seq,
                )
                if not fresh:
                    return BatchResult(BatchOutcome.DUPLICATE)
                if also is not None:
                    await also(conn)
                if not isolate and self.use_temp and _copyable(batch, stmts):
                    counts = await self._apply_copied(conn, batch, stmts, dry_run)
                else:
                    counts = await self._apply_json(conn, batch, stmts, dry_run, isolate=isolate)
                failed = 0
                if counts.failures:
                    failed = await insert_row_failures(
                        conn, batch.run_id, counts.failures, count_processed=False
                    )
                await self._count(conn, batch, counts, failed)
        except _Inactive:
            return BatchResult(BatchOutcome.INACTIVE)
        return BatchResult(
            BatchOutcome.APPLIED,
            created=counts.created,
            updated=counts.updated,
            unchanged=counts.unchanged,
            skipped=counts.skipped,
            failed=failed,
        )

    async def _apply_copied(
        self, conn: asyncpg.Connection, batch: RowBatch, stmts: Statements, dry_run: bool
    ) -> Counts:
        """A COPY batch: COPY into the plan's temporary table, then the same statement reading
        from it. On PostgreSQL 17+ the rows whose values do not convert are skipped by COPY and
        returned as failures (``storage.copy``); on older servers such a value fails the COPY,
        and the batch goes the JSON way."""
        columns, rows = batch.copy_columns()
        await conn.execute(stmts.create_temp)
        skipped: dict[int, str] = {}
        if skips_bad_rows(conn):
            result = await copy_skipping(conn, stmts.temp, columns, rows)
            copied, skipped = result.rows, result.skipped
        else:
            status = await conn.copy_to_table(
                stmts.temp,
                schema_name="pg_temp",
                source=rows,  # a memoryview: asyncpg takes bytes for a file name
                columns=columns,
                format="text",
                null="",
            )
            copied = int(status.split()[-1])  # "COPY 5000"
        if stmts.keys_copied is not None and not dry_run:
            await conn.execute(stmts.keys_copied, batch.run_id)
        if dry_run:
            sql = stmts.dry_copied
        elif stmts.unchanged_share is not None and stmts.apply_copied_changed is not None:
            # A batch of rows mostly stored as they are (a file imported again): they are left
            # out before the INSERT, which would lock each. A sample says so, a look-up a row.
            unchanged = await conn.fetchval(stmts.unchanged_share)
            sql = stmts.apply_copied_changed if unchanged >= 0.5 else stmts.apply_copied
        else:
            sql = stmts.apply_copied
        record = await conn.fetchrow(sql)
        counts = stmts.counts(record, batch.rows, copied)
        if skipped:
            failures = await explain_skipped(conn, stmts.plan.columns, columns, rows, skipped)
            counts.rows += len(failures)
            counts.failures.extend(failures)
        return counts

    async def _apply_json(
        self,
        conn: asyncpg.Connection,
        batch: RowBatch,
        stmts: Statements,
        dry_run: bool,
        *,
        isolate: bool,
    ) -> Counts:
        text, resolved = batch.json_text(), None
        unresolved: list[RowFailure] = []
        if stmts.lookups is not None:
            # In the batch's transaction: the marker makes the answers count once,
            # whatever the referenced tables hold when a batch is delivered again.
            resolved, unresolved = await stmts.lookups.resolve(conn, batch.rows(), dry_run=dry_run)
            text = orjson.dumps(resolved, default=str).decode()
        keys_for = batch.run_id if stmts.keys is not None and not dry_run else None
        if isolate:
            # Each part that applies records its keys with it: a rejected row's key is not
            # among the keys the run imported.
            counts = await self.apply_rows(conn, stmts, text, resolved, dry_run, keys_for=keys_for)
        else:
            if keys_for is not None:
                await conn.execute(stmts.keys, text, keys_for)
            sql = stmts.dry if dry_run else stmts.apply
            record = await conn.fetchrow(sql, text)
            rows = batch.rows if resolved is None else functools.partial(list, resolved)
            counts = stmts.counts(record, rows)
        counts.rows += len(unresolved)
        counts.failures.extend(unresolved)
        return counts

    async def apply_rows(
        self,
        conn: asyncpg.Connection,
        stmts: Statements,
        text: str,
        rows: list[dict[str, Any]] | None,
        dry_run: bool,
        *,
        keys_for: uuid.UUID | None = None,
    ) -> Counts:
        """Apply the rows in ``text`` (a JSON array; ``rows`` is the same, decoded, when the
        caller has it). A statement that fails on a row's data is split in halves until the bad
        rows stand alone; they are returned as failures, the others applied. ``keys_for``: the
        fresh run that records the keys of the rows applied."""
        sql = stmts.dry if dry_run else stmts.apply

        def decoded() -> list[dict[str, Any]]:
            return rows if rows is not None else decode_rows(text)

        try:
            async with conn.transaction():  # a savepoint: a failure here spares the marker
                if keys_for is not None and stmts.keys is not None:
                    await conn.execute(stmts.keys, text, keys_for)
                record = await conn.fetchrow(sql, text)
            return stmts.counts(record, decoded)
        except ROW_ERRORS as exc:
            items = decoded()  # PoisonBatch when the text is not rows at all
            if len(items) == 1:
                row = items[0]
                reason = await self._explain(conn, stmts, row, exc)
                return Counts(rows=1, failures=[RowFailure(row[ROW], row[SUB], row, reason)])
            half = len(items) // 2
            parts = (items[:half], items[half:])
            counts = Counts()
            for part in parts:
                part_text = orjson.dumps(part, default=str).decode()
                counts.add(
                    await self.apply_rows(conn, stmts, part_text, part, dry_run, keys_for=keys_for)
                )
            return counts

    @staticmethod
    async def _explain(
        conn: asyncpg.Connection, stmts: Statements, row: dict[str, Any], exc: BaseException
    ) -> str:
        """Name the column at fault: the database's message alone does not say which one."""
        for column, sql in stmts.probe.items():
            try:
                async with conn.transaction():
                    await conn.fetch(sql, orjson.dumps([row], default=str).decode())
            except ROW_ERRORS as col_exc:
                return f"column {column!r}: {getattr(col_exc, 'message', col_exc)}"
        return str(getattr(exc, "message", exc))

    async def _count(
        self, conn: asyncpg.Connection, batch: RowBatch, counts: Counts, failed: int
    ) -> None:
        """Record the batch's counts on its marker and add them to the run, in one statement."""
        processed = counts.created + counts.updated + counts.unchanged + counts.skipped + failed
        cols = ", ".join(f"r.{c.strip()}" for c in RUN_COLUMNS.split(",") if " AS " not in c)
        record = await conn.fetchrow(
            "WITH b AS (UPDATE batches SET created = $3, updated = $4, unchanged = $5,"
            " skipped = $6, failed = $7, rows = $9 WHERE run_id = $1 AND seq = $2)"
            " UPDATE runs r SET processed_rows = r.processed_rows + $8,"
            " created_rows = r.created_rows + $3, updated_rows = r.updated_rows + $4,"
            " unchanged_rows = r.unchanged_rows + $5, skipped_rows = r.skipped_rows + $6,"
            " failed_rows = r.failed_rows + $7, applied_batches = r.applied_batches + 1,"
            # now() is this transaction's start: a progress event is due when the last one is
            # older than the interval. One plain UPDATE: a self-join with FOR UPDATE deadlocks.
            " last_progress_at = CASE WHEN now() - r.last_progress_at >= $10 * interval '1 second'"
            " THEN now() ELSE r.last_progress_at END"
            " WHERE r.id = $1 AND r.status = 'running'"
            f" RETURNING {cols}, r.progress_percent::float8 AS progress_percent,"
            " r.last_progress_at = now() AS progress_due",
            batch.run_id,
            batch.seq,
            counts.created,
            counts.updated,
            counts.unchanged,
            counts.skipped,
            failed,
            processed,
            counts.rows,
            self.progress_interval,
        )
        if record is None:
            raise _Inactive
        total = record["total_batches"]
        # total_batches is set when the split is done; only then can this be the last batch.
        if total is not None and record["applied_batches"] >= total:
            if await finalize_if_done(conn, batch.run_id) is not None:
                return
        if record["progress_due"]:
            fields = dict(record)
            fields.pop("progress_due")
            await emit_event(conn, run_from_record(fields), LifecycleEventType.PROGRESS)


def _copyable(batch: RowBatch, stmts: Statements) -> bool:
    """A COPY batch whose columns the plan's temporary table has (any other goes as JSON)."""
    return batch.rows_copy is not None and set(batch.copy_columns()[0]) <= stmts.temp_columns


RETRY_ISOLATED: tuple[type[BaseException], ...] = (*ROW_ERRORS, NoticesMissed)
"""What makes the fast path give way to the row-by-row one."""


class _Inactive(Exception):
    """The run is no longer running: roll the batch back."""
