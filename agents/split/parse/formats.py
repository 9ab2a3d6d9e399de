"""Streaming parsers for uploaded files: delimited text, JSON Lines and JSON arrays, plain or gzip;
and, through :mod:`sluice.agents.split.parse.tabular`, XLSX workbooks and Parquet files.

Memory stays flat whatever the size of the file: the file is read in chunks, and one record
(a line, a CSV record, a JSON array element) may not exceed ``FormatOptions.max_record_bytes``.
Compressed files are held to ``max_decompressed_bytes`` and ``max_compression_ratio`` (bombs).
A problem with one record is reported as a :class:`RowProblem` and the file goes on; a problem
with the file as a whole raises :class:`FileFormatError`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal

import orjson

from sluice.errors import FileFormatError, UndecodableFile
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem, Sniffed, normalize_encoding

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "MAGIC_BYTES",
    "XLS_REFUSED",
    "EncodingSniffer",
    "FileFormatError",
    "FormatOptions",
    "ParsedFile",
    "ParsedRow",
    "RowProblem",
    "Sniffed",
    "UndecodableFile",
    "binary_format",
    "check_decompression",
    "open_decompressed",
    "parse_file",
    "refuse_duplicate_names",
]

_BOM = codecs.BOM_UTF8
_GZIP_MAGIC = b"\x1f\x8b"
# Binary formats are told by their first bytes, as stored (never compressed).
_ZIP_MAGIC = b"PK\x03\x04"
_PARQUET_MAGIC = b"PAR1"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
MAGIC_BYTES = len(_OLE_MAGIC)
XLS_REFUSED = (
    "the file is in Microsoft's old binary Office format: an Excel 97-2003 workbook (.xls), a "
    "password-protected workbook, or another Office document. Sluice cannot read it: open it "
    "in Excel and save it as .xlsx or CSV (without a password), then upload that"
)
_SPACE_BYTES = b" \t\r\n\x0b\x0c"
_DELIMITERS = (",", "\t", ";", "|")
_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
# Enough for format and delimiter detection; small next to any sane max_record_bytes.
_HEAD_BYTES = 64 * 1024
_READ_BYTES = 256 * 1024
_TEXT_CHUNK_CHARS = 64 * 1024  # measured best for csv over a TextIOWrapper
_JSON_CHUNK_BYTES = 256 * 1024
_RAW_TEXT_CHARS = 1000
_UTF8_FAMILY = ("utf-8", "utf-8-sig")
# A compression ratio is judged only past this much content: small files may compress very well.
_RATIO_FLOOR = 128 * 2**20
_FIX_ENCODING = (
    "Re-save the file as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)') and upload it again."
)
# Byte-order marks that prove a Unicode encoding whose text is not ASCII-compatible, longest
# first (a UTF-32 LE mark starts like a UTF-16 LE one). Such a file is read through a UTF-8
# transcoder, so every parser still sees UTF-8.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_WIDE_NAMES = {
    "utf-16": "UTF-16",
    "utf-16-le": "UTF-16 LE",
    "utf-16-be": "UTF-16 BE",
    "utf-32": "UTF-32",
    "utf-32-le": "UTF-32 LE",
    "utf-32-be": "UTF-32 BE",
}
_LONGEST_BOM = 4
# A tar archive is 512-byte blocks; a member's header has "ustar" at offset 257 (POSIX and GNU).
_TAR_BLOCK = 512
_TAR_MAGIC_AT = 257
_TAR_MAGIC = b"ustar"

# Bytes that no Windows-1252 text file contains: C0 controls other than tab/LF/CR (NUL
# included), and the five code points cp1252 leaves undefined.
_NOT_CP1252 = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x81\x8d\x8f\x90\x9d]")
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_JSON_SEPARATOR = re.compile(r"[ \t\r\n]*([,\]])")
# Tokens for delimiter detection: a quoted field is skipped whole (a doubled quote inside it
# reads as two adjacent quoted runs, which counts the same), a line break ends a record.
_SNIFF_TOKEN = re.compile(r'"[^"]*"|[,\t;|]|\r\n|\r|\n')
_LINE_BREAK = re.compile(rb"[\r\n]")


def _human(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"


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
            f"the file decompresses to more than {_human(max_decompressed_bytes)} "
            f"(the decompression limit, max_decompressed_bytes): it is either far larger than "
            f"expected or a compression bomb. Split it into smaller files, or raise the limit"
        )
    if decompressed > _RATIO_FLOOR and decompressed > max_compression_ratio * max(compressed, 1):
        raise FileFormatError(
            f"the file is a compression bomb or close to one: {_human(compressed)} of compressed "
            f"data decompressed to more than {_human(decompressed)}, over the decompression "
            f"limit of {max_compression_ratio}:1 (max_compression_ratio). {fix}, or raise the "
            f"limit if the data really is that repetitive"
        )


# ---------------------------------------------------------------------------------------------
# Encoding


class EncodingSniffer:
    """Decides the encoding of a whole file from its decompressed bytes, fed chunk by chunk.

    The answer is ``"utf-8-sig"`` (UTF-8 with a byte-order mark), ``"utf-8"``, or ``"cp1252"``
    only when the bytes prove it: they are not UTF-8, decode as Windows-1252, contain no
    control byte other than tab, CR and LF, and hold no multi-byte UTF-8 character before the
    first invalid byte (that is UTF-8 text, damaged or mixing encodings: read as Windows-1252,
    its accented letters would turn into mojibake). Anything else raises
    :class:`UndecodableFile`. A NUL byte is refused in UTF-8 too: it means UTF-16 or binary
    data, and PostgreSQL cannot store it.

    A UTF-16 or UTF-32 byte-order mark proves its encoding: the answer is then ``"utf-16-le"``,
    ``"utf-16-be"``, ``"utf-32-le"`` or ``"utf-32-be"`` when the whole file decodes so. A tar
    archive (``ustar`` at offset 257) is refused as one, with how to extract it; `compression`
    says whether the bytes fed were decompressed from gzip.
    """

    def __init__(self, *, compression: str = "none") -> None:
        self._compression = compression
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._size = 0
        # The first bytes of the file: a byte-order mark, a tar header.
        self._head = b""
        # Bytes held back until there are enough to tell whether a wide BOM starts the file.
        self._lead: bytes | None = b""
        self._wide: str | None = None
        self._wide_decoder: codecs.IncrementalDecoder | None = None
        self._wide_error: tuple[int, int] | None = None
        self._utf8_error: tuple[int, int] | None = None
        # A multi-byte UTF-8 character decoded before the first error: the file is UTF-8 that is
        # damaged or mixes encodings, not Windows-1252 text (which hardly ever forms one).
        self._utf8_seen: str | None = None
        self._cp1252_error: tuple[int, int] | None = None
        self._nul_at: int | None = None
        self._answer: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Add the next chunk of the file."""
        if self._answer is not None:
            raise RuntimeError("EncodingSniffer.feed() called after result()")
        if len(self._head) < _TAR_BLOCK:
            self._head += chunk[: _TAR_BLOCK - len(self._head)]
        if self._lead is not None:
            self._lead += chunk
            if len(self._lead) < _LONGEST_BOM:
                return
            chunk = self._start_reading()
        if self._wide_decoder is not None:
            self._feed_wide(chunk)
        else:
            self._feed_utf8(chunk)

    def _start_reading(self) -> bytes:
        """Decide from the first bytes whether the file is UTF-16 or UTF-32; returns them."""
        lead, self._lead = self._lead or b"", None
        for bom, name in _WIDE_BOMS:
            if lead.startswith(bom):
                self._wide = name
                self._wide_decoder = codecs.getincrementaldecoder(name)("strict")
                break
        return lead

    def _feed_wide(self, chunk: bytes) -> None:
        assert self._wide is not None and self._wide_decoder is not None
        end = self._size + len(chunk)
        self._size = end
        if self._wide_error is not None:
            return
        try:
            text = self._wide_decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            self._wide_error = self._locate(exc, end)
            return
        nul = text.find("\x00")
        if nul >= 0 and self._nul_at is None:
            # The decoder may hold back the start of a character: the text ends before it.
            held = len(self._wide_decoder.getstate()[0])
            self._nul_at = end - held - len(text[nul:].encode(self._wide))

    def _feed_utf8(self, chunk: bytes) -> None:
        if self._utf8_error is None:
            try:
                # Only validity matters, and whether a non-ASCII character came before the first
                # error (isascii() is O(1) on str). The incremental decoder carries a character
                # split between two chunks over to the next one.
                text = self._decoder.decode(chunk)
                if self._utf8_seen is None and not text.isascii():
                    self._utf8_seen = _first_non_ascii(text)
            except UnicodeDecodeError as exc:
                self._utf8_error = self._locate(exc, self._size + len(chunk))
                if self._utf8_seen is None:
                    before = exc.object[: exc.start]
                    if not before.isascii():
                        # Valid UTF-8 up to exc.start, minus a character cut at the front.
                        self._utf8_seen = _first_non_ascii(before.decode("utf-8", "ignore"))
        if self._cp1252_error is None:
            match = _NOT_CP1252.search(chunk)
            if match is not None:
                self._cp1252_error = (self._size + match.start(), chunk[match.start()])
        if self._nul_at is None and self._cp1252_error is not None:
            nul = chunk.find(b"\x00")
            if nul >= 0:
                self._nul_at = self._size + nul
        self._size += len(chunk)

    def result(self) -> str:
        """The encoding of everything fed; raises :class:`UndecodableFile` if there is none."""
        if self._answer is None:
            self._answer = self._decide(final=True)
        return self._answer

    @staticmethod
    def _locate(exc: UnicodeDecodeError, end: int) -> tuple[int, int]:
        # The decoder reports positions inside its own input, which may start with bytes kept
        # back from the previous chunk; `end` is the file offset where that input ends.
        return end - len(exc.object) + exc.start, exc.object[exc.start]

    def _decide(self, *, final: bool) -> str:
        if self._lead is not None:  # fewer bytes than the longest byte-order mark
            lead = self._start_reading()
            if self._wide_decoder is not None:
                self._feed_wide(lead)
            else:
                self._feed_utf8(lead)
        if self._wide is not None:
            return self._decide_wide(final=final)
        tar = _tar_refusal(self._head, self._compression)
        if tar is not None:
            raise UndecodableFile(tar)
        if final and self._utf8_error is None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                self._utf8_error = self._locate(exc, self._size)
        has_bom = self._head.startswith(_BOM)
        if self._utf8_error is None:
            if self._nul_at is not None:
                raise UndecodableFile(
                    f"the file contains a NUL byte (0x00) at byte offset {self._nul_at}: it is "
                    f"binary data or UTF-16 text, not a text file in UTF-8. {_FIX_ENCODING}"
                )
            return "utf-8-sig" if has_bom else "utf-8"
        offset, byte = self._utf8_error
        if self._utf8_seen is not None:
            raise UndecodableFile(
                f"the file is UTF-8 text (it holds {self._utf8_seen!r} encoded as UTF-8) but byte "
                f"0x{byte:02X} at byte offset {offset} is not valid UTF-8: the file is damaged or "
                f"mixes encodings, and reading it as Windows-1252 would garble every accented "
                f"character. {_FIX_ENCODING}"
            )
        if has_bom:
            raise UndecodableFile(
                f"the file starts with a UTF-8 byte-order mark but byte 0x{byte:02X} at byte "
                f"offset {offset} is not valid UTF-8: the file is damaged or mixes encodings. "
                f"{_FIX_ENCODING}"
            )
        if self._cp1252_error is None:
            return "cp1252"
        bad_offset, bad_byte = self._cp1252_error
        raise UndecodableFile(
            f"the file is not text in a supported encoding: byte 0x{byte:02X} at byte offset "
            f"{offset} is not valid UTF-8, and byte 0x{bad_byte:02X} at byte offset {bad_offset} "
            f"rules out Windows-1252. It may be a binary file (a spreadsheet, PDF or image) or "
            f"use another encoding. {_FIX_ENCODING}"
        )

    def _decide_wide(self, *, final: bool) -> str:
        assert self._wide is not None and self._wide_decoder is not None
        label = _WIDE_NAMES[self._wide]
        if final and self._wide_error is None:
            try:
                self._wide_decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                self._wide_error = self._locate(exc, self._size)
        if self._wide_error is not None:
            offset, byte = self._wide_error
            raise UndecodableFile(
                f"the file starts with a {label} byte-order mark but byte 0x{byte:02X} at byte "
                f"offset {offset} is not valid {label}: the file is damaged, cut short or mixes "
                f"encodings. {_FIX_ENCODING}"
            )
        if self._nul_at is not None:
            raise UndecodableFile(
                f"the file is {label} text with a NUL character (U+0000) at byte offset "
                f"{self._nul_at}, which PostgreSQL cannot store: remove it, or re-save the file "
                f"as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)'), and upload it again."
            )
        return self._wide


