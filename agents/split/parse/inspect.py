"""The single pass over a file as it is stored: its size and sha256, its compression, and
its text encoding (or why it has none), decided before anything is split."""

from __future__ import annotations

import hashlib
import zlib

from sluice.agents.split.parse.decompress import GZIP_MAGIC, check_decompression
from sluice.agents.split.parse.encoding import EncodingSniffer
from sluice.agents.split.parse.sniff import MAGIC_BYTES, XLS_REFUSED, binary_format
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions


class Inspector:
    """Hashes the stored bytes and decides compression and text encoding in the same single pass.

    A file whose first bytes announce an XLSX workbook or a Parquet file is not text: it gets no
    encoding and no error (it is read as what it is when it is split). An old binary Office
    file (.xls) gets the reason it cannot be read as its error.
    """

    def __init__(
        self,
        max_decompressed: int = FormatOptions.max_decompressed_bytes,
        max_ratio: int = FormatOptions.max_compression_ratio,
    ) -> None:
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

    def sha256(self) -> str:
        return self.sha.hexdigest()
