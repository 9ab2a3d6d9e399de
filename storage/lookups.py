"""Lookups: replace a record's natural key (a supplier code) by the key of the row it names in
another table (``suppliers.id``), for a whole batch at once.

A products file carries ``supplier_code``; the products table wants ``supplier_id``::

    Lookup(field="supplier_code", table="suppliers", match="code", target="supplier_id")

Per batch and lookup, one query fetches the keys of every distinct code in the batch, so a
batch of 5,000 rows costs one index scan, not 5,000. A record whose code has no match is
rejected with a reason that says what to add; ``create_missing`` inserts the missing codes
instead. Lookups run in the batch's transaction, after its marker: a batch delivered again is
skipped whole, so its rows are counted once even when the referenced table changed in between.
The referenced table's column types are read from the catalog once per plan, not per batch.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from sluice.errors import MappingError
from sluice.schemas.importers import Lookup
from sluice.schemas.runs import RowFailure
from sluice.storage.sql import ROW, ROW_ERRORS, SUB, quote_ident

# sluice.agents.split.map.Record (not imported from there: the split imports this module).
Record = dict[str, Any]


# The match column types a lookup compares by (the base type of a domain): integers are
# checked in Python so that one bad value ('abc') rejects its row instead of failing the query.
_INT_BITS = {"int2": 16, "int4": 32, "int8": 64}
_TEXT = {"text", "varchar", "bpchar", "citext", "name"}
_INTEGER = re.compile(r"[+-]?\d+")

_CATALOG = """
SELECT l.i,
       c.oid IS NOT NULL AS has_table,
       m.attnum IS NOT NULL AS has_match,
       r.attnum IS NOT NULL AS has_returns,
       bt.typname AS base_type,
       quote_ident(tn.nspname) || '.' || quote_ident(t.typname) AS cast_type,
       format_type(m.atttypid, m.atttypmod) AS shown_type,
       m.atttypmod AS typmod,
       t.typtype = 'd' AS is_domain,
       EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisunique
               AND x.indisvalid AND x.indpred IS NULL AND x.indnkeyatts = 1
               AND x.indkey[0] = m.attnum) AS unique_match,
       ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull AND NOT a.atthasdef
             AND a.attidentity = '' AND a.attgenerated = '' AND a.attnum <> m.attnum
             ORDER BY a.attnum) AS without_default
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
     AS l(nsp, rel, match, returns, i)
LEFT JOIN pg_namespace n ON n.nspname = l.nsp
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = l.rel
     AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
LEFT JOIN pg_attribute m ON m.attrelid = c.oid AND m.attname = l.match AND m.attnum > 0
     AND NOT m.attisdropped
LEFT JOIN pg_attribute r ON r.attrelid = c.oid AND r.attname = l.returns AND r.attnum > 0
     AND NOT r.attisdropped
