"""The S3-compatible file store on the real stack and a real S3 API (moto's server in its own
process): imports, a killed worker, recovery, retry, prune, failed uploads and memory, side by
side with the same work done from PostgreSQL.

The session's workers store in PostgreSQL (the default); ``s3_client`` stores in the object
store, and the workers read those files because reading follows the ``files`` row.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import math
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sluice.config import S3_MIN_PART_BYTES
from sluice.errors import FileGone, FileTooLarge
from sluice.schemas.runs import Run, RunStatus
from sluice.service import Client
from sluice.storage.filestore import READ_CHUNK_BYTES, PgFileStore, iter_bytes
from sluice.storage.objectstore import S3FileStore
from tests.conftest import Stack, finish, unique
from tests.storage.conftest import S3
from tests.support.cli import sluice
from tests.support.rows import (
    checksum,
    csv_text,
    make_rows,
    reset,
    table_checksum,
    write_csv,
)

pytestmark = pytest.mark.stack

MiB = 2**20
PART = S3_MIN_PART_BYTES  # the smallest part S3 takes: the most parts for the bytes
CSV = b"id,name,price\n1,one,1.00\n2,two,2.00\n3,three,3.00\n"


def counters(run: Run) -> dict[str, Any]:
    return run.model_dump(
        include={
            "status",
            "error",
            "total_rows",
            "processed_rows",
            "created_rows",
            "updated_rows",
            "unchanged_rows",
            "skipped_rows",
            "failed_rows",
            "deleted_rows",
            "total_batches",
            "applied_batches",
        }
    )


async def table_rows(db: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    rows = await db.fetch(f"SELECT id, name, price, qty, day, version FROM {table} ORDER BY id")
    return [tuple(r) for r in rows]


async def row_log(db: asyncpg.Connection, run_id: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT row_number, reason, raw::text FROM sluice.row_log WHERE run_id = $1"
        " ORDER BY row_number",
        run_id,
    )
    return [tuple(r) for r in rows]


async def chunks_of(db: asyncpg.Connection, file_id: uuid.UUID | None) -> int:
    return int(
        await db.fetchval("SELECT count(*) FROM sluice.file_chunks WHERE file_id = $1", file_id)
    )


async def file_row(db: asyncpg.Connection, file_id: uuid.UUID | None) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM sluice.files WHERE id = $1", file_id)
    assert row is not None, f"no files row {file_id}"
    return row


def parts_in(etag: str) -> int:
    """S3 names a multipart object's ETag '<md5 of the parts' md5s>-<parts>'."""
    _, dash, parts = etag.strip('"').partition("-")
    return int(parts) if dash else 1


async def read_all(store: Any, file_id: uuid.UUID) -> bytes:
    return b"".join([chunk async for chunk in store.read(file_id)])


def items_file(kind: str, folder: Path) -> tuple[Path, int, int]:
    """A file of the items importers and how many of its rows are good and bad."""
    if kind == "multipart":
        # Plain CSV of more than one part (a whole part of 5 MiB and a shorter last one), with
        # two bad rows.
        lines = csv_text(make_rows(120_000, seed=21)).splitlines()
        lines.insert(5_000, "900001,too,few")
        lines.insert(60_000, "900002,bad number,abc,1,2024-01-01,1")
        path = folder / "items.csv"
        path.write_bytes(("\n".join(lines) + "\n").encode())
        assert path.stat().st_size > PART
        return path, 120_000, 2
    # gzip of Windows-1252 text, smaller than a part: one PUT; the encoding is found in the
    # same pass that hashes it, from either store.
    rows = [(i, f"café {i} ñ", *rest) for i, _, *rest in make_rows(3_000, seed=22)]
    lines = csv_text(rows).splitlines()  # type: ignore[arg-type]
    lines.insert(100, "900003,bad date,1.00,1,2024-13-45,1")
    path = folder / "items.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("cp1252")))
    assert path.stat().st_size < PART
    return path, 3_000, 1


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["multipart", "gzip-cp1252"])
async def test_an_import_from_the_object_store_matches_the_same_import_from_postgresql(
    kind: str,
    stack: Stack,
    client: Client,
    s3_client: Client,
    s3: S3,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    path, good, bad = items_file(kind, tmp_path)
    await reset(db, "t_s3_pg")
    await reset(db, "t_s3_obj")
    pg_run = await finish(client, await client.submit_file("t_s3_pg", path), stack, timeout=400)
    s3_run = await finish(client, await s3_client.submit_file("t_s3_obj", path), stack, timeout=400)

    # The bytes: in file_chunks for one, one object (and no chunk) for the other.
    pg_file, s3_file = await file_row(db, pg_run.file_id), await file_row(db, s3_run.file_id)
    assert (pg_file["store"], pg_file["bucket"], pg_file["object_key"]) == ("postgres", None, None)
    key = f"imports/{s3_run.file_id}"
    assert (s3_file["store"], s3_file["bucket"], s3_file["object_key"]) == ("s3", s3.bucket, key)
    assert await chunks_of(db, pg_run.file_id) > 0
    assert await chunks_of(db, s3_run.file_id) == 0
    assert await s3.body(key) == path.read_bytes()
    expected_parts = math.ceil(path.stat().st_size / PART) if kind == "multipart" else 1
    assert parts_in((await s3.head(key))["ETag"]) == expected_parts
    assert s3_file["upload_id"] is None
    # The metadata found in the single pass is the same.
    meta = ("name", "size", "sha256", "compression", "encoding", "encoding_error", "complete")
    assert {k: s3_file[k] for k in meta} == {k: pg_file[k] for k in meta}
    assert s3_file["compression"] == ("gzip" if kind != "multipart" else "none")

    # The imports: same counters, same rows, same row log, same provenance.
    assert counters(s3_run) == counters(pg_run)
    assert s3_run.status is RunStatus.COMPLETED_WITH_ERRORS, s3_run.error
    assert (s3_run.total_rows, s3_run.created_rows, s3_run.failed_rows) == (good + bad, good, bad)
    pg_rows = await table_rows(db, "t_s3_pg")
    assert len(pg_rows) == good
    assert await table_rows(db, "t_s3_obj") == pg_rows
    pg_log = await row_log(db, pg_run.id)
    assert len(pg_log) == bad
    assert await row_log(db, s3_run.id) == pg_log
    assert s3_run.provenance == pg_run.provenance
    assert s3_run.provenance is not None and s3_run.provenance["sha256"] == s3_file["sha256"]

    # A retry of the rejected rows stores its file where its client stores, and runs the same.
    pg_retry = await finish(client, await client.retry(pg_run.id), stack)
    s3_retry = await finish(client, await s3_client.retry(s3_run.id), stack)
    assert counters(s3_retry) == counters(pg_retry)
    assert s3_retry.failed_rows == bad
    assert (await file_row(db, s3_retry.file_id))["store"] == "s3"
    assert await chunks_of(db, s3_retry.file_id) == 0


@pytest.mark.timeout(900)
async def test_a_worker_killed_mid_run_resumes_from_the_object_store_and_the_run_ends_exact(
    stack: Stack, client: Client, s3_client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await reset(db, "t_s3_killed")
    rows = make_rows(150_000, seed=23)
    path = write_csv(tmp_path / "big.csv", rows)
    run = await s3_client.submit_file("t_s3_killed", path)
    # Logged by the store when a worker starts reading the object (to split it).
    reading = f"file {run.file_id}: reading s3://"

    def reads() -> dict[str, int]:
        return {
            w.name: w.log_path.read_text(errors="replace").count(reading) for w in stack.workers
        }

    # Kill the worker that is splitting the file, once batches are being applied.
    for _ in range(1200):
        current = await client.get_run(run.id)
        splitting = [w for w in stack.workers if reads()[w.name]]
        if (splitting and current.processed_rows > 0) or current.status.terminal:
            break
        await asyncio.sleep(0.05)
    assert not current.status.terminal, "the run finished before the kill; make the file larger"
    assert splitting, f"no worker read the file from the object store:\n{stack.logs()}"
    victim = splitting[0]
    before = sum(reads().values())
    victim.kill()
    try:
        split_done = await db.fetchval("SELECT split_done FROM sluice.runs WHERE id = $1", run.id)
        assert not split_done, "the split finished before the kill; make the file larger"
    finally:
        await asyncio.sleep(1)
        victim.start()  # the session's stack stays as it was

    done = await finish(client, run, stack, timeout=600)
    assert done.status is RunStatus.COMPLETED, done.error
    # The request came back to a worker, which read the file from the object store again.
    assert sum(reads().values()) > before, stack.logs()
    assert done.processed_rows == 150_000
    assert (done.created_rows, done.updated_rows, done.unchanged_rows) == (150_000, 0, 0)
    assert done.applied_batches == done.total_batches
    assert await table_checksum(db, "t_s3_killed") == (150_000, checksum(rows))
    n = await db.fetchval(
        "SELECT sum(created + updated + unchanged + skipped + failed) FROM sluice.batches"
        " WHERE run_id = $1",
        run.id,
    )
    assert n == 150_000
    assert await chunks_of(db, run.file_id) == 0


async def test_a_run_whose_request_was_lost_is_resumed_from_its_object(
    stack: Stack, client: Client, s3_client: Client, db: asyncpg.Connection
) -> None:
    await reset(db, "t_s3")
    ref = await (await s3_client.deps()).files.put(iter_bytes([CSV]), name="lost.csv")
    # A queued run whose request never reached the broker: recovery publishes it from the ref.
    run = await (await s3_client.deps()).runs.create(
        importer="t_s3", source="file", file_id=ref.id, file_name="lost.csv"
    )
    done = await finish(client, run, stack, timeout=120)
    assert done.status is RunStatus.COMPLETED, done.error
    assert (done.total_rows, done.created_rows) == (3, 3)
    types = [
        r["type"]
        for r in await db.fetch(
            "SELECT type FROM sluice.events WHERE run_id = $1 ORDER BY id", run.id
        )
    ]
    assert types[0] == "run.resumed" and types[-1] == "run.completed", types
    assert (await file_row(db, ref.id))["store"] == "s3"


async def age(db: asyncpg.Connection, file_id: uuid.UUID) -> None:
    """Make a stored file (and the runs that read it) older than the retention."""
    await db.execute(
        "UPDATE sluice.files SET created_at = now() - interval '3 days' WHERE id = $1", file_id
    )
    await db.execute(
        "UPDATE sluice.runs SET completed_at = now() - interval '3 days' WHERE file_id = $1",
        file_id,
    )


async def test_prune_deletes_the_object_then_the_row_and_keeps_what_it_could_not_delete(
    stack: Stack, client: Client, s3_client: Client, s3: S3, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "pruned.csv"
    path.write_bytes(CSV.replace(b"three", unique("three").encode()))
    run = await finish(client, await s3_client.submit_file("t_s3", path), stack)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.file_id is not None
    key = f"imports/{run.file_id}"
    # A second old file whose object cannot be deleted now: its row names a bucket the store
    # refuses (as if the store were down or the keys wrong during the prune).
    stuck = await (await s3_client.deps()).files.put(iter_bytes([CSV]), name=unique("stuck"))
    stuck_key = f"imports/{stuck.id}"
    await db.execute("UPDATE sluice.files SET bucket = 'no-such-bucket' WHERE id = $1", stuck.id)
    await age(db, run.file_id)
    await age(db, stuck.id)
    assert {key, stuck_key} <= set(await s3.keys("imports/"))

    # `sluice prune-files` runs with the workers' environment: it stores in PostgreSQL and
    # deletes objects wherever the rows say they are.
    pruned = await asyncio.to_thread(sluice, "prune-files", "--hours", "24", env=stack.env)
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 1 stored file(s)" in pruned.stdout, pruned.stdout
    keys = await s3.keys("imports/")
    assert key not in keys
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", run.file_id) == 0
    assert await db.fetchval("SELECT file_id FROM sluice.runs WHERE id = $1", run.id) is None
    # The object that could not be deleted keeps its row: nothing is left that no row names.
    assert stuck_key in keys
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", stuck.id) == 1
    assert "its object stays until the next prune" in pruned.stderr

    # Once the store answers again, the next prune finishes the job.
    await db.execute("UPDATE sluice.files SET bucket = $2 WHERE id = $1", stuck.id, s3.bucket)
    again = await asyncio.to_thread(sluice, "prune-files", "--hours", "24", env=stack.env)
    assert "deleted 1 stored file(s)" in again.stdout, (again.stdout, again.stderr)
    assert stuck_key not in await s3.keys("imports/")
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", stuck.id) == 0


async def test_each_store_reads_and_deletes_the_files_of_the_other(
    client: Client, s3_client: Client, s3: S3, db: asyncpg.Connection
) -> None:
    pg, objects = (await client.deps()).files, (await s3_client.deps()).files
    assert isinstance(pg, PgFileStore) and isinstance(objects, S3FileStore)
    in_pg = await pg.put(iter_bytes([b"id,name\n", b"1,in postgres\n"]), name="pg.csv")
    in_s3 = await objects.put(iter_bytes([b"id,name\n", b"1,in s3\n"]), name="s3.csv")
    assert await read_all(objects, in_pg.id) == b"id,name\n1,in postgres\n"
    assert await read_all(pg, in_s3.id) == b"id,name\n1,in s3\n"
    assert await pg.ref(in_s3.id) == in_s3 and await objects.ref(in_pg.id) == in_pg

    await pg.delete(in_s3.id)
    assert f"imports/{in_s3.id}" not in await s3.keys("imports/")
    await objects.delete(in_pg.id)
    for file_id in (in_pg.id, in_s3.id):
        assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", file_id) == 0
        with pytest.raises(FileGone, match="is gone"):
            await read_all(pg, file_id)
        await objects.delete(file_id)  # deleting what is gone is no error
        await pg.delete(file_id)

    # An object deleted behind Sluice's back: reading says so, deleting still cleans the row.
    orphan = await objects.put(iter_bytes([CSV]), name="orphan.csv")
    await s3.client.delete_object(Bucket=s3.bucket, Key=f"imports/{orphan.id}")
    with pytest.raises(FileGone, match="not in the object store"):
        await read_all(pg, orphan.id)
    await pg.delete(orphan.id)
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", orphan.id) == 0


def block(i: int, size: int = 64 * 1024) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (size // 32)


@pytest.mark.parametrize("failure", ["over the size limit", "the source fails"])
async def test_a_failed_multipart_upload_leaves_no_object_no_upload_and_no_row(
    failure: str, s3_client: Client, s3: S3, db: asyncpg.Connection
) -> None:
    deps = await s3_client.deps()
    prefix = f"failed-{uuid.uuid4().hex[:8]}/"
    store = S3FileStore(deps.pool, deps.objects, bucket=s3.bucket, prefix=prefix, part_bytes=PART)
    name = unique("failed")
    seen: dict[str, Any] = {}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(12):  # 12 MiB in 1 MiB chunks
            yield block(i, MiB)
            if i == 10:
                # 11 MiB sent: two parts are up, a multipart upload is under way, its row
                # knows it.
                seen["row"] = await db.fetchrow(
                    "SELECT upload_id, complete FROM sluice.files WHERE name = $1", name
                )
                seen["uploads"] = await s3.uploads(prefix)
                if failure == "the source fails":
                    raise ConnectionResetError("the client went away mid-upload")

    if failure == "over the size limit":
        with pytest.raises(FileTooLarge, match=f"limit of {11 * MiB} bytes"):
            await store.put(chunks(), name=name, max_bytes=11 * MiB)
    else:
        with pytest.raises(ConnectionResetError):
            await store.put(chunks(), name=name)
    assert seen["row"]["upload_id"] is not None and not seen["row"]["complete"]
    assert seen["uploads"] == [seen["row"]["upload_id"]]
    assert await s3.uploads(prefix) == []  # aborted
    assert await s3.keys(prefix) == []
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE name = $1", name) == 0


async def test_a_large_file_streams_through_put_and_read_a_part_at_a_time(
    s3_client: Client, s3: S3, db: asyncpg.Connection
) -> None:
    deps = await s3_client.deps()
    prefix = f"large-{uuid.uuid4().hex[:8]}/"
    store = S3FileStore(deps.pool, deps.objects, bucket=s3.bucket, prefix=prefix, part_bytes=PART)
    size = 40 * MiB + 123
    sha = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        # Made as they are sent (64 KiB at a time): nothing holds the whole file.
        sent, i = 0, 0
        while sent < size:
            piece = block(i)[: size - sent]
            sha.update(piece)
            sent += len(piece)
            i += 1
            yield piece

    # Once outside the measure: the client loads its service model and rules on first use.
    warm = await store.put(iter_bytes([block(0, MiB)] * 6), name="warm-up.bin")
    assert len(await read_all(store, warm.id)) == 6 * MiB
    await store.delete(warm.id)

    tracemalloc.start()
    try:
        ref = await store.put(chunks(), name="large.bin")
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read_sha, read_size, largest = hashlib.sha256(), 0, 0
        async for chunk in store.read(ref.id):
            read_sha.update(chunk)
            read_size += len(chunk)
            largest = max(largest, len(chunk))
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (ref.size, ref.sha256) == (size, sha.hexdigest())
    # Eight whole parts of 5 MiB and the 123 bytes left, as the object store has them.
    key = store.key_of(ref.id)
    head = await s3.head(key)
    assert head["ContentLength"] == size and parts_in(head["ETag"]) == 9
    for number in range(1, 9):
        assert (await s3.head(key, part=number))["ContentLength"] == PART
    assert (await s3.head(key, part=9))["ContentLength"] == 123
    # Read back as a stream of chunks of at most 1 MiB.
    assert (read_size, read_sha.hexdigest()) == (size, sha.hexdigest())
    assert 0 < largest <= READ_CHUNK_BYTES
    # Memory held the part being sent (and the HTTP library's copy of it), never the 40 MiB.
    assert put_peak < 3 * PART, f"put peaked at {put_peak / MiB:.1f} MiB"
    assert read_peak < 3 * READ_CHUNK_BYTES, f"read peaked at {read_peak / MiB:.1f} MiB"
    assert await chunks_of(db, ref.id) == 0
    await store.delete(ref.id)
    assert await s3.keys(prefix) == []