def _tar_refusal(head: bytes, compression: str) -> str | None:
    """Why the file is not text, when its first block is a tar member's header."""
    block = head[:_TAR_BLOCK]
    if block[_TAR_MAGIC_AT : _TAR_MAGIC_AT + len(_TAR_MAGIC)] != _TAR_MAGIC or b"\x00" not in block:
        return None
    name = block[:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\x00", 1)[0].decode("utf-8", "replace")  # POSIX ustar
    if prefix:
        name = f"{prefix}/{name}"
    if compression == "gzip":
        what, how = "a gzip-compressed tar archive (.tar.gz)", "tar -xzf FILE"
    else:
        what, how = "a tar archive (.tar)", "tar -xf FILE"
    member = f" whose first member is {name!r}" if name else ""
    return (
        f"the file is {what}{member}, not a data file: extract it ({how}, or any archive tool) "
        f"and import the file it holds"
    )


def _first_non_ascii(text: str) -> str:
    return next((c for c in text if not c.isascii()), "")


def _decode_error(exc: UnicodeDecodeError, end: int, encoding: str) -> UndecodableFile:
    """Turn a decoder error into a user-facing one; `end` is where the decoder input ends."""
    offset, byte = EncodingSniffer._locate(exc, end)
    return UndecodableFile(
        f"byte 0x{byte:02X} at byte offset {offset} is not valid {encoding} text. {_FIX_ENCODING}"
    )


# ---------------------------------------------------------------------------------------------
# Byte streams


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


class _Source(io.RawIOBase):
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
        magic = self._counter.peek(len(_GZIP_MAGIC))
        if compression == "auto":
            compression = "gzip" if magic == _GZIP_MAGIC else "none"
        elif compression == "gzip" and magic != _GZIP_MAGIC:
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
            raise _decode_error(exc, self._total, self._encoding) from exc
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
            f"a line near byte offset {near} is longer than the {_human(limit)} allowed for one "
            f"record: the file may have no line breaks, or a field holds a whole document. "
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
            return b"".join(iter(lambda: self.read(_READ_BYTES), b""))
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
    source = _Source(raw, compression, max_decompressed_bytes, max_compression_ratio)
    return io.BufferedReader(source, _READ_BYTES)


# ---------------------------------------------------------------------------------------------
# Parsing


class ParsedFile:
    """An uploaded file being read: what it is, its header, and its records (iterate once).

    `source` is the text source the records come from, or, for a reader that does not read
    through one (XLSX, Parquet), a function that says how far it got in bytes of the upload.
    """

    def __init__(
        self,
        sniffed: Sniffed,
        header: list[str] | None,
        rows: Iterator[ParsedRow | RowProblem],
        source: _Source | Callable[[], int],
    ) -> None:
        self.sniffed = sniffed
        self.header = header
        self._rows: Iterator[ParsedRow | RowProblem] | None = rows
        if isinstance(source, _Source):
            text_source = source
            self._progress: Callable[[], int] = lambda: text_source.compressed_bytes_read
        else:
            self._progress = source

    @property
    def bytes_read(self) -> int:
        """Bytes of the upload as stored (compressed, if it is) consumed so far."""
        return self._progress()

    def __iter__(self) -> Iterator[ParsedRow | RowProblem]:
        rows, self._rows = self._rows, None
        if rows is None:
            raise RuntimeError("a ParsedFile can be iterated only once: call parse_file again")
        return rows


def parse_file(
    raw: BinaryIO,
    options: FormatOptions = FormatOptions(),
    *,
    encoding: str | None = None,
) -> ParsedFile:
    """Start reading an uploaded file from its current position.

    XLSX workbooks and Parquet files are told by their first bytes, before anything else, and
    read by the tabular module. For text, `encoding` (else ``options.encoding``) is the encoding
    found when the file was stored. If neither is given, a seekable `raw` is read once
    through :class:`EncodingSniffer` and rewound; a stream that cannot seek is judged on its
    first 64 KiB. The header is read here, so header problems and an empty file raise at once;
    record problems come out of the iteration as :class:`RowProblem`.
    """
    magic, taken = _take_magic(raw)
    kind = binary_format(magic)
    if kind == "parquet" and raw.seekable() and _text_starting_with_par1(raw):
        kind = None  # a header "PAR1_ID,...", say
    if kind == "xls":
        raise FileFormatError(XLS_REFUSED)
    if options.format in ("xlsx", "parquet") or (kind is not None and options.format == "auto"):
        # The tabular module imports this one; loading it here also keeps openpyxl (and
        # pyarrow) out of the processes that only ever read text.
        from sluice.agents.split.parse.tabular import read_parquet, read_xlsx

        wanted = kind if options.format == "auto" else options.format
        if kind != wanted:
            raise FileFormatError(_NOT_BINARY[options.format])
        seekable = raw if raw.seekable() else _spooled(raw, taken)
        if wanted == "xlsx":
            return read_xlsx(seekable, options)
        return read_parquet(seekable, options)
    if kind is not None:
        if kind == "xlsx" and raw.seekable():
            from sluice.agents.split.parse.tabular import zip_archive_refusal

            refusal = zip_archive_refusal(raw)
            if refusal is not None:
                raise FileFormatError(refusal)
        what = "an XLSX workbook" if kind == "xlsx" else "a Parquet file"
        raise FileFormatError(
            f"the file is {what}, but this import reads {options.format} (format is set to "
            f"{options.format!r}): set format to 'auto' or {kind!r} to read it, or upload the "
            f"data as {options.format}"
        )

    chosen = encoding if encoding is not None else options.encoding
    if chosen is not None:
        chosen = normalize_encoding(chosen)
    elif raw.seekable():
        start = raw.tell()
        sniff_source = _Source(
            raw, options.compression, options.max_decompressed_bytes, options.max_compression_ratio
        )
        sniffer = EncodingSniffer(compression=sniff_source.compression)
        for chunk in iter(lambda: sniff_source.read(_READ_BYTES), b""):
            sniffer.feed(chunk)
        sniff_source.close()
        chosen = sniffer.result()
        raw.seek(start)

    source = _Source(
        raw,
        options.compression,
        options.max_decompressed_bytes,
        options.max_compression_ratio,
        head=taken,
    )
    if chosen in _WIDE_NAMES:
        source.transcode(chosen)
    head, at_end, content = _content_head(source)

    if chosen is None:
        sniffer = EncodingSniffer(compression=source.compression)
        sniffer.feed(head)
        # The head may end inside a character: judge what it holds, not how it ends.
        chosen = sniffer._decide(final=at_end)
        if chosen in _WIDE_NAMES:
            # Nothing was skipped: UTF-16 and UTF-32 text holds a NUL byte in any whitespace.
            source.transcode(chosen)
            head, at_end, content = _content_head(source)
    if head.startswith(_BOM) and chosen in _UTF8_FAMILY:
        source.skip(len(_BOM))
        head = head[len(_BOM) :]
    # The BOM is gone from the stream: decoding as plain UTF-8 is exact from here on. (UTF-16
    # and UTF-32 arrive transcoded to UTF-8.)
    decode_as = "utf-8" if chosen == "utf-8-sig" or chosen in _WIDE_NAMES else chosen

    fmt: Literal["csv", "jsonl", "json"]
    if options.format in ("csv", "jsonl", "json"):
        fmt = options.format
    elif content.startswith(b"["):
        fmt = "json"
    elif content.startswith(b"{"):
        fmt = "jsonl"
    else:
        fmt = "csv"

    if fmt == "json":
        sniffed = Sniffed("json", None, chosen, source.compression)
        reader = _JsonArrayReader(source, decode_as, options.max_record_bytes)
        return ParsedFile(sniffed, None, reader.rows(), source)
    source.limit_lines(options.max_record_bytes)
    if fmt == "jsonl":
        sniffed = Sniffed("jsonl", None, chosen, source.compression)
        return ParsedFile(sniffed, None, _jsonl_rows(source, decode_as), source)

    delimiter = options.delimiter
    if delimiter is None:
        delimiter = _detect_delimiter(head.decode(decode_as, errors="replace"), complete=at_end)
    sniffed = Sniffed("csv", delimiter, chosen, source.compression)
    text = io.TextIOWrapper(source, encoding=decode_as, errors="strict", newline="")
    # Fewer, larger reads from the Python-level source: the default is 8 KiB.
    text._CHUNK_SIZE = _TEXT_CHUNK_CHARS  # type: ignore[attr-defined]
    # The limit is global to the csv module; every parser sets its own before reading.
    csv.field_size_limit(options.max_record_bytes)
    # strict: a quote left open until the end of the file is an error, not a silent merge of
    # every line after it into one field.
    records = csv.reader(text, delimiter=delimiter, strict=True)
    header = _read_header(records, source, decode_as, delimiter)
    return ParsedFile(
        sniffed, header, _delimited_rows(records, len(header), source, decode_as), source
    )


def _content_head(source: _Source) -> tuple[bytes, bool, bytes]:
    """The head of the content (leading whitespace dropped), whether it is the whole file, and
    the head from its first character that is not a BOM or a space. An empty file raises."""
    head, at_end = source.peek_head(_HEAD_BYTES)
    content = head.removeprefix(_BOM).lstrip(_SPACE_BYTES)
    while not content and not at_end:
        # Leading whitespace carries nothing in any format: drop it, and keep only a bounded
        # head in memory.
        source.skip(len(head))
        head, at_end = source.peek_head(_HEAD_BYTES)
        content = head.lstrip(_SPACE_BYTES)
    if not content:
        raise FileFormatError(
            "the file is empty: it holds no data, only whitespace or nothing at all. "
            "Check that the right file was chosen and that it was saved before uploading"
        )
    return head, at_end, content


_NOT_BINARY = {
    "xlsx": (
        "format is set to 'xlsx' but the file is not an XLSX workbook: it does not start with "
        "the ZIP signature (50 4B 03 04). Upload the .xlsx file as Excel saved it (not "
        "compressed again), or set format to 'auto'"
    ),
    "parquet": (
        "format is set to 'parquet' but the file is not a Parquet file: it does not start with "
        "'PAR1'. Upload the .parquet file as it was written (not compressed again), or set "
        "format to 'auto'"
    ),
}


def binary_format(magic: bytes) -> Literal["xlsx", "parquet", "xls"] | None:
    """The binary format a file's first bytes (as stored) announce, None for anything else.

    ``"xls"`` is Microsoft's old binary Office format (OLE), which Sluice refuses.
    """
    if magic.startswith(_ZIP_MAGIC):
        return "xlsx"
    if magic.startswith(_PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(_OLE_MAGIC):
        return "xls"
    return None


def _text_starting_with_par1(raw: BinaryIO) -> bool:
    """True for text that starts with PAR1: a Parquet file also ends with PAR1, and its first
    page header holds control bytes. A damaged Parquet file (cut short) is still Parquet, to be
    refused as such. `raw` is left where it was."""
    start = raw.tell()
    try:
        head = raw.read(_HEAD_BYTES)
        raw.seek(-min(len(_PARQUET_MAGIC), len(head)), io.SEEK_END)
        ends_as_parquet = raw.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
        return not ends_as_parquet and _CONTROL_BYTE.search(head) is None
    finally:
        raw.seek(start)


def _take_magic(raw: BinaryIO) -> tuple[bytes, bytes]:
    """The first bytes of `raw`, and those of them that must be read again: none if `raw` can
    seek (it is rewound), all of them if it cannot."""
    if raw.seekable():
        start = raw.tell()
        magic = raw.read(MAGIC_BYTES)
        raw.seek(start)
        return magic, b""
    magic = b""
    while len(magic) < MAGIC_BYTES:
        data = raw.read(MAGIC_BYTES - len(magic))
        if not data:
            break
        magic += data
    return magic, magic


def _spooled(raw: BinaryIO, taken: bytes) -> BinaryIO:
    """A seekable copy of a stream that cannot seek: XLSX and Parquet are read from their end
    (the ZIP directory, the Parquet footer). The copy is deleted once it is closed."""
    spool = tempfile.TemporaryFile()
    spool.write(taken)
    shutil.copyfileobj(raw, spool, _READ_BYTES)
    spool.seek(0)
    return spool


def _detect_delimiter(sample: str, *, complete: bool) -> str:
    """The likeliest delimiter: the one found the same non-zero number of times on every line."""
    records: list[dict[str, int]] = []
    current: dict[str, int] = {}
    line_start = 0
    for match in _SNIFF_TOKEN.finditer(sample):
        token = match.group()
        if token in _DELIMITER_NAMES:
            current[token] = current.get(token, 0) + 1
        elif token[0] in "\r\n":
            if match.start() > line_start:  # blank lines say nothing
                records.append(current)
            current = {}
            line_start = match.end()
            if len(records) >= 100:
                break
    else:
        # The last line counts only if the sample is the whole file: otherwise it is cut short.
        if (complete or not records) and sample[line_start:].strip():
            records.append(current)
    if not records:
        return ","
    best, best_score = ",", (0, 0.0, 0, 0)
    for order, delimiter in enumerate(reversed(_DELIMITERS)):
        per_line = [record.get(delimiter, 0) for record in records]
        in_header = per_line[0]
        if in_header == 0:
            continue
        agreeing = sum(1 for count in per_line if count == in_header) / len(per_line)
        score = (int(agreeing == 1.0), agreeing, in_header, order)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _read_header(
    records: Iterator[list[str]], source: _Source, encoding: str, delimiter: str
) -> list[str]:
    try:
        first = next((record for record in records if record), None)
    except UnicodeDecodeError as exc:
        raise _decode_error(exc, source.position, encoding) from exc
    except csv.Error as exc:
        raise _csv_file_error(exc, 0, getattr(records, "line_num", 0)) from exc
    if first is None:
        raise FileFormatError(
            "the file is empty: it has no header row. The first line must name the columns"
        )
    header = [name.strip() for name in first]
    header[0] = header[0].lstrip("\ufeff").strip()
    empty = [str(index) for index, name in enumerate(header, 1) if not name]
    if empty:
        separator = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
        raise FileFormatError(
            f"the header row (the first line) has columns without a name: column "
            f"{', '.join(empty)} of {len(header)} ({separator}-separated). Name every column "
            f"or delete the empty ones; a {separator} at the end of the line also makes one"
        )
    refuse_duplicate_names(header, "the first line")
    return header


def refuse_duplicate_names(
    header: list[str], where: str, label: Callable[[int], str] = str
) -> None:
    """Raise :class:`FileFormatError` if `header` names a column more than once: the mapping
    from names to fields would be ambiguous. `where` says where the header is; `label` names a
    column by its 1-based position (a number, or a spreadsheet's column letter)."""
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header, 1):
        positions.setdefault(name, []).append(index)
    duplicates = [
        f"{name!r} (columns {', '.join(map(label, at))})"
        for name, at in positions.items()
        if len(at) > 1
    ]
    if duplicates:
        raise FileFormatError(
            f"the header row ({where}) names a column more than once: "
            f"{'; '.join(duplicates)}. Rename the columns so each name is unique"
        )


def _delimited_rows(
    records: Iterator[list[str]], width: int, source: _Source, encoding: str
) -> Iterator[ParsedRow | RowProblem]:
    number = 0
    while True:
        try:
            # The hot loop of the whole importer: one length check per record, nothing more.
            for record in records:
                if len(record) == width:
                    number += 1
                    yield ParsedRow(number, record)
                elif record:  # a blank line reads as [] and is not a record
                    number += 1
                    line = getattr(records, "line_num", 0)
                    yield RowProblem(
                        number,
                        record,
                        f"expected {width} fields as in the header, found {len(record)} "
                        f"(record ending on line {line})",
                    )
            return
        except UnicodeDecodeError as exc:
            raise _decode_error(exc, source.position, encoding) from exc
        except csv.Error as exc:
            line = getattr(records, "line_num", 0)
            if "expected after" not in str(exc):
                raise _csv_file_error(exc, number + 1, line) from exc
            # A closing quote followed by more text: the reader drops the rest of that line
            # and goes on with the next one.
            number += 1
            yield RowProblem(
                number,
                None,
                f"a quoted field is followed by other text before the next delimiter on line "
                f"{line}: {exc}. Quote the whole field, and double any quote inside it",
            )


def _csv_file_error(exc: csv.Error, number: int, line: int) -> FileFormatError:
    """`number` is the data record being read, 0 for the header."""
    record = f"data record {number}" if number else "the header row"
    if "end of data" in str(exc):
        what = (
            f"a quote opened in {record} is never closed, so everything up to the end of the "
            f"file (line {line}) would be one field"
        )
    elif "field limit" in str(exc):
        what = (
            f"a field of {record} (at line {line}) is longer than max_record_bytes; usually a "
            f"quote is opened and never closed, so the field runs on"
        )
    else:
        what = f"{record} (at line {line}) cannot be read: {exc}"
    return FileFormatError(
        f"the file cannot be read as delimited text: {what}. Fix the quoting there and upload "
        f"the file again"
    )


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _line_text(line: bytes, encoding: str) -> str:
    return line.decode(encoding, errors="replace").rstrip("\r\n")[:_RAW_TEXT_CHARS]


def _jsonl_rows(source: _Source, encoding: str) -> Iterator[ParsedRow | RowProblem]:
    lines = io.BufferedReader(source, _READ_BYTES)
    offset = source.position
    number = 0
    utf8 = encoding == "utf-8"
    loads = orjson.loads
    for line in lines:
        start = offset
        offset += len(line)
        try:
            # orjson reads UTF-8 bytes directly and checks them; other encodings go through str.
            value = loads(line if utf8 else line.decode(encoding))
        except UnicodeDecodeError as exc:
            raise _decode_error(exc, start + len(line), encoding) from exc
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                continue
            if utf8:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as decode_exc:
                    raise _decode_error(decode_exc, start + len(line), encoding) from decode_exc
            number += 1
            yield RowProblem(number, _line_text(line, encoding), f"not valid JSON: {exc}")
            continue
        number += 1
        if isinstance(value, dict):
            yield ParsedRow(number, value)
        else:
            yield RowProblem(
                number,
                _line_text(line, encoding),
                f"expected a JSON object ({{...}}) on each line, found {_kind(value)}",
            )


class _JsonArrayReader:
    """Streams the elements of a top-level JSON array through a bounded text buffer.

    Parsing is orjson's: elements are cut out in batches at a '}' followed by ',' or ']', and
    ``[`` + batch + ``]`` is parsed as one array. That parse succeeds only if the cut falls
    between two top-level elements (a cut inside a string or a nested value leaves it
    unbalanced), so a failed batch simply falls back to one element at a time, which also finds
    the exact place of a syntax error.
    """

    def __init__(self, source: _Source, encoding: str, max_record_bytes: int) -> None:
        self._source = source
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)("strict")
        self._max_record = max_record_bytes
        self._buf = ""
        self._pos = 0
        self._base = source.position  # byte offset of _buf[0] in the file
        self._eof = False
        self._number = 0
        # Elements before this index of _buf are read one by one, after a batch failed there.
        self._batch_from = 0

    def _fill(self) -> None:
        data = self._source.read(_JSON_CHUNK_BYTES)
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise _decode_error(exc, self._source.position, self._encoding) from exc
        self._eof = not data
        self._base += self._byte_length(self._buf[: self._pos])
        self._buf = self._buf[self._pos :] + text
        self._batch_from -= self._pos
        self._pos = 0

    def _byte_length(self, text: str) -> int:
        if self._encoding == "utf-8":
            # isascii() is O(1) on str: the common case costs nothing.
            return len(text) if text.isascii() else len(text.encode("utf-8"))
        return len(text.encode(self._encoding, errors="replace"))

    def _error(self, what: str, index: int) -> FileFormatError:
        offset = self._base + self._byte_length(self._buf[:index])
        return FileFormatError(
            f"the JSON file is invalid at byte offset {offset}: {what}. A .json upload must be "
            f"one array of objects ([{{...}}, {{...}}]); fix the file there and upload it again"
        )

    def _skip_space(self) -> bool:
        """Move to the next non-space character; False at the end of the file."""
        while True:
            match = _JSON_SPACE.match(self._buf, self._pos)
            self._pos = match.end() if match else self._pos
            if self._pos < len(self._buf):
                return True
            if self._eof:
                return False
            self._fill()

    def _emit(self, value: Any) -> ParsedRow | RowProblem:
        self._number += 1
        if isinstance(value, dict):
            return ParsedRow(self._number, value)
        return RowProblem(
            self._number,
            value,
            f"expected each element of the array to be an object, found {_kind(value)}",
        )

    def rows(self) -> Iterator[ParsedRow | RowProblem]:
        if not self._skip_space():
            raise self._error("the file has no content", self._pos)
        if self._buf[self._pos] != "[":
            hint = (
                " (for one object per line, use the JSON Lines format)"
                if self._buf[self._pos] == "{"
                else ""
            )
            raise self._error(
                f"expected '[' to open the array, found {self._buf[self._pos]!r}{hint}", self._pos
            )
        self._pos += 1
        if not self._skip_space():
            raise self._error("the file ends before the array is closed with ']'", self._pos)
        closed = self._buf[self._pos] == "]"
        if closed:
            self._pos += 1
        while not closed:
            if not self._eof and len(self._buf) - self._pos < _JSON_CHUNK_BYTES:
                self._fill()
            if not self._skip_space():
                raise self._error("the file ends before the array is closed with ']'", self._pos)
            if self._pos >= self._batch_from:
                batch = self._batch()
                if batch is not None:
                    values, closed = batch
                    for value in values:
                        yield self._emit(value)
                    continue
            value, closed = self._one()
            yield self._emit(value)
        if self._skip_space():
            raise self._error(
                f"unexpected {self._buf[self._pos]!r} after the closing ']' of the array",
                self._pos,
            )

    def _batch(self) -> tuple[list[Any], bool] | None:
        """Parse the buffered elements from _pos in one go; None if no cut point works."""
        buf, start = self._buf, self._pos
        # Within max_record_bytes of the start, every element of a batch is small enough.
        end = min(len(buf), start + self._max_record)
        first_failure = -1
        for _ in range(8):
            cut = buf.rfind("}", start, end)
            if cut >= 0:
                separator = _JSON_SEPARATOR.match(buf, cut + 1)
                if separator is None:  # the end of a nested object
                    end = cut
                    continue
                stop, resume, closed = cut + 1, separator.end(), separator.group(1) == "]"
                end = cut
            else:
                # No object ahead (the array holds scalars or arrays): cut at a comma.
                comma = buf.rfind(",", start, end)
                if comma < 0:
                    self._batch_from = max(end, start + 1)
                    return None
                stop, resume, closed = comma, comma + 1, False
                end = comma
            try:
                values = orjson.loads("[" + buf[start:stop] + "]")
            except orjson.JSONDecodeError:
                # The cut fell inside a string or a nested value (or the data is invalid): try
                # one cut further back, then go element by element up to the first failure.
                if first_failure >= 0:
                    self._batch_from = first_failure
                    return None
                first_failure = stop
                continue
            self._pos = resume
            return values, closed
        self._batch_from = first_failure if first_failure >= 0 else start + 1
        return None

    def _one(self) -> tuple[Any, bool]:
        """Read one element at _pos, and the ',' or ']' after it."""
        window = 1024
        while True:
            available = len(self._buf) - self._pos
            text = self._buf[self._pos : self._pos + min(window, available)]
            more_in_buffer = window < available
            try:
                orjson.loads(text)
                # A whole value with nothing after it: the separator is further on.
                stop = len(text)
            except orjson.JSONDecodeError as exc:
                stop = exc.pos
                if stop < len(text):
                    try:
                        value = orjson.loads(text[:stop])
                    except orjson.JSONDecodeError:
                        raise self._error(exc.msg, self._pos + stop) from None
                    separator = text[stop]
                    if separator not in ",]":
                        raise self._error(
                            f"expected ',' or ']' after an element, found {separator!r}",
                            self._pos + stop,
                        ) from None
                    self._pos += stop + 1
                    return value, separator == "]"
            # The element goes on past what was parsed.
            if len(text) > self._max_record:
                raise self._error(
                    f"one element of the array is larger than the {_human(self._max_record)} "
                    f"allowed for a record; split it, or raise max_record_bytes",
                    self._pos,
                )
            if more_in_buffer:
                window *= 2
            elif not self._eof:
                self._fill()
                window = max(window, 2 * len(text))
            else:
                raise self._error(
                    "the file ends before the array is closed with ']'", self._pos + stop
                )
