"""Connection pools, the schemas Sluice's tables live in, and migrations.

Sluice keeps its own tables in two schemas, ``sluice`` and ``atproto`` by default
(``SLUICE_DATABASE_SCHEMA``, ``SLUICE_DATABASE_ATPROTO_SCHEMA``), so two deployments can share
one database. Every connection made here has ``search_path`` set to those two schemas, and the
SQL of the library names its own tables unqualified; tables of users (import targets, lookups)
are always schema-qualified. The migration files are written for the default names and are
rewritten for the configured ones when applied.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import asyncpg
import orjson

from sluice.config import Schemas
from sluice.errors import DatabaseUnavailable
from sluice.retries import Policy
from sluice.storage.sql import quote_ident

log = logging.getLogger(__name__)


def search_path(schemas: Schemas) -> str:
    # public last: a name of Sluice's resolves to the deployment's schemas first, and SQL of
    # users' own (a transform's query, a script on the pool) still finds public's tables.
    return f"{quote_ident(schemas.core)}, {quote_ident(schemas.atproto)}, public"


def rewrite_for(schemas: Schemas, sql: str) -> str:
    """Migration SQL written for the default schema names, for ``schemas``."""
    for default, name in (
        (DEFAULT_SCHEMAS.core, schemas.core),
        (DEFAULT_SCHEMAS.atproto, schemas.atproto),
    ):
        sql = re.sub(rf"\b{default}\.", f"{quote_ident(name)}.", sql)
        sql = re.sub(
            rf"\bSCHEMA IF NOT EXISTS {default}\b", f"SCHEMA IF NOT EXISTS {quote_ident(name)}", sql
        )
    return sql


DEFAULT_SCHEMAS = Schemas()


def advisory_key(name: str, param: str | None = None) -> str:
    """SQL for the advisory lock key ``name`` of this deployment (its core schema is first on
    the search path), so two deployments in one database never wait for each other. ``param``
    (a placeholder such as ``$1``) makes one lock per value: one per run, one per DID."""
    if param is None:
        return f"hashtextextended(current_schema() || ':{name}', 0)"
    return f"hashtextextended(current_schema() || ':{name}:' || {param}, 0)"


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)
"""What asyncpg raises when the database cannot be reached (down, restarting, the connection
lost). The connections and pools made here raise these as
:class:`~sluice.errors.DatabaseUnavailable` instead, so callers see Sluice's error tree."""


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """``exc`` (one of CONNECTION_ERRORS) as the error tree's DatabaseUnavailable."""
    return DatabaseUnavailable(f"the database cannot be reached ({type(exc).__name__}: {exc})")


def serialization_conflict(exc: BaseException) -> bool:
    """A serializable transaction aborted because a concurrent one won: apply it again
    (``retry_on`` of sluice.retries CONFLICT loops)."""
    return isinstance(exc, asyncpg.exceptions.SerializationError)


CONFLICT = Policy(attempts=20, first=0.02, cap=0.4, retry_on=serialization_conflict)
"""For a serializable transaction that lost to a concurrent one: short waits, many tries;
anything else is not retried here."""

P = ParamSpec("P")
R = TypeVar("R")


def _mapped(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except DatabaseUnavailable:
            raise
        except CONNECTION_ERRORS as exc:
            raise unavailable(exc) from exc

    return call


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, with its failures to reach the database raised as
    DatabaseUnavailable (the seam between asyncpg and the rest of Sluice). Every statement,
    transactions' BEGIN/COMMIT/ROLLBACK included, goes through one of these methods."""

    execute = _mapped(asyncpg.Connection.execute)
    executemany = _mapped(asyncpg.Connection.executemany)
    fetch = _mapped(asyncpg.Connection.fetch)
    fetchrow = _mapped(asyncpg.Connection.fetchrow)
    fetchval = _mapped(asyncpg.Connection.fetchval)
    fetchmany = _mapped(asyncpg.Connection.fetchmany)
    prepare = _mapped(asyncpg.Connection.prepare)
    copy_from_table = _mapped(asyncpg.Connection.copy_from_table)
    copy_from_query = _mapped(asyncpg.Connection.copy_from_query)
    copy_to_table = _mapped(asyncpg.Connection.copy_to_table)
    copy_records_to_table = _mapped(asyncpg.Connection.copy_records_to_table)


class _Acquired:
    """``pool.acquire()``: its connection, and failures to reach the database inside the
    ``async with`` block (a lost connection's proxy refusing to be used, say) raised as
    DatabaseUnavailable."""

    def __init__(self, acquiring: Any) -> None:
        self._acquiring = acquiring

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            return await self._acquiring.__aenter__()
        except CONNECTION_ERRORS as exc:
            raise unavailable(exc) from exc

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool | None:
        try:
            done: bool | None = await self._acquiring.__aexit__(kind, exc, tb)
        except CONNECTION_ERRORS as failed:
            raise unavailable(failed) from failed
        if isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, DatabaseUnavailable):
            raise unavailable(exc) from exc
        return done

    def __await__(self) -> Any:
        return _mapped(self._acquiring.__aenter__)().__await__()