LEFT JOIN pg_type t ON t.oid = m.atttypid
LEFT JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
ORDER BY l.i
"""


def _text(value: Any) -> str:
    """A value as the text of its JSON form (7 -> '7', True -> 'true'), strings as they are."""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    text = orjson.dumps(value, default=str).decode()
    return str(orjson.loads(text)) if text.startswith('"') else text  # a date: its ISO text


@dataclass(frozen=True)
class _Column:
    """What the catalog said about a lookup's match column, and how values compare to it."""

    lookup: Lookup
    base_type: str
    cast_type: str  # the type without its modifier: a cast to varchar(3) would truncate
    shown_type: str
    max_length: int | None
    # A value can fail in the database although it passed convert(): the domain's CHECK, or
    # the referenced table's constraints when creating it. Its query then runs in a savepoint.
    guarded: bool

    def convert(self, value: Any) -> tuple[Hashable, Any]:
        """The value as (comparison key, query parameter); ValueError says why it cannot be
        compared to the column. The key is what the value and the column's value have in common
        when PostgreSQL says they are equal (char(n) ignores trailing spaces, citext case)."""
        if self.base_type in _INT_BITS:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                value = _text(value)
            if isinstance(value, str):
                if not _INTEGER.fullmatch(value.strip()):
                    raise ValueError(
                        f"is not a whole number, and {self.where} is {self.shown_type}"
                    )
                value = int(value)
            limit = 2 ** (_INT_BITS[self.base_type] - 1)
            if not -limit <= value < limit:
                raise ValueError(f"is out of range for {self.where}, which is {self.shown_type}")
            return value, value
        if self.base_type == "uuid":
            try:
                found = value if isinstance(value, uuid.UUID) else uuid.UUID(_text(value))
            except ValueError:
                raise ValueError(f"is not a UUID, and {self.where} is uuid") from None
            return found, found
        text = _text(value)
        if self.base_type == "bpchar":
            text = text.rstrip(" ")
        if self.max_length is not None and len(text) > self.max_length:
            raise ValueError(
                f"is longer than the {self.max_length} characters of {self.where}"
                f" ({self.shown_type})"
            )
        return self.key_of(text), text

    def key_of(self, found: Hashable) -> Hashable:
        """The comparison key of a value of the column, as asyncpg returns it."""
        if self.base_type == "bpchar":
            return str(found).rstrip(" ")
        if self.base_type == "citext":
            return str(found).lower()
        return found

    @property
    def where(self) -> str:
        return f"{self.lookup.qualified}.{self.lookup.match}"

    @property
    def wanted(self) -> str:
        """The parameter holding the wanted values, as an array of the column's type. Text-like
        values travel as text[] (asyncpg has no codec for citext), the others as they are."""
        if self.base_type in _TEXT:
            return f"$1::text[]::{self.cast_type}[]"
        return f"$1::{self.cast_type}[]"


class LookupResolver:
    """Resolves the lookups of one plan, batch after batch, in each batch's transaction (the
    writer keeps one per plan): the first ``resolve`` reads the match columns' types from the
    catalog, the next ones reuse them."""

    def __init__(self, lookups: Sequence[Lookup]) -> None:
        self.lookups = tuple(lookups)
        self._columns: list[_Column] | None = None

    async def prepare(self, conn: asyncpg.Connection) -> None:
        """Read the referenced tables' columns (one catalog query for all lookups) and refuse,
        with a MappingError, a lookup that cannot work: a missing table or column, a match
        column of a type lookups do not compare, or create_missing without what it needs."""
        if self._columns is not None:
            return
        rows = await conn.fetch(
            _CATALOG,
            [lk.schema for lk in self.lookups],
            [lk.table for lk in self.lookups],
            [lk.match for lk in self.lookups],
            [lk.returns for lk in self.lookups],
        )
        self._columns = [_check(lk, row) for lk, row in zip(self.lookups, rows, strict=True)]

    async def resolve(
        self, conn: asyncpg.Connection, records: list[Record], *, dry_run: bool = False
    ) -> tuple[list[Record], list[RowFailure]]:
        """Set each lookup's target in ``records``: one query per lookup for the whole list
        (a second one only when a concurrent import created a missing key at the same time).
        Returns the resolved records and the rejected ones. A dry run creates nothing: the
        inserts of create_missing roll back (the records get the keys they would have had)."""
        await self.prepare(conn)
        if not dry_run or not any(lk.create_missing for lk in self.lookups):
            return await self._resolve(conn, records)
        tx = conn.transaction()
        await tx.start()
        try:
            return await self._resolve(conn, records)
        finally:
            await tx.rollback()

    async def _resolve(
        self, conn: asyncpg.Connection, records: list[Record]
    ) -> tuple[list[Record], list[RowFailure]]:
        assert self._columns is not None
        failures: list[RowFailure] = []
        for column in self._columns:
            records = await _resolve_one(conn, column, records, failures)
        return records, failures


