"""Files on a disk the workers share, confined to the roots of ``SLUICE_FILE_ROOTS``.

A trigger names the path, so the path is untrusted: ``..``, absolute paths elsewhere and
symlinks that lead out of the roots are refused after resolving them, not by looking at text.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from sluice.agents.fetch.base import Fetched
from sluice.errors import SourceError, SourceUnavailable

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024

# The final component is already resolved: if it is a symlink or a FIFO when opened, it was
# swapped since confine() looked, and must not be followed or block the worker.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def confine(path: str, roots: Sequence[Path]) -> Path:
    """The real path of the regular file ``path``, which must lie inside one of ``roots``.

    A relative ``path`` is taken relative to the first root. SourceError says what is wrong:
    no roots, a NUL, outside the roots (after ``..`` and symlinks), missing, not a file."""
    if not roots:
        raise SourceError(
            "no file roots are configured: set SLUICE_FILE_ROOTS to the folders the workers "
            "may import files from"
        )
    if "\0" in path:
        raise SourceError(f"the path {path!r} contains a NUL character")
    if not path:
        raise SourceError("the path is empty: name a file inside the file roots")
    allowed = [root.resolve() for root in roots]
    shown = ", ".join(str(root) for root in allowed)
    candidate = Path(path) if os.path.isabs(path) else roots[0] / path

    # Containment is checked before existence, so that nobody can probe which files exist
    # outside the roots.
    try:
        loose = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise SourceError(f"the path {path!r} cannot be resolved: {exc}") from exc
    if not any(loose.is_relative_to(root) for root in allowed):
        raise SourceError(_outside(path, shown))
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise SourceError(f"the file {path!r} does not exist (file roots: {shown})") from None
    except (OSError, RuntimeError) as exc:
        raise SourceError(f"the path {path!r} cannot be resolved: {exc}") from exc
    if not any(real.is_relative_to(root) for root in allowed):
        raise SourceError(_outside(path, shown))  # changed since the first look
    try:
        mode = real.stat().st_mode
    except OSError as exc:
        raise SourceError(f"cannot read {path!r}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise SourceError(f"{path!r} is {what}: name a file inside the file roots")
    return real


def _outside(path: str, shown: str) -> str:
    return (
        f"the path {path!r} is outside the allowed file roots ({shown}): '..' and symlinks "
        "may not lead out of them; name a file inside one of the roots of SLUICE_FILE_ROOTS"
    )


@asynccontextmanager
async def open_path(path: str, roots: Sequence[Path]) -> AsyncIterator[Fetched]:
    """Stream the file ``path`` (confined to ``roots``) in chunks of ``CHUNK_BYTES`` bytes;
    ``location`` is its resolved path."""
    real = await asyncio.to_thread(confine, path, roots)
    # One thread per file runs the open, the reads and the close in order: a read left running
    # by a cancelled task can then never hit a closed, or reused, descriptor.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-file")
    try:
        opening = executor.submit(_open, real, path)
        try:
            fd = await asyncio.wrap_future(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        logger.info("reading %s", real)
        chunks = _chunks(executor, fd, real)
        try:
            yield Fetched(name=real.name, chunks=chunks, location=str(real))
        finally:
            await chunks.aclose()
            executor.submit(os.close, fd)
    finally:
        executor.shutdown(wait=False)


def _open(real: Path, path: str) -> int:
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except PermissionError as exc:
        raise SourceError(f"the workers may not read {path!r}: permission denied") from exc
    except OSError as exc:
        raise SourceError(f"cannot open {path!r}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_opened(opening: Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


async def _chunks(executor: ThreadPoolExecutor, fd: int, real: Path) -> AsyncGenerator[bytes, None]:
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(executor, os.read, fd, CHUNK_BYTES)
        except OSError as exc:  # a shared disk that went away may come back
            raise SourceUnavailable(f"reading {real} failed: {exc.strerror}") from exc
        if not chunk:
            return
        yield chunk
