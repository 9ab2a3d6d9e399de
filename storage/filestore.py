"""Claim check. A file is stored once and events carry only its id, size and sha256.

The bytes go to one of three stores: PostgreSQL (default: ``file_chunks``, so any worker on any
machine can read them), an S3-compatible object store (``sluice.storage.objectstore``) or a
directory on this machine's disk (``sluice.storage.localstore``, the embedded stack's). The
metadata stays in the ``files`` table whichever it is, and reading, deleting and pruning
dispatch on what a file's row says: every store reads and deletes the files of every other
(a local file, where its disk is).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol, TypeAlias

import asyncpg

from sluice.errors import FileGone, FileTooLarge, InvalidConfig, SluiceError
from sluice.schemas.events import FileRef
from sluice.schemas.formats import FileInspection
from sluice.storage.localstore import (
    READ_CHUNK_BYTES,
    LocalSink,
    copy_local,
    read_local,
    remove_local,
    stored_path,
)

log = logging.getLogger(__name__)


class StoreKind(enum.StrEnum):
    """Where a file's bytes are (``files.store``)."""

    POSTGRES = "postgres"
    """``bytea`` chunks in ``file_chunks``."""
    S3 = "s3"
    """One object at ``files.bucket`` / ``files.object_key`` in an S3-compatible store."""
    LOCAL = "local"
    """One file on a local disk, at the absolute path ``files.object_key``."""


class FileStore(Protocol):
    """Stores files (``put``, into this store) and reads, deletes and prunes files of any store.
    ``sluice.runtime.Runtime.files()`` returns the configured one."""

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef: ...

    def read(self, file_id: uuid.UUID) -> AsyncIterator[bytes]: ...

    async def ref(self, file_id: uuid.UUID) -> FileRef | None: ...

    async def content_type(self, file_id: uuid.UUID) -> str | None: ...

    async def download(self, file_id: uuid.UUID, dest: Path, *, link: bool = False) -> None: ...

    async def delete(self, file_id: uuid.UUID) -> None: ...

    async def prune(self, older_than_hours: float) -> tuple[int, int]: ...


class Objects(Protocol):
    """An object store's client as the file stores use it (``objectstore.S3Objects``). Deleting
    and aborting are idempotent: what is already gone is no error."""

    async def check_bucket(self, bucket: str) -> None: ...

    async def put_object(
        self, bucket: str, key: str, data: bytes, content_type: str | None
    ) -> None: ...

    async def start_upload(self, bucket: str, key: str, content_type: str | None) -> str: ...

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes
    ) -> str: ...

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, etags: Sequence[str]
    ) -> None: ...

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None: ...

    async def delete_object(self, bucket: str, key: str) -> None: ...

    def stream(self, bucket: str, key: str, chunk_bytes: int) -> AsyncIterator[bytes]: ...


ObjectsProvider = Callable[[], Awaitable[Objects]]
"""Gives the process's object store client, connecting on first use (``Runtime.objects``)."""


class Sink(Protocol):
    """Where ``put`` sends a file's bytes, in order, as they arrive."""

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> None:
        """All bytes were written: make them durable."""

    async def abort(self) -> None:
        """Undo whatever was written (the upload failed); idempotent."""