async def resolve_lookups(
    conn: asyncpg.Connection, lookups: Sequence[Lookup], records: list[Record]
) -> tuple[list[Record], list[RowFailure]]:
    """Resolve ``lookups`` for one list of records. Reads the catalog each time: for batch
    after batch, keep a LookupResolver."""
    return await LookupResolver(lookups).resolve(conn, records)


def _check(lookup: Lookup, row: asyncpg.Record) -> _Column:
    what = f"lookup for {lookup.target}"
    if not row["has_table"]:
        raise MappingError(
            f"{what}: table {lookup.qualified} does not exist; create it or correct the"
            " lookup's table and schema"
        )
    for column, present in ((lookup.match, row["has_match"]), (lookup.returns, row["has_returns"])):
        if not present:
            raise MappingError(
                f"{what}: {lookup.qualified} has no column {column!r}; correct the lookup's"
                " match or returns"
            )
    base = row["base_type"]
    if base not in _TEXT and base not in _INT_BITS and base != "uuid":
        raise MappingError(
            f"{what}: {lookup.qualified}.{lookup.match} is {row['shown_type']}; a lookup matches"
            " text, varchar, char, citext, smallint, integer, bigint or uuid columns"
        )
    if lookup.create_missing:
        if not row["unique_match"]:
            raise MappingError(
                f"{what}: create_missing needs a unique index on {lookup.qualified}"
                f" ({lookup.match}); add one (CREATE UNIQUE INDEX ON {lookup.qualified}"
                f" ({quote_ident(lookup.match)})) or turn create_missing off"
            )
        if row["without_default"]:
            raise MappingError(
                f"{what}: create_missing inserts rows with only {lookup.match} into"
                f" {lookup.qualified}, but it has NOT NULL columns without a default:"
                f" {', '.join(row['without_default'])}; give them defaults or turn"
                " create_missing off"
            )
    # varchar(n) and char(n) keep n + 4 in the modifier; a domain's columns have none.
    limited = base in ("varchar", "bpchar") and row["typmod"] >= 4
    return _Column(
        lookup=lookup,
        base_type=base,
        cast_type=row["cast_type"],
        shown_type=row["shown_type"],
        max_length=row["typmod"] - 4 if limited else None,
        guarded=bool(row["is_domain"]) or lookup.create_missing,
    )


async def _resolve_one(
    conn: asyncpg.Connection, column: _Column, records: list[Record], failures: list[RowFailure]
) -> list[Record]:
    lookup = column.lookup
    keys: list[Hashable | None] = []
    params: dict[Hashable, Any] = {}  # comparison key -> the value sent (first seen)
    invalid: dict[int, str] = {}  # position in records -> why its value cannot be compared
    for i, record in enumerate(records):
        value = record.get(lookup.field)
        if value is None:
            keys.append(None)
            continue
        try:
            key, param = column.convert(value)
        except ValueError as exc:
            invalid[i] = (
                f"{lookup.field} {_text(value)!r} {exc} (lookup for {lookup.target});"
                " correct it in the file"
            )
            keys.append(None)
            continue
        keys.append(key)
        params.setdefault(key, param)
    found, refused = await _fetch_guarded(conn, column, params) if params else ({}, {})
    out: list[Record] = []
    for i, (record, key) in enumerate(zip(records, keys, strict=True)):
        reason = invalid.get(i)
        if reason is None and key in refused:
            reason = (
                f"{lookup.field} {_text(record[lookup.field])!r}: {refused[key]} (lookup for"
                f" {lookup.target} in {lookup.qualified}); correct it in the file"
            )
        elif reason is None and key is not None:
            matches = found.get(key)
            if not matches:
                reason = _not_found(lookup, record[lookup.field])
            elif len(matches) > 1:
                reason = (
                    f"{lookup.field} {_text(record[lookup.field])!r} matches {len(matches)} rows"
                    f" of {lookup.qualified} (lookup for {lookup.target}); make"
                    f" {lookup.qualified}.{lookup.match} unique"
                )
            else:
                record[lookup.target] = matches[0]
        elif reason is None:
            record[lookup.target] = None
        if reason is None:
            out.append(record)
        else:
            failures.append(RowFailure(record[ROW], record[SUB], record, reason))
    return out


