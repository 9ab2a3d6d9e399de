"""Claim check. A file is stored once, in PostgreSQL by default so any worker on any machine can
read it, and events carry only its id, size and sha256."""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Protocol

import asyncpg

from sluice.errors import FileTooLarge
from sluice.formats import (
    MAGIC_BYTES,
    XLS_REFUSED,
    EncodingSniffer,
    FileFormatError,
    FormatOptions,
    binary_format,
    check_decompression,
)
from sluice.schemas.events import FileRef

GZIP_MAGIC = b"\x1f\x8b"


class FileStore(Protocol):
    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef: ...

    def read(self, file_id: uuid.UUID) -> AsyncIterator[bytes]: ...

    async def delete(self, file_id: uuid.UUID) -> None: ...


class _Inspector:
    """Hashes the stored bytes and decides compression and text encoding in the same single pass.

    A file whose first bytes announce an XLSX workbook or a Parquet file is not text: it gets no
    encoding and no error (it is read as what it is when it is split). An old binary Office
    file (.xls) gets the reason it cannot be read as its error.
    """

    def __init__(self, max_decompressed: int, max_ratio: int) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.compression: str | None = None
        self._gunzip: zlib._Decompress | None = None
        self._sniffer = EncodingSniffer()
        self._decompressed = 0
        self._compressed = 0  # gzip bytes consumed by the decompressor
        self._max_decompressed = max_decompressed
        self._max_ratio = max_ratio
        self.error: str | None = None
        self.binary: str | None = None  # "xlsx", "parquet" or "xls", told by the first bytes
        self._head = b""  # the first bytes, until there are enough to tell the format

    def feed(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.size += len(chunk)
        if self.compression is None:
            # The signatures may arrive split over chunks: decide on all their bytes at once.
            self._head += chunk
            if len(self._head) < MAGIC_BYTES:
                return
            chunk, self._head = self._head, b""
            self._start(chunk)
        self._inspect(chunk)

    def _start(self, head: bytes) -> None:
        """Decide compression and binary formats on the first bytes of the file."""
        self.compression = "gzip" if head[:2] == GZIP_MAGIC else "none"
        if self.compression == "gzip":
            self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        # What it says of a tar archive depends on the compression around it.
        self._sniffer = EncodingSniffer(compression=self.compression)
        self.binary = binary_format(head)
        if self.binary == "xls":
            self.error = XLS_REFUSED

    def _inspect(self, chunk: bytes) -> None:
        if self.error is not None or self.binary is not None:
            return
        try:
            if self._gunzip is not None:
                self._gunzip_feed(chunk)
            else:
                self._sniff(chunk)
        except (FileFormatError, zlib.error) as exc:
            self.error = (
                f"{exc}" if isinstance(exc, FileFormatError) else f"broken gzip data: {exc}"
            )

    def _gunzip_feed(self, chunk: bytes) -> None:
        assert self._gunzip is not None
        pending = chunk
        while pending:
            # Compressed bytes are counted as they are consumed, for the ratio check.
            self._compressed += len(pending)
            if self._gunzip.eof:
                # A gzip file may hold several members, one after the other (RFC 1952), with
                # zero padding between or after them: the parser reads them all, so must the
                # checks.
                pending = pending.lstrip(b"\x00")
                if not pending:
                    return
                self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
            # A bounded output per call: a bomb never has more than 1 MiB unpacked in memory.
            data = self._gunzip.decompress(pending, 1 << 20)
            # At the end of a member the rest of the input is in unused_data (and may be in
            # unconsumed_tail too: take it once).
            pending = self._gunzip.unused_data if self._gunzip.eof else self._gunzip.unconsumed_tail
            self._compressed -= len(pending)
            if data:
                self._sniff(data)

    def _sniff(self, data: bytes) -> None:
        self._decompressed += len(data)
        if self._gunzip is not None:
            check_decompression(
                self._decompressed,
                self._compressed,
                max_decompressed_bytes=self._max_decompressed,
                max_compression_ratio=self._max_ratio,
            )
        elif self._decompressed > self._max_decompressed:
            check_decompression(
                self._decompressed,
                self._decompressed,
                max_decompressed_bytes=self._max_decompressed,
            )
        self._sniffer.feed(data)

    def encoding(self) -> str | None:
        if self.compression is None:  # a file shorter than the longest signature
            head, self._head = self._head, b""
            self._start(head)
            self._inspect(head)
        if self.error is not None or self.binary is not None:
            return None
        try:
            return self._sniffer.result()
        except FileFormatError as exc:
            self.error = str(exc)
            return None


class PgFileStore:
    """Files as 1 MiB ``bytea`` chunks in ``sluice.file_chunks``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        chunk_bytes: int = 1 << 20,
        max_decompressed: int = FormatOptions.max_decompressed_bytes,
        max_compression_ratio: int = FormatOptions.max_compression_ratio,
    ) -> None:
        self._pool = pool
        self._chunk_bytes = chunk_bytes
        self._max_decompressed = max_decompressed
        self._max_ratio = max_compression_ratio

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef:
        file_id = uuid.uuid4()
        inspector = _Inspector(self._max_decompressed, self._max_ratio)
        buf = bytearray()
        seq = 0
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO files (id, name, content_type) VALUES ($1, $2, $3)",
                file_id,
                name,
                content_type,
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
                    buf += chunk
                    while len(buf) >= self._chunk_bytes:
                        await self._write_chunk(conn, file_id, seq, bytes(buf[: self._chunk_bytes]))
                        del buf[: self._chunk_bytes]
                        seq += 1
                if buf:
                    await self._write_chunk(conn, file_id, seq, bytes(buf))
                encoding = inspector.encoding()
                await conn.execute(
                    "UPDATE files SET size = $2, sha256 = $3, compression = $4,"
                    " encoding = $5, encoding_error = $6, complete = true WHERE id = $1",
                    file_id,
                    inspector.size,
                    inspector.sha.hexdigest(),
                    inspector.compression or "none",
                    encoding,
                    inspector.error,
                )
            except BaseException:
                await conn.execute("DELETE FROM files WHERE id = $1", file_id)
                raise
        return FileRef(
            id=file_id,
            name=name,
            size=inspector.size,
            sha256=inspector.sha.hexdigest(),
            compression=inspector.compression or "none",
            encoding=encoding,
            encoding_error=inspector.error,
        )

    @staticmethod
    async def _write_chunk(
        conn: asyncpg.Connection, file_id: uuid.UUID, seq: int, data: bytes
    ) -> None:
        await conn.execute(
            "INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3)",
            file_id,
            seq,
            data,
        )

    async def ref(self, file_id: uuid.UUID) -> FileRef | None:
        """The claim check of a stored, complete file; None when there is none."""
        r = await self._pool.fetchrow(
            "SELECT id, name, size, sha256, compression, encoding, encoding_error"
            " FROM files WHERE id = $1 AND complete",
            file_id,
        )
        return FileRef.model_validate(dict(r)) if r is not None else None

    async def read(self, file_id: uuid.UUID) -> AsyncIterator[bytes]:
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

    async def download(self, file_id: uuid.UUID, dest: Path) -> None:
        with dest.open("wb") as out:
            async for chunk in self.read(file_id):
                out.write(chunk)

    async def delete(self, file_id: uuid.UUID) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM files WHERE id = $1", file_id)


async def prune_files(pool: asyncpg.Pool, older_than_hours: float) -> tuple[int, int]:
    """Delete stored files no queued or running run needs: those whose runs all finished more
    than ``older_than_hours`` ago, and files of that age no run refers to (an upload whose run
    was never created). Returns (files, bytes) deleted."""
    record = await pool.fetchrow(
        "WITH doomed AS ("
        "  SELECT f.id, f.size FROM files f"
        "  WHERE f.created_at < now() - $1 * interval '1 hour'"
        "  AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.file_id = f.id"
        "    AND (r.status IN ('queued', 'running')"
        "         OR r.completed_at >= now() - $1 * interval '1 hour'))"
        "), gone AS (DELETE FROM files f USING doomed d WHERE f.id = d.id"
        "  RETURNING d.size)"
        " SELECT count(*) AS n, coalesce(sum(size), 0) AS bytes FROM gone",
        older_than_hours,
    )
    return int(record["n"]), int(record["bytes"])


async def iter_path(path: Path, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
    """A local file as an async stream of chunks, for ``FileStore.put``."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


async def iter_bytes(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
