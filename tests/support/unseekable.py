"""An upload stream that cannot seek, as a socket delivers it, for the parser tests."""

from __future__ import annotations

import io
from typing import Any


class Unseekable(io.RawIOBase):
    """`data` read once, at most `chunk` bytes per read, no seek."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self._data = io.BytesIO(data)
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        piece = self._data.read(min(len(buffer), self._chunk))
        buffer[: len(piece)] = piece
        return len(piece)