def _not_found(lookup: Lookup, value: Any) -> str:
    said = f"{lookup.field} {_text(value)!r}"
    if lookup.create_missing:
        return (
            f"{said} has no match in {lookup.qualified}.{lookup.match} and was deleted there"
            f" while it was created (lookup for {lookup.target}); retry the row"
        )
    return (
        f"{said} has no match in {lookup.qualified}.{lookup.match} (lookup for {lookup.target});"
        f" add it to {lookup.qualified} or let the lookup create missing rows"
        " (create_missing=True)"
    )


async def _fetch_guarded(
    conn: asyncpg.Connection, column: _Column, params: dict[Hashable, Any]
) -> tuple[dict[Hashable, list[Any]], dict[Hashable, str]]:
    """The keys of the wanted values, and the values PostgreSQL refused (comparison key ->
    its message). A refusal is possible only for a guarded column: its query runs in a
    savepoint, and when it fails, value by value, so one bad value rejects only its rows."""
    if not column.guarded:
        return await _fetch(conn, column, params), {}
    try:
        async with conn.transaction():
            return await _fetch(conn, column, params), {}
    except ROW_ERRORS:
        pass
    found: dict[Hashable, list[Any]] = {}
    refused: dict[Hashable, str] = {}
    for key, param in params.items():
        try:
            async with conn.transaction():
                found.update(await _fetch(conn, column, {key: param}))
        except ROW_ERRORS as exc:
            refused[key] = str(getattr(exc, "message", exc))
    return found, refused


async def _fetch(
    conn: asyncpg.Connection, column: _Column, params: dict[Hashable, Any]
) -> dict[Hashable, list[Any]]:
    """The keys of the wanted values: comparison key -> the ``returns`` values that match."""
    lookup = column.lookup
    q = quote_ident
    table = f"{q(lookup.schema)}.{q(lookup.table)}"
    match, returns = q(lookup.match), q(lookup.returns)
    wanted = column.wanted
    select = (
        f"SELECT m.{match} AS k, m.{returns} AS v FROM {table} m WHERE m.{match} = ANY({wanted})"
    )
    values = list(params.values())
    if not lookup.create_missing:
        return _by_key(column, await conn.fetch(select, values))
    # The SELECT of the existing rows does not see the CTE's inserts: together they are every
    # wanted key, unless a concurrent import inserted one after this statement's snapshot.
    upsert = (
        f"WITH found AS ({select}),"
        f" made AS (INSERT INTO {table} ({match}) SELECT u.k FROM unnest({wanted}) AS u(k)"
        f" WHERE NOT EXISTS (SELECT 1 FROM found f WHERE f.k = u.k)"
        # In one order: batches applied side by side wait for each other, never deadlock.
        f" ORDER BY u.k ON CONFLICT ({match}) DO NOTHING RETURNING {match} AS k, {returns} AS v)"
        " SELECT k, v FROM found UNION ALL SELECT k, v FROM made"
    )
    found = _by_key(column, await conn.fetch(upsert, values))
    raced = [p for k, p in params.items() if k not in found]
    if raced:  # committed by the other import by now: ON CONFLICT waited for it
        found.update(_by_key(column, await conn.fetch(select, raced)))
    return found


def _by_key(column: _Column, rows: list[asyncpg.Record]) -> dict[Hashable, list[Any]]:
    out: dict[Hashable, list[Any]] = {}
    for row in rows:
        values = out.setdefault(column.key_of(row["k"]), [])
        if row["v"] not in values:
            values.append(row["v"])
    return out
