"""Text files: the encoding (the one found when the file was stored, or sniffed), UTF-16 and
UTF-32 transcoded, a UTF-8 byte-order mark dropped, the format told from the first character
(``[`` a JSON array, ``{`` JSON Lines, anything else delimited text), then that format's
reader."""

from __future__ import annotations

from typing import BinaryIO, Literal

from sluice.agents.split.parse.decompress import READ_BYTES, UploadSource
from sluice.agents.split.parse.delimited import read_delimited
from sluice.agents.split.parse.encoding import UTF8_BOM, WIDE_ENCODINGS, EncodingSniffer
from sluice.agents.split.parse.json_array import JsonArrayReader
from sluice.agents.split.parse.jsonl import jsonl_rows
from sluice.agents.split.parse.parsed import ParsedFile
from sluice.agents.split.parse.sniff import HEAD_BYTES, detect_delimiter
from sluice.errors import FileFormatError
from sluice.schemas.formats import FormatOptions, Sniffed, normalize_encoding

_SPACE_BYTES = b" \t\r\n\x0b\x0c"
_UTF8_FAMILY = ("utf-8", "utf-8-sig")


def read_text(
    raw: BinaryIO, options: FormatOptions, encoding: str | None, taken: bytes
) -> ParsedFile:
    """Start reading the text file in `raw`; `taken`: its first bytes, already read from a
    stream that cannot seek. `encoding` (else ``options.encoding``) is the encoding found when
    the file was stored; without either, a seekable `raw` is read once through
    :class:`EncodingSniffer` and rewound, and a stream that cannot seek is judged on its first
    64 KiB."""
    chosen = encoding if encoding is not None else options.encoding
    if chosen is not None:
        chosen = normalize_encoding(chosen)
    elif raw.seekable():
        chosen = _sniff_encoding(raw, options)

    source = UploadSource(
        raw,
        options.compression,
        options.max_decompressed_bytes,
        options.max_compression_ratio,
        head=taken,
    )
    if chosen in WIDE_ENCODINGS:
        source.transcode(chosen)
    head, at_end, content = _content_head(source)

    if chosen is None:
        sniffer = EncodingSniffer(compression=source.compression)
        sniffer.feed(head)
        # The head may end inside a character: judge what it holds, not how it ends.
        chosen = sniffer.decide(final=at_end)
        if chosen in WIDE_ENCODINGS:
            # Nothing was skipped: UTF-16 and UTF-32 text holds a NUL byte in any whitespace.
            source.transcode(chosen)
            head, at_end, content = _content_head(source)
    if head.startswith(UTF8_BOM) and chosen in _UTF8_FAMILY:
        source.skip(len(UTF8_BOM))
        head = head[len(UTF8_BOM) :]
    # The BOM is gone from the stream: decoding as plain UTF-8 is exact from here on. (UTF-16
    # and UTF-32 arrive transcoded to UTF-8.)
    decode_as = "utf-8" if chosen == "utf-8-sig" or chosen in WIDE_ENCODINGS else chosen

    def progress() -> int:
        return source.compressed_bytes_read

    fmt = _text_format(options, content)
    if fmt == "json":
        sniffed = Sniffed("json", None, chosen, source.compression)
        reader = JsonArrayReader(source, decode_as, options.max_record_bytes)
        return ParsedFile(sniffed, None, reader.rows(), progress)
    source.limit_lines(options.max_record_bytes)
    if fmt == "jsonl":
        sniffed = Sniffed("jsonl", None, chosen, source.compression)
        return ParsedFile(sniffed, None, jsonl_rows(source, decode_as), progress)

    delimiter = options.delimiter
    if delimiter is None:
        delimiter = detect_delimiter(head.decode(decode_as, errors="replace"), complete=at_end)
    sniffed = Sniffed("csv", delimiter, chosen, source.compression)
    header, rows = read_delimited(source, decode_as, delimiter, options.max_record_bytes)
    return ParsedFile(sniffed, header, rows, progress)


def _sniff_encoding(raw: BinaryIO, options: FormatOptions) -> str:
    """The encoding of the whole of a seekable `raw`, which is rewound."""
    start = raw.tell()
    sniff_source = UploadSource(
        raw, options.compression, options.max_decompressed_bytes, options.max_compression_ratio
    )
    sniffer = EncodingSniffer(compression=sniff_source.compression)
    for chunk in iter(lambda: sniff_source.read(READ_BYTES), b""):
        sniffer.feed(chunk)
    sniff_source.close()
    chosen = sniffer.result()
    raw.seek(start)
    return chosen


def _text_format(options: FormatOptions, content: bytes) -> Literal["csv", "jsonl", "json"]:
    """The format the options name, else the one the first character tells."""
    if options.format in ("csv", "jsonl", "json"):
        return options.format
    if content.startswith(b"["):
        return "json"
    if content.startswith(b"{"):
        return "jsonl"
    return "csv"


def _content_head(source: UploadSource) -> tuple[bytes, bool, bytes]:
    """The head of the content (leading whitespace dropped), whether it is the whole file, and
    the head from its first character that is not a BOM or a space. An empty file raises."""
    head, at_end = source.peek_head(HEAD_BYTES)
    content = head.removeprefix(UTF8_BOM).lstrip(_SPACE_BYTES)
    while not content and not at_end:
        # Leading whitespace carries nothing in any format: drop it, and keep only a bounded
        # head in memory.
        source.skip(len(head))
        head, at_end = source.peek_head(HEAD_BYTES)
        content = head.lstrip(_SPACE_BYTES)
    if not content:
        raise FileFormatError(
            "the file is empty: it holds no data, only whitespace or nothing at all. "
            "Check that the right file was chosen and that it was saved before uploading"
        )
    return head, at_end, content