class Sha256Only:
    """The least a stored file needs: its size and sha256 (no compression or encoding found)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0
        self.compression: str | None = "none"
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.size += len(chunk)

    def sha256(self) -> str:
        return self._sha.hexdigest()

    def encoding(self) -> str | None:
        return None


Db: TypeAlias = asyncpg.Connection | asyncpg.Pool
"""What a put writes its row through: the connection that writes the chunks, or the pool."""


class StoredFiles:
    """The ``files`` table and what both stores share: storing with a single inspecting pass,
    and reading, deleting and pruning whatever store a file is in."""

    kind: ClassVar[StoreKind]

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        objects: ObjectsProvider | None = None,
        inspect: Callable[[], FileInspection] = Sha256Only,
    ) -> None:
        """``inspect`` makes the pass each stored file goes through (the split's
        ``Inspector`` decides compression and encoding; by default only size and sha256)."""
        self._pool = pool
        self._objects = objects
        self._inspect = inspect

    async def _store(
        self,
        db: Db,
        file_id: uuid.UUID,
        sink: Sink,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None,
        max_bytes: int | None,
        bucket: str | None = None,
        key: str | None = None,
    ) -> FileRef:
        """Insert the row first (so no byte is ever stored that no row names), stream the chunks
        through the inspector into ``sink``, then complete the row. On any failure, a file
        over the limit included, the sink is aborted and the row deleted."""
        inspector = self._inspect()
        await db.execute(
            "INSERT INTO files (id, name, content_type, store, bucket, object_key)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            file_id,
            name,
            content_type,
            self.kind.value,
            bucket,
            key,
        )
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                inspector.feed(chunk)
                if max_bytes is not None and inspector.size > max_bytes:
                    raise FileTooLarge(
                        f"the file is larger than the limit of {max_bytes} bytes; "
                        "split it or raise SLUICE_API_MAX_UPLOAD_BYTES"
                    )
                await sink.write(chunk)
            await sink.finish()
            encoding = inspector.encoding()
            await db.execute(
                "UPDATE files SET size = $2, sha256 = $3, compression = $4, encoding = $5,"
                " encoding_error = $6, upload_id = NULL, complete = true WHERE id = $1",
                file_id,
                inspector.size,
                inspector.sha256(),
                inspector.compression or "none",
                encoding,
                inspector.error,
            )
        except BaseException:
            await self._abandon(db, file_id, sink)
            raise
        return FileRef(
            id=file_id,
            name=name,
            size=inspector.size,
            sha256=inspector.sha256(),
            compression=inspector.compression or "none",
            encoding=encoding,
            encoding_error=inspector.error,
        )

    async def _abandon(self, db: Db, file_id: uuid.UUID, sink: Sink) -> None:
        try:
            await sink.abort()
        except Exception:
            # The row (with its upload id) stays, incomplete: pruning aborts the upload and
            # deletes the object later, so nothing is left that no row refers to.
            log.exception("file %s: could not undo a failed upload; pruning will", file_id)
            return
        await db.execute("DELETE FROM files WHERE id = $1", file_id)

    async def ref(self, file_id: uuid.UUID) -> FileRef | None:
        """The claim check of a stored, complete file; None when there is none."""
        r = await self._pool.fetchrow(
            "SELECT id, name, size, sha256, compression, encoding, encoding_error"
            " FROM files WHERE id = $1 AND complete",
            file_id,
        )
        return FileRef.model_validate(dict(r)) if r is not None else None

    async def content_type(self, file_id: uuid.UUID) -> str | None:
        """The content type the file was stored with (as its sender named it); None when it
        named none, or there is no such file."""
        content_type: str | None = await self._pool.fetchval(
            "SELECT content_type FROM files WHERE id = $1", file_id
        )
        return content_type

    async def read(self, file_id: uuid.UUID) -> AsyncIterator[bytes]:
        """The file's bytes in order, from whichever store its row names. FileGone when the file
        was deleted (pruned) or never completely stored."""
        row = await self._pool.fetchrow(
            "SELECT store, bucket, object_key FROM files WHERE id = $1 AND complete", file_id
        )
        if row is None:
            raise FileGone(f"stored file {file_id} is gone (pruned?); import the file again")
        if row["store"] == StoreKind.LOCAL:
            async for chunk in read_local(file_id, Path(row["object_key"])):
                yield chunk
            return
        if row["store"] == StoreKind.S3:
            objects = await self._objects_for(file_id, row)
            log.info("file %s: reading s3://%s/%s", file_id, row["bucket"], row["object_key"])
            async for chunk in objects.stream(row["bucket"], row["object_key"], READ_CHUNK_BYTES):
                yield chunk
            return
        if row["store"] != StoreKind.POSTGRES:
            # A store a later version added: reading its row as chunks would give no bytes.
            raise InvalidConfig(
                f"stored file {file_id} is in the file store {row['store']!r}, which this "
                "version of Sluice cannot read: upgrade this process"
            )
        # One chunk per query keeps memory flat whatever the file's size.
        async with self._pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM file_chunks WHERE file_id = $1", file_id
            )
            for seq in range(count):
                data = await conn.fetchval(
                    "SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2",
                    file_id,
                    seq,
                )
                yield data

    async def download(self, file_id: uuid.UUID, dest: Path, *, link: bool = False) -> None:
        """Write the file to ``dest``. ``link``: the caller only reads ``dest`` and then deletes
        it, so a file on this machine's disk may become a hard link to the stored bytes (none
        copied) instead of a copy."""
        if link:
            path = await self._pool.fetchval(
                "SELECT object_key FROM files WHERE id = $1 AND complete AND store = $2",
                file_id,
                StoreKind.LOCAL.value,
            )
            if path is not None:
                await copy_local(file_id, Path(path), dest)
                return
        with dest.open("wb") as out:
            async for chunk in self.read(file_id):
                out.write(chunk)

    async def delete(self, file_id: uuid.UUID) -> None:
        """Delete the file: its object first, then its row (the chunks go with the row), so a
        delete that fails half way leaves a row to delete again, never an object nothing
        refers to. Deleting what is gone is no error."""
        row = await self._pool.fetchrow(
            "SELECT id, store, bucket, object_key, upload_id FROM files WHERE id = $1", file_id
        )
        if row is None:
            return
        await self._remove_object(row)
        await self._pool.execute("DELETE FROM files WHERE id = $1", file_id)

    async def prune(self, older_than_hours: float) -> tuple[int, int]:
        """Delete stored files no queued or running run needs: those whose runs all finished
        more than ``older_than_hours`` ago, and files of that age no run refers to (an upload
        whose run was never created, or an upload that crashed). Returns (files, bytes).

        An object that cannot be deleted now keeps its row, for the next prune."""
        doomed = (
            "f.created_at < now() - $1 * interval '1 hour'"
            " AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.file_id = f.id"
            "   AND (r.status IN ('queued', 'running')"
            "        OR r.completed_at >= now() - $1 * interval '1 hour'))"
        )
        record = await self._pool.fetchrow(
            "WITH gone AS (DELETE FROM files f"
            f" WHERE f.store = 'postgres' AND {doomed} RETURNING f.size)"
            " SELECT count(*) AS n, coalesce(sum(size), 0) AS bytes FROM gone",
            older_than_hours,
        )
        n, size = int(record["n"]), int(record["bytes"])
        objects = await self._pool.fetch(
            "SELECT f.id, f.store, f.bucket, f.object_key, f.upload_id FROM files f"
            f" WHERE f.store <> 'postgres' AND {doomed}",
            older_than_hours,
        )
        for row in objects:
            try:
                await self._remove_object(row)
            except SluiceError as exc:
                log.warning("file %s: its object stays until the next prune: %s", row["id"], exc)
                continue
            deleted = await self._pool.fetchval(
                "DELETE FROM files WHERE id = $1 RETURNING size", row["id"]
            )
            if deleted is not None:
                n, size = n + 1, size + int(deleted)
        return n, size

    async def _remove_object(self, row: asyncpg.Record) -> None:
        if row["store"] == StoreKind.LOCAL:
            await asyncio.to_thread(remove_local, Path(row["object_key"]))
            return
        if row["store"] != StoreKind.S3:
            return
        objects = await self._objects_for(row["id"], row)
        if row["upload_id"] is not None:
            await objects.abort_upload(row["bucket"], row["object_key"], row["upload_id"])
        await objects.delete_object(row["bucket"], row["object_key"])

    async def _objects_for(self, file_id: uuid.UUID, row: asyncpg.Record) -> Objects:
        if self._objects is None:
            raise InvalidConfig(
                f"file {file_id} is stored in s3://{row['bucket']}/{row['object_key']} and this "
                "process has no object store client: set SLUICE_S3_ENDPOINT_URL and the "
                "SLUICE_S3_* credentials"
            )
        return await self._objects()


class PgFileStore(StoredFiles):
    """New files as ``bytea`` chunks (1 MiB by default) in ``file_chunks``."""

    kind = StoreKind.POSTGRES

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        chunk_bytes: int = 1 << 20,
        objects: ObjectsProvider | None = None,
        inspect: Callable[[], FileInspection] = Sha256Only,
    ) -> None:
        super().__init__(pool, objects=objects, inspect=inspect)
        self._chunk_bytes = chunk_bytes

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef:
        file_id = uuid.uuid4()
        async with self._pool.acquire() as conn:
            return await self._store(
                conn,
                file_id,
                _ChunkSink(conn, file_id, self._chunk_bytes),
                chunks,
                name=name,
                content_type=content_type,
                max_bytes=max_bytes,
            )


class LocalFileStore(StoredFiles):
    """New files as files of ``directory`` on this machine's disk, named by their id."""

    kind = StoreKind.LOCAL

    def __init__(
        self,
        pool: asyncpg.Pool,
        directory: Path,
        *,
        objects: ObjectsProvider | None = None,
        inspect: Callable[[], FileInspection] = Sha256Only,
    ) -> None:
        super().__init__(pool, objects=objects, inspect=inspect)
        self.directory = directory

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef:
        file_id = uuid.uuid4()
        path = stored_path(self.directory, file_id)
        # No PostgreSQL connection is held while the bytes go to the disk.
        return await self._store(
            self._pool,
            file_id,
            LocalSink(path),
            chunks,
            name=name,
            content_type=content_type,
            max_bytes=max_bytes,
            key=str(path),
        )


class _ChunkSink:
    def __init__(self, conn: asyncpg.Connection, file_id: uuid.UUID, chunk_bytes: int) -> None:
        self._conn = conn
        self._file_id = file_id
        self._chunk_bytes = chunk_bytes
        self._buf = bytearray()
        self._seq = 0

    async def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= self._chunk_bytes:
            await self._write_chunk(bytes(self._buf[: self._chunk_bytes]))
            del self._buf[: self._chunk_bytes]

    async def finish(self) -> None:
        if self._buf:
            await self._write_chunk(bytes(self._buf))
            self._buf.clear()

    async def abort(self) -> None:
        """The chunks go with the row (ON DELETE CASCADE)."""

    async def _write_chunk(self, data: bytes) -> None:
        await self._conn.execute(
            "INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3)",
            self._file_id,
            self._seq,
            data,
        )
        self._seq += 1


async def prune_files(files: FileStore, older_than_hours: float) -> tuple[int, int]:
    """``files.prune``: stored files of any store that no run needs any more, objects
    included. Returns (files, bytes) deleted."""
    return await files.prune(older_than_hours)


async def iter_path(path: Path, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
    """A local file as an async stream of chunks, for ``FileStore.put``."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


async def iter_bytes(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
