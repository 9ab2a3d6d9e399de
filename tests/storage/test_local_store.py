"""The local-directory file store (``SLUICE_FILE_STORE=file:///DIRECTORY``, the embedded stack's
default) on the real stack: an import from it matches the same import from PostgreSQL, a file
is whole or absent under its name, failed uploads leave nothing, and reading, linking,
deleting and pruning follow the ``files`` row from any store.

The session's workers store in PostgreSQL; ``local_client`` stores in a directory, and the
workers (on this machine) read those files because reading follows the row."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from sluice.config import FileStoreSettings
from sluice.errors import FileGone, FileTooLarge
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.storage.filestore import LocalFileStore, PgFileStore, iter_bytes
from tests.conftest import Stack, finish, unique
from tests.storage.test_objectstore import (
    age,
    chunks_of,
    counters,
    file_row,
    items_file,
    read_all,
    row_log,
    table_rows,
)
from tests.support.cli import sluice
from tests.support.rows import reset

pytestmark = pytest.mark.stack

CSV = b"id,name,price\n1,one,1.00\n2,two,2.00\n3,three,3.00\n"


@pytest.fixture
async def local_client(stack: Stack, tmp_path: Path) -> AsyncIterator[Client]:
    c = Client(stack.settings(stack.file_store(f"file://{tmp_path / 'files'}")))
    yield c
    await c.close()


def left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_file_store_location_is_an_absolute_directory() -> None:
    files = FileStoreSettings(store="file:///var/lib/sluice/files")
    assert files.directory == Path("/var/lib/sluice/files") and not files.uses_s3
    assert FileStoreSettings(store="s3://sluice-files").directory is None
    assert FileStoreSettings().directory is None
    for store in ("file://files", "file://", "file:///"):
        with pytest.raises(ValueError, match="absolute path"):
            FileStoreSettings(store=store)
    with pytest.raises(ValueError, match="file:///DIRECTORY"):
        FileStoreSettings(store="ftp://example.com/files")


@pytest.mark.timeout(600)
async def test_an_import_from_a_local_directory_matches_the_same_import_from_postgresql(
    stack: Stack, client: Client, local_client: Client, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path, good, bad = items_file("multipart", tmp_path)
    await reset(db, "t_local_pg")
    await reset(db, "t_local_disk")
    pg_run = await finish(client, await client.submit_file("t_local_pg", path), stack, timeout=400)
    disk = await local_client.submit_file("t_local_disk", path)
    disk_run = await finish(client, disk, stack, timeout=400)

    pg_file, disk_file = await file_row(db, pg_run.file_id), await file_row(db, disk_run.file_id)
    stored = tmp_path / "files" / str(disk_run.file_id)
    assert (disk_file["store"], disk_file["bucket"], disk_file["object_key"]) == (
        "local",
        None,
        str(stored),
    )
    assert stored.read_bytes() == path.read_bytes()
    assert left_in(stored.parent) == [stored.name]  # no .part left behind
    assert await chunks_of(db, disk_run.file_id) == 0
    meta = ("name", "size", "sha256", "compression", "encoding", "encoding_error", "complete")
    assert {k: disk_file[k] for k in meta} == {k: pg_file[k] for k in meta}

    assert counters(disk_run) == counters(pg_run)
    assert disk_run.status is RunStatus.COMPLETED_WITH_ERRORS, disk_run.error
    assert (disk_run.total_rows, disk_run.created_rows, disk_run.failed_rows) == (
        good + bad,
        good,
        bad,
    )
    pg_rows = await table_rows(db, "t_local_pg")
    assert len(pg_rows) == good
    assert await table_rows(db, "t_local_disk") == pg_rows
    assert await row_log(db, disk_run.id) == await row_log(db, pg_run.id)
    assert disk_run.provenance == pg_run.provenance


async def test_a_linked_download_shares_the_stored_bytes_and_a_plain_one_copies_them(
    local_client: Client, tmp_path: Path
) -> None:
    files = (await local_client.deps()).files
    assert isinstance(files, LocalFileStore)
    ref = await files.put(iter_bytes([CSV]), name="linked.csv")
    stored = files.directory / str(ref.id)
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    await files.download(ref.id, linked, link=True)
    await files.download(ref.id, copied)
    assert linked.read_bytes() == copied.read_bytes() == CSV
    assert os.path.samefile(linked, stored)  # the split reads the stored bytes, none copied
    assert not os.path.samefile(copied, stored)  # what a caller may write to is its own
    # A prune deleting the stored name while a split reads its link takes nothing from it.
    await files.delete(ref.id)
    assert not stored.exists() and linked.read_bytes() == CSV


@pytest.mark.parametrize("failure", ["over the size limit", "the source fails"])
async def test_a_failed_upload_to_a_directory_leaves_no_file_and_no_row(
    failure: str, local_client: Client, db: asyncpg.Connection
) -> None:
    files = (await local_client.deps()).files
    assert isinstance(files, LocalFileStore)
    name = unique("failed")
    seen: dict[str, object] = {}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(8):
            yield bytes([65 + i]) * 65536
            if i == 5:
                # Under way: a row that is not complete and a .part file, no final name yet.
                seen["complete"] = await db.fetchval(
                    "SELECT complete FROM sluice.files WHERE name = $1", name
                )
                seen["files"] = left_in(files.directory)
                if failure == "the source fails":
                    raise ConnectionResetError("the client went away mid-upload")

    if failure == "over the size limit":
        with pytest.raises(FileTooLarge, match="limit of 400000 bytes"):
            await files.put(chunks(), name=name, max_bytes=400_000)
    else:
        with pytest.raises(ConnectionResetError):
            await files.put(chunks(), name=name)
    assert seen["complete"] is False
    [part] = seen["files"]  # type: ignore[misc]
    assert part.startswith(".") and part.endswith(".part")
    assert left_in(files.directory) == []
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE name = $1", name) == 0


async def test_each_store_reads_and_deletes_the_files_of_a_directory(
    client: Client, local_client: Client, db: asyncpg.Connection
) -> None:
    pg, local = (await client.deps()).files, (await local_client.deps()).files
    assert isinstance(pg, PgFileStore) and isinstance(local, LocalFileStore)
    on_disk = await local.put(iter_bytes([b"id,name\n", b"1,on disk\n"]), name="disk.csv")
    in_pg = await pg.put(iter_bytes([b"id,name\n", b"1,in postgres\n"]), name="pg.csv")
    assert await read_all(pg, on_disk.id) == b"id,name\n1,on disk\n"
    assert await read_all(local, in_pg.id) == b"id,name\n1,in postgres\n"
    assert await pg.ref(on_disk.id) == on_disk

    await pg.delete(on_disk.id)
    assert left_in(local.directory) == []
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", on_disk.id) == 0
    await local.delete(in_pg.id)
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", in_pg.id) == 0

    # A file deleted behind Sluice's back (or a reader on another machine): reading says where
    # it was and what to do; deleting still cleans the row.
    orphan = await local.put(iter_bytes([CSV]), name="orphan.csv")
    (local.directory / str(orphan.id)).unlink()
    with pytest.raises(FileGone, match=f"local disk at {local.directory / str(orphan.id)}"):
        await read_all(pg, orphan.id)
    with pytest.raises(FileGone, match="another machine"):
        await pg.download(orphan.id, local.directory.parent / "nowhere", link=True)
    await pg.delete(orphan.id)
    assert await db.fetchval("SELECT count(*) FROM sluice.files WHERE id = $1", orphan.id) == 0


async def test_prune_deletes_old_files_of_a_directory_and_what_a_crashed_upload_left(
    stack: Stack, local_client: Client, db: asyncpg.Connection
) -> None:
    files = (await local_client.deps()).files
    assert isinstance(files, LocalFileStore)
    kept = await files.put(iter_bytes([CSV]), name=unique("kept"))
    old = await files.put(iter_bytes([CSV]), name=unique("old"))
    # An upload a crash cut short: its row (not complete) and its .part file, nothing else.
    crashed = uuid.uuid4()
    crashed_path = files.directory / str(crashed)
    await db.execute(
        "INSERT INTO sluice.files (id, name, store, object_key) VALUES ($1, $2, 'local', $3)",
        crashed,
        unique("crashed"),
        str(crashed_path),
    )
    (files.directory / f".{crashed}.part").write_bytes(CSV[:10])
    for file_id in (old.id, crashed):
        await age(db, file_id)

    pruned = await asyncio.to_thread(sluice, "prune-files", "--hours", "24", env=stack.env)
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted" in pruned.stdout, pruned.stdout
    assert left_in(files.directory) == [str(kept.id)]
    remaining = await db.fetch(
        "SELECT id FROM sluice.files WHERE id = ANY($1::uuid[])", [kept.id, old.id, crashed]
    )
    assert [r["id"] for r in remaining] == [kept.id]
