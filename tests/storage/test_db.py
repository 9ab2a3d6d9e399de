"""The seam between asyncpg and Sluice (sluice.storage.db): a database that cannot be reached
is DatabaseUnavailable, whether the connection cannot be opened or is lost under a statement,
and a connection of the pool raises it too; other database errors stay what they are."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from sluice.errors import DatabaseUnavailable, TransientError
from sluice.storage.db import connect, create_pool
from tests.conftest import Stack
from tests.support.ports import free_port


async def test_a_database_nobody_listens_for_is_unavailable() -> None:
    url = f"postgresql://sluice@127.0.0.1:{free_port()}/sluice"
    with pytest.raises(DatabaseUnavailable, match="cannot be reached") as caught:
        await connect(url)
    assert isinstance(caught.value, TransientError)
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(DatabaseUnavailable):
        await create_pool(url)


async def test_a_connection_lost_under_a_statement_is_unavailable(stack: Stack) -> None:
    conn = await connect(stack.postgres.url)
    killer = await asyncpg.connect(stack.postgres.url)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await killer.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
        # Once the server has closed it, and the client has read that: a statement sent while
        # the server's goodbye is still arriving meets asyncpg's own state error instead.
        while await killer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        with pytest.raises(DatabaseUnavailable):
            await conn.fetchval("SELECT 1")
    finally:
        await killer.close()
        await conn.close()


async def test_the_pool_maps_lost_connections_and_keeps_other_errors(stack: Stack) -> None:
    pool = await create_pool(stack.postgres.url, min_size=1, max_size=1)
    killer = await asyncpg.connect(stack.postgres.url)
    try:
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await pool.fetchval("SELECT 1 FROM no_such_table_anywhere")
        # What the block does with a connection that is gone leaves it as DatabaseUnavailable
        # (inside, asyncpg's proxy of a lost connection refuses to be used at all).
        with pytest.raises(DatabaseUnavailable):
            async with pool.acquire() as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await killer.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
                async with conn.transaction():
                    await conn.execute("SELECT 1")
        # The pool replaces the lost connection.
        assert await pool.fetchval("SELECT 41 + 1") == 42
    finally:
        await killer.close()
        await pool.close()
