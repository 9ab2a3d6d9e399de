"""An upload's bytes as the parsers read them: decompressed (gzip) under the size and ratio
limits that stop compression bombs, each physical line held to the record size, and UTF-16 or
UTF-32 text transcoded to UTF-8."""

from __future__ import annotations

import codecs
import gzip
import io
import re
import zlib
from typing import IO, TYPE_CHECKING, BinaryIO, Literal

from sluice.agents.split.parse.encoding import decode_error
from sluice.agents.split.parse.parsed import human_size
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

GZIP_MAGIC = b"\x1f\x8b"
READ_BYTES = 256 * 1024
# A compression ratio is judged only past this much content: small files may compress very well.
_RATIO_FLOOR = 128 * 2**20
_LINE_BREAK = re.compile(rb"[\r\n]")


def check_decompression(
    decompressed: int,
    compressed: int,
    *,
    max_decompressed_bytes: int = FormatOptions.max_decompressed_bytes,
    max_compression_ratio: int = FormatOptions.max_compression_ratio,
    fix: str = "Upload it uncompressed",
) -> None:
    """Raise :class:`FileFormatError` when `decompressed` bytes of content, read from the first
    `compressed` bytes of a compressed file, pass the size limit or look like a compression bomb.
    `fix` tells how to send the same data without the compression.
    """
    if decompressed > max_decompressed_bytes:
        raise FileFormatError(
            f"the file decompresses to more than {human_size(max_decompressed_bytes)} "
            f"(the decompression limit, max_decompressed_bytes): it is either far larger than "
            f"expected or a compression bomb. Split it into smaller files, or raise the limit"
        )
    if decompressed > _RATIO_FLOOR and decompressed > max_compression_ratio * max(compressed, 1):
        raise FileFormatError(
            f"the file is a compression bomb or close to one: {human_size(compressed)} of "
            f"compressed data decompressed to more than {human_size(decompressed)}, over the "
            f"decompression limit of {max_compression_ratio}:1 (max_compression_ratio). {fix}, "
            f"or raise the limit if the data really is that repetitive"
        )


class _CountingReader:
    """The upload as stored (maybe compressed): counts bytes consumed, for progress."""

    def __init__(self, raw: IO[bytes], head: bytes = b"") -> None:
        # `head`: bytes already taken from `raw` (to tell its format), read again first.
        self._raw = raw
        self._pushback = head
        self.count = len(head)

    def peek(self, size: int) -> bytes:
        """Up to `size` first bytes, left in place for the next read."""
        while len(self._pushback) < size:
            data = self._raw.read(size - len(self._pushback))
            if not data:
                break
            self.count += len(data)
            self._pushback += data
        return self._pushback[:size]

    def read(self, size: int = -1) -> bytes:
        if self._pushback:
            if size < 0 or size >= len(self._pushback):
                data, self._pushback = self._pushback, b""
            else:
                data, self._pushback = self._pushback[:size], self._pushback[size:]
            return data
        data = self._raw.read(size) or b""
        self.count += len(data)
        return data

    def seek(self, offset: int, /) -> int:
        # GzipFile only seeks to rewind, which parsing never does.
        raise io.UnsupportedOperation("an upload is read once, from start to end")