class Pool(asyncpg.Pool):  # type: ignore[misc]
    """asyncpg's pool, whose connections are :class:`Connection` and whose ``acquire`` raises
    DatabaseUnavailable when the database cannot be reached."""

    def acquire(self, *, timeout: float | None = None) -> _Acquired:
        return _Acquired(super().acquire(timeout=timeout))


async def _connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(*args, **kwargs)
    except CONNECTION_ERRORS as exc:
        raise unavailable(exc) from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def create_pool(
    url: str, *, schemas: Schemas = DEFAULT_SCHEMAS, min_size: int = 1, max_size: int = 8
) -> asyncpg.Pool:
    """A pool whose connections raise DatabaseUnavailable when the database cannot be reached
    (when a connection is opened, on every statement, and in an ``acquire`` block)."""
    pool = await Pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=300,
        connect=_connect,
        connection_class=Connection,
        record_class=asyncpg.Record,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        setup=None,
        reset=None,
        # A startup parameter, not a SET: the pool's RESET ALL on release keeps it.
        server_settings={"search_path": search_path(schemas)},
    )
    assert pool is not None
    return pool


async def connect(url: str, *, schemas: Schemas = DEFAULT_SCHEMAS) -> asyncpg.Connection:
    """One connection (see create_pool for its errors)."""
    conn = await _connect(
        url, connection_class=Connection, server_settings={"search_path": search_path(schemas)}
    )
    await _init_connection(conn)
    return conn


def _migration_files() -> list[tuple[int, str, str]]:
    folder = resources.files("sluice.storage") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, schemas: Schemas = DEFAULT_SCHEMAS) -> list[str]:
    """Apply pending migrations in order, each in its own transaction. Returns what was applied.

    What was applied is kept in ``<core schema>.schema_migrations``. A database migrated before
    schemas were configurable kept it in ``public.sluice_migrations``; that record is adopted
    for the default schema."""
    applied: list[str] = []
    core = quote_ident(schemas.core)
    lock = f"hashtextextended('{schemas.core}:migrations', 0)"
    await conn.execute(f"SELECT pg_advisory_lock({lock})")
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {core}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {core}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        if schemas.core == DEFAULT_SCHEMAS.core and await conn.fetchval(
            "SELECT to_regclass('public.sluice_migrations') IS NOT NULL"
        ):
            await conn.execute(
                f"INSERT INTO {core}.schema_migrations (version, name, applied_at)"
                " SELECT version, name, applied_at FROM public.sluice_migrations"
                " ON CONFLICT (version) DO NOTHING"
            )
        done = {
            r["version"] for r in await conn.fetch(f"SELECT version FROM {core}.schema_migrations")
        }
        for version, name, sql in _migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(rewrite_for(schemas, sql))
                await conn.execute(
                    f"INSERT INTO {core}.schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    name,
                )
            log.info("applied migration %s to schema %s", name, schemas.core)
            applied.append(name)
    finally:
        await conn.execute(f"SELECT pg_advisory_unlock({lock})")
    return applied


async def migrate_database(url: str, schemas: Schemas = DEFAULT_SCHEMAS) -> list[str]:
    """Connect, apply pending migrations (one migrator at a time across processes), close."""
    conn = await connect(url, schemas=schemas)
    try:
        return await migrate(conn, schemas)
    finally:
        await conn.close()
