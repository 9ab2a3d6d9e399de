"""Keys repeated inside one file: how many keys occur more than once, and how many rows lost to
another row of their key (the policy decides which row wins).

Every routed record's key is hashed (Python's 64-bit ``hash``; a false repeat needs two keys of
one file to share all 64 bits) into one of ``BUCKETS`` arrays by its low bits, so every repeat
of a key lands in one bucket. Beyond ``RUN`` hashes the buckets go out to temporary files, so
memory stays the same whatever the file's size, and each bucket is counted on its own at the
end. The hashes are salted per process, which does not matter: a split done again (after a
crash) reads the file from the start and counts again from nothing.
"""

from __future__ import annotations

import array
import collections
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from sluice.schemas.runs import DuplicatePolicy

RUN = 1 << 18
"""Hashes held in memory before the buckets go out to their files (2 MiB of them)."""
BUCKETS = 64
_LOW = BUCKETS - 1


@dataclass(frozen=True)
class Repeats:
    keys: int
    """distinct keys that occur in more than one row"""
    rows: int
    """rows that lost to another row of their key"""

    def to_json(self) -> dict[str, Any]:
        return {"keys": self.keys, "rows": self.rows}


def winner(policy: DuplicatePolicy, version_column: str | None) -> str:
    """Which row of a repeated key the table keeps, in words."""
    if policy is DuplicatePolicy.SKIP:
        return "the first row of each key (policy skip)"
    if policy is DuplicatePolicy.UPDATE_IF_NEWER:
        return (
            f"the row with the highest {version_column}, the first of them on a tie"
            " (policy update_if_newer)"
        )
    if policy is DuplicatePolicy.FAIL:
        return "the first row; the later ones were rejected (policy fail)"
    return "the last row of each key in the file (policy upsert)"


class RepeatCounter:
    """Counts repeated keys over a whole file in bounded memory (see the module's note)."""

    def __init__(self) -> None:
        self._files: list[IO[bytes]] = []
        self._empty()

    def _empty(self) -> None:
        self._arrays = [array.array("q") for _ in range(BUCKETS)]
        self._appends = [a.append for a in self._arrays]
        self._held = 0

    def add(self, keys: Iterable[str]) -> None:
        appends, low, held = self._appends, _LOW, 0
        for h in map(hash, keys):
            appends[h & low](h)
            held += 1
        self._held += held
        if self._held >= RUN:
            self._spill()

    def add_hashes(self, buckets: list[bytes]) -> None:
        """Add keys hashed elsewhere (the byte-range readers): per bucket, an array of "q"
        holding the 64-bit hashes whose low bits are the bucket's. Every key of one file must
        be hashed one way, this or ``add``'s."""
        held = 0
        for hashes, data in zip(self._arrays, buckets, strict=True):
            hashes.frombytes(data)
            held += len(data) // hashes.itemsize
        self._held += held
        if self._held >= RUN:
            self._spill()

    def count(self) -> Repeats:
        """The repeats of every key added so far; the counter is spent afterwards."""
        try:
            keys = rows = 0
            for i in range(BUCKETS):
                hashes = self._bucket(i)
                lost = len(hashes) - len(set(hashes))
                if lost:  # which keys repeat: a count per hash (without repeats, no need)
                    keys += sum(map((1).__lt__, collections.Counter(hashes).values()))
                rows += lost
            return Repeats(keys, rows)
        finally:
            self.close()

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._files = []
        self._empty()

    def _spill(self) -> None:
        if not self._files:
            self._files = [tempfile.TemporaryFile(prefix="sluice-keys-") for _ in range(BUCKETS)]
        for hashes, file in zip(self._arrays, self._files, strict=True):
            hashes.tofile(file)
            del hashes[:]
        self._held = 0

    def _bucket(self, i: int) -> array.array[int]:
        """Bucket ``i``'s hashes: those spilled to its file, then those still in memory."""
        held = self._arrays[i]
        if not self._files:
            return held
        file = self._files[i]
        size = file.tell()
        file.seek(0)
        hashes = array.array("q")
        hashes.fromfile(file, size // hashes.itemsize)
        hashes.extend(held)
        return hashes
