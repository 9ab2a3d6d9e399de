"""Text encodings: which one a whole file is in (:class:`EncodingSniffer`: UTF-8 with or without
a byte-order mark, Windows-1252 only when the bytes prove it, UTF-16 and UTF-32 by their
byte-order mark), and a decoder's error as a message that says what to fix."""

from __future__ import annotations

import codecs
import re

from sluice.agents.split.parse.archives import TAR_BLOCK, tar_refusal
from sluice.errors import UndecodableFile

UTF8_BOM = codecs.BOM_UTF8
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
# The encodings read through that transcoder, as messages name them.
WIDE_ENCODINGS = {
    "utf-16": "UTF-16",
    "utf-16-le": "UTF-16 LE",
    "utf-16-be": "UTF-16 BE",
    "utf-32": "UTF-32",
    "utf-32-le": "UTF-32 LE",
    "utf-32-be": "UTF-32 BE",
}
_LONGEST_BOM = 4
# Bytes that no Windows-1252 text file contains: C0 controls other than tab/LF/CR (NUL
# included), and the five code points cp1252 leaves undefined.
_NOT_CP1252 = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x81\x8d\x8f\x90\x9d]")
_NOT_CP1252_BYTES = bytes(b for b in range(256) if _NOT_CP1252.match(bytes([b])))


def _holds_not_cp1252(chunk: bytes) -> bool:
    """Whether ``chunk`` holds a byte of ``_NOT_CP1252``: deleting them all is six times faster
    than searching for one (0.1 against 0.7 CPU-s for 160 MB), so the search that finds where
    runs only on a chunk that holds one."""
    return len(chunk.translate(None, _NOT_CP1252_BYTES)) != len(chunk)


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
        if len(self._head) < TAR_BLOCK:
            self._head += chunk[: TAR_BLOCK - len(self._head)]
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
        # An ASCII chunk is UTF-8 unless the chunk before ended inside a character (the
        # decoder holds its first bytes back): isascii is four times faster than decoding it.
        if self._utf8_error is None and not (chunk.isascii() and not self._decoder.getstate()[0]):
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
        if self._cp1252_error is None and _holds_not_cp1252(chunk):
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
            self._answer = self.decide(final=True)
        return self._answer

    @staticmethod
    def _locate(exc: UnicodeDecodeError, end: int) -> tuple[int, int]:
        # The decoder reports positions inside its own input, which may start with bytes kept
        # back from the previous chunk; `end` is the file offset where that input ends.
        return end - len(exc.object) + exc.start, exc.object[exc.start]

    def decide(self, *, final: bool) -> str:
        """The encoding of what was fed so far, as :meth:`result`; unless `final`, the bytes fed
        may end inside a character (the head of a file): judge what they hold, not how they
        end."""
        if self._lead is not None:  # fewer bytes than the longest byte-order mark
            lead = self._start_reading()
            if self._wide_decoder is not None:
                self._feed_wide(lead)
            else:
                self._feed_utf8(lead)
        if self._wide is not None:
            return self._decide_wide(final=final)
        tar = tar_refusal(self._head, self._compression)
        if tar is not None:
            raise UndecodableFile(tar)
        if final and self._utf8_error is None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                self._utf8_error = self._locate(exc, self._size)
        has_bom = self._head.startswith(UTF8_BOM)
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
        label = WIDE_ENCODINGS[self._wide]
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


def _first_non_ascii(text: str) -> str:
    return next((c for c in text if not c.isascii()), "")


def decode_error(exc: UnicodeDecodeError, end: int, encoding: str) -> UndecodableFile:
    """Turn a decoder error into a user-facing one; `end` is where the decoder input ends."""
    offset, byte = EncodingSniffer._locate(exc, end)
    return UndecodableFile(
        f"byte 0x{byte:02X} at byte offset {offset} is not valid {encoding} text. {_FIX_ENCODING}"
    )
