"""Stored files on this machine's disk (``SLUICE_FILE_STORE=file:///DIRECTORY``): one file per
stored file, named by its id. The embedded stack's default, where the CLI, the API and the
workers share one disk; a cluster stores in PostgreSQL or S3 (``sluice.storage.filestore``).

A file is written as ``.<id>.part`` and renamed to ``<id>`` once its bytes are on disk (fsync of
the file, then of the directory), so a name without ``.part`` is always a whole file. The
``files`` row names the final path (``object_key``) from the start: pruning an upload that a
crash cut short removes both names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from sluice.errors import FileGone

READ_CHUNK_BYTES = 1 << 20
"""The most a read of a stored file yields at once (from its directory or an object store):
memory stays flat whatever the size."""


def stored_path(directory: Path, file_id: uuid.UUID) -> Path:
    return directory / str(file_id)


def _part_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


class LocalSink:
    """Writes a file's bytes to ``.<id>.part`` beside ``path``, and renames it to ``path`` when
    they are all on disk. Disk calls run in a thread: the API's event loop keeps serving while
    an upload is written and synced."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._part = _part_path(path)
        self._file: BinaryIO | None = None

    async def write(self, data: bytes) -> None:
        if self._file is None:
            self._file = await asyncio.to_thread(self._open)
        await asyncio.to_thread(self._file.write, data)

    def _open(self) -> BinaryIO:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        return self._part.open("wb")

    async def finish(self) -> None:
        await asyncio.to_thread(self._finish)

    def _finish(self) -> None:
        f = self._file if self._file is not None else self._open()  # an empty file
        self._file = None
        with f:
            f.flush()
            os.fsync(f.fileno())
        self._part.replace(self._path)
        _sync_directory(self._path.parent)

    async def abort(self) -> None:
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        remove_local(self._path)


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_local(path: Path) -> None:
    """Delete a stored file and what an upload cut short left of it; what is gone is no error."""
    path.unlink(missing_ok=True)
    _part_path(path).unlink(missing_ok=True)


def _gone(file_id: uuid.UUID, path: Path) -> FileGone:
    return FileGone(
        f"stored file {file_id} was kept on a local disk at {path} (SLUICE_FILE_STORE=file://"
        f"{path.parent}) and it is not there: it was deleted, or this process runs on another "
        "machine. Import the file again; when workers run on several machines, store files in "
        "PostgreSQL (SLUICE_FILE_STORE empty) or S3"
    )


async def read_local(
    file_id: uuid.UUID, path: Path, chunk_bytes: int = READ_CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """The stored file's bytes in chunks of ``chunk_bytes``; FileGone when it is not there."""
    try:
        f = await asyncio.to_thread(path.open, "rb")
    except FileNotFoundError:
        raise _gone(file_id, path) from None
    with f:
        while chunk := await asyncio.to_thread(f.read, chunk_bytes):
            yield chunk


async def copy_local(file_id: uuid.UUID, path: Path, dest: Path) -> None:
    """Put the stored file at ``dest``: a hard link when both are on one file system (no byte
    is copied, and the link keeps the bytes while a prune deletes the stored name), else a
    copy. FileGone when it is not there."""
    try:
        await asyncio.to_thread(_link_or_copy, path, dest)
    except FileNotFoundError:
        raise _gone(file_id, path) from None


def _link_or_copy(path: Path, dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(path, dest)
    except FileNotFoundError:
        raise
    except OSError:  # another file system, or links refused: copy
        shutil.copyfile(path, dest)