class UploadSource(io.RawIOBase):
    """Decompressed bytes of an upload, with the size guards and a put-back head.

    Guards: the total decompressed size (gzip bombs), and, once `limit_lines` is called, the
    length of a physical line, so a huge line fails before it is assembled in memory. Once
    `transcode` is called, the bytes delivered are the file's UTF-16 or UTF-32 text as UTF-8.
    """

    def __init__(
        self,
        raw: IO[bytes],
        compression: Literal["auto", "gzip", "none"],
        max_decompressed_bytes: int,
        max_compression_ratio: int = FormatOptions.max_compression_ratio,
        head: bytes = b"",
    ) -> None:
        super().__init__()
        self._counter = _CountingReader(raw, head)
        magic = self._counter.peek(len(GZIP_MAGIC))
        if compression == "auto":
            compression = "gzip" if magic == GZIP_MAGIC else "none"
        elif compression == "gzip" and magic != GZIP_MAGIC:
            raise FileFormatError(
                "compression is set to gzip but the file does not start with the gzip "
                "signature (1f 8b): upload the .gz file as it is, or set compression to 'none'"
            )
        self.compression: Literal["gzip", "none"] = compression
        self._inner: _CountingReader | gzip.GzipFile = (
            gzip.GzipFile(fileobj=self._counter, mode="rb")
            if compression == "gzip"
            else self._counter
        )
        self._max_total = max_decompressed_bytes
        self._max_ratio = max_compression_ratio
        self._total = 0  # decompressed bytes read from _inner
        self._pending = b""  # read ahead, to be delivered again
        self.position = 0  # decompressed bytes delivered to the consumer
        self._line_limit: int | None = None
        self._run = 0  # bytes since the last line break read from _inner
        self._eof = False
        self._transcoder: codecs.IncrementalDecoder | None = None
        self._encoding = ""
        self._at_start = True  # the transcoder has not delivered text yet (a BOM to drop)

    @property
    def compressed_bytes_read(self) -> int:
        return self._counter.count

    @property
    def name(self) -> str:
        return "<upload>"

    def readable(self) -> bool:
        return True

    def peek_head(self, size: int) -> tuple[bytes, bool]:
        """Up to `size` next bytes (left in place) and whether they reach the end of the file."""
        while len(self._pending) < size and not self._eof:
            self._pending += self._read_inner(size - len(self._pending))
        return self._pending[:size], self._eof and len(self._pending) <= size

    def skip(self, size: int) -> None:
        """Drop `size` bytes that `peek_head` returned."""
        self._pending = self._pending[size:]
        self.position += size

    def transcode(self, encoding: str) -> None:
        """From now on, read the content as `encoding` (UTF-16 or UTF-32) and deliver it as
        UTF-8, without the byte-order mark. Only before anything was delivered."""
        assert self.position == 0, "transcode() after bytes were delivered"
        self._transcoder = codecs.getincrementaldecoder(encoding)("strict")
        self._encoding = encoding
        raw, self._pending = self._pending, b""
        self._pending = self._as_utf8(raw, final=self._eof)

    def _as_utf8(self, raw: bytes, *, final: bool) -> bytes:
        assert self._transcoder is not None
        try:
            text = self._transcoder.decode(raw, final=final)
        except UnicodeDecodeError as exc:
            raise decode_error(exc, self._total, self._encoding) from exc
        if self._at_start and text:
            self._at_start = False
            text = text.removeprefix("\ufeff")
        return text.encode("utf-8")

    def limit_lines(self, limit: int) -> None:
        """From now on, fail on a physical line (CR or LF ended) longer than `limit` bytes."""
        self._line_limit = limit
        # Lines that were read ahead for detection are checked here, once.
        start = self.position
        for line in _LINE_BREAK.split(self._pending):
            if len(line) > limit:
                self._line_too_long(start)
            start += len(line) + 1
        if self._run > limit:
            self._line_too_long(self._total - self._run)

    def _line_too_long(self, near: int) -> None:
        limit = self._line_limit or 0
        raise FileFormatError(
            f"a line near byte offset {near} is longer than the {human_size(limit)} allowed for "
            f"one record: the file may have no line breaks, or a field holds a whole document. "
            f"Split the record, or raise max_record_bytes"
        )

    def _read_inner(self, size: int) -> bytes:
        if self._line_limit is not None:
            # A line wholly inside one read would escape the run check below: keep reads shorter
            # than the limit (transcoded to UTF-8, a read may grow up to 1.5 times).
            size = min(size, self._line_limit // 2 if self._transcoder else self._line_limit)
        try:
            data = self._inner.read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise FileFormatError(
                f"the gzip data is damaged or cut short (after {self._counter.count} compressed "
                f"bytes, {self._total} bytes of content): {exc}. Compress the file again, or "
                f"upload it uncompressed"
            ) from exc
        if not data:
            self._eof = True
            if self._transcoder is not None:
                self._as_utf8(b"", final=True)  # a character cut off at the end fails here
            return data
        self._total += len(data)
        if self.compression == "gzip" or self._total > self._max_total:
            check_decompression(
                self._total,
                self._counter.count,
                max_decompressed_bytes=self._max_total,
                max_compression_ratio=self._max_ratio,
            )
        if self._transcoder is not None:
            data = self._as_utf8(data, final=False)
            if not data:  # half a character: read on (an empty read means the end)
                return self._read_inner(size)
        # Line breaks are LF, CRLF or a lone CR. Each search for CR stops at the nearest LF, so
        # a chunk is scanned about once, not four times.
        lf = data.rfind(b"\n")
        last = max(lf, data.rfind(b"\r", lf + 1))
        if last < 0:
            self._run += len(data)
        else:
            lf = data.find(b"\n")
            cr = data.find(b"\r", 0, lf if lf >= 0 else len(data))
            first = lf if cr < 0 else cr
            if self._line_limit is not None and self._run + first > self._line_limit:
                self._line_too_long(self._total - len(data) - self._run)
            self._run = len(data) - last - 1
        if self._line_limit is not None and self._run > self._line_limit:
            self._line_too_long(self._total - self._run)
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_BYTES), b""))
        if self._pending:
            data = self._pending[:size]
            self._pending = self._pending[size:]
        else:
            data = b"" if self._eof else self._read_inner(size)
            if len(data) > size:  # transcoded text can be longer than the bytes it came from
                data, self._pending = data[:size], data[size:]
        self.position += len(data)
        return data

    read1 = read

    def close(self) -> None:
        # getattr: IOBase also closes on garbage collection, even after a failed __init__.
        inner = getattr(self, "_inner", None)
        if isinstance(inner, gzip.GzipFile):
            inner.close()  # leaves the caller's file open
        super().close()

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def open_decompressed(
    raw: BinaryIO,
    compression: Literal["auto", "gzip", "none"] = "auto",
    *,
    max_decompressed_bytes: int = FormatOptions.max_decompressed_bytes,
    max_compression_ratio: int = FormatOptions.max_compression_ratio,
) -> BinaryIO:
    """The decompressed content of `raw`, read lazily.

    With ``"auto"``, gzip is recognized by its signature (1f 8b). Reading past
    `max_decompressed_bytes`, or at a compression ratio over `max_compression_ratio`, raises
    :class:`FileFormatError`, and so does damaged gzip data.
    """
    source = UploadSource(raw, compression, max_decompressed_bytes, max_compression_ratio)
    return io.BufferedReader(source, READ_BYTES)
