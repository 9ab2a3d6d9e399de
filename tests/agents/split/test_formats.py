"""Streaming file parsers: formats, delimiters, encodings, compression and the memory bounds."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import random
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from sluice.agents.split.parse import ParsedFile, parse_file
from sluice.agents.split.parse.decompress import open_decompressed
from sluice.agents.split.parse.encoding import EncodingSniffer
from sluice.errors import FileFormatError, UndecodableFile
from sluice.schemas.formats import FormatOptions, ParsedRow, RowProblem
from tests.support.parsed import values
from tests.support.unseekable import Unseekable


def parse(data: bytes, **options: Any) -> ParsedFile:
    return parse_file(io.BytesIO(data), FormatOptions(**options))


def rows(parsed: ParsedFile) -> list[ParsedRow | RowProblem]:
    return list(parsed)


# --- delimited text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delimiter", "other"),
    [(",", ";"), ("\t", ","), (";", ","), ("|", ",")],
    ids=["comma", "tab", "semicolon", "pipe"],
)
def test_delimiter_is_detected_with_quoted_fields(delimiter: str, other: str) -> None:
    d, o = delimiter, other
    text = (
        f"id{d}name{d}note\r\n"
        f'1{d}"Smith{o} John"{d}"says ""hi""{d} twice"\r\n'
        f'2{d}plain{d}"two\nlines{o} here"\r\n'
        f"3{d}x{o}y{d}z\r\n"
    )
    parsed = parse(text.encode())
    assert parsed.sniffed.format == "csv"
    assert parsed.sniffed.delimiter == delimiter
    assert parsed.header == ["id", "name", "note"]
    assert values(parsed) == [
        ["1", f"Smith{o} John", f'says "hi"{d} twice'],
        ["2", "plain", f"two\nlines{o} here"],
        ["3", f"x{o}y", "z"],
    ]


def test_semicolon_file_with_decimal_commas() -> None:
    parsed = parse(b"a;b;c\n1,5;2,25;x\n3,0;4,75;y\n")
    assert parsed.sniffed.delimiter == ";"
    assert values(parsed) == [["1,5", "2,25", "x"], ["3,0", "4,75", "y"]]


def test_explicit_delimiter_wins() -> None:
    parsed = parse(b"a;b,c\n1;2,3\n", delimiter=",")
    assert parsed.header == ["a;b", "c"]
    assert values(parsed) == [["1;2", "3"]]


def test_header_trimmed_and_bom_stripped() -> None:
    parsed = parse("\ufeff id , Café \n1,é\n".encode())
    assert parsed.sniffed.encoding == "utf-8-sig"
    assert parsed.header == ["id", "Café"]
    assert values(parsed) == [["1", "é"]]


def test_wrong_field_count_is_a_row_problem_and_the_file_goes_on() -> None:
    parsed = parse(b"a,b,c\n1,2,3\n4,5\n\n6,7,8,9,10\n11,12,13\n")
    got = rows(parsed)
    assert [type(row) for row in got] == [ParsedRow, RowProblem, RowProblem, ParsedRow]
    assert [row.number for row in got] == [1, 2, 3, 4]
    problem = got[2]
    assert isinstance(problem, RowProblem)
    assert problem.raw == ["6", "7", "8", "9", "10"]
    assert "expected 3 fields as in the header, found 5" in problem.reason


def test_blank_lines_are_skipped_and_not_counted() -> None:
    parsed = parse(b"\n\na,b\n\n1,2\n\r\n\n3,4\n\n")
    assert parsed.header == ["a", "b"]
    assert [(row.number, row.values) for row in parsed if isinstance(row, ParsedRow)] == [
        (1, ["1", "2"]),
        (2, ["3", "4"]),
    ]


def test_header_only_file_has_no_rows() -> None:
    parsed = parse(b"a,b,c\n")
    assert parsed.header == ["a", "b", "c"]
    assert rows(parsed) == []
    assert parse(b"a\tb").header == ["a", "b"]


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n  ", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])
def test_empty_file_is_refused(data: bytes) -> None:
    with pytest.raises(FileFormatError, match="the file is empty"):
        parse(data)


def test_header_with_empty_or_duplicate_names_is_refused() -> None:
    with pytest.raises(FileFormatError, match=r"without a name: column 2, 4"):
        parse(b"a,,b,\n1,2,3,4\n")
    with pytest.raises(FileFormatError, match=r"'id' \(columns 1, 3\)"):
        parse(b"id,name,id \n1,2,3\n")


def test_unclosed_quote_is_refused() -> None:
    with pytest.raises(FileFormatError, match="quote opened in data record 2 is never closed"):
        rows(parse(b'a,b\n1,2\n3,"never closed\n4,5\n'))


def test_text_after_a_closing_quote_is_a_row_problem() -> None:
    got = rows(parse(b'a,b\n1,"x"y\n2,3\n'))
    assert isinstance(got[0], RowProblem)
    assert "line 2" in got[0].reason
    assert got[1] == ParsedRow(2, ["2", "3"])


def test_over_long_quoted_field_is_refused() -> None:
    data = b'a,b\n1,"' + b"x\n" * 5000 + b'"\n'
    with pytest.raises(FileFormatError, match="quote"):
        rows(parse(data, max_record_bytes=1000))


def test_over_long_line_is_refused() -> None:
    data = b"a,b\n1,2\n" + b"x" * 100_000 + b",y\n3,4\n"
    with pytest.raises(FileFormatError, match="longer than the 1000 bytes allowed") as info:
        rows(parse(data, max_record_bytes=1000))
    assert "byte offset 8" in str(info.value)


def test_over_long_line_past_the_head_is_refused() -> None:
    head = b"a,b\n" + b"1,2\n" * 40_000
    with pytest.raises(FileFormatError, match="longer than the 1 KiB allowed") as info:
        rows(parse(head + b"y" * 5000 + b"\n", max_record_bytes=1024))
    assert f"near byte offset {len(head)}" in str(info.value)


def test_over_long_single_line_file_never_holds_the_line() -> None:
    """A 100 MB file without a single line break fails after reading about the limit."""

    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            size = min(len(buffer), 100 * 2**20 - self.served)
            buffer[:size] = b"x" * size
            self.served += size
            return size

    stream = Endless()
    with pytest.raises(FileFormatError, match="longer than the 1 MiB allowed"):
        rows(parse_file(stream, FormatOptions(max_record_bytes=2**20)))  # type: ignore[arg-type]
    assert stream.served < 4 * 2**20


def test_unseekable_stream_is_read_once() -> None:
    data = "name,city\nZoë,Kraków\n".encode()
    parsed = parse_file(Unseekable(data))  # type: ignore[arg-type]
    assert parsed.sniffed.encoding == "utf-8"
    assert values(parsed) == [["Zoë", "Kraków"]]


def test_parsed_file_iterates_once() -> None:
    parsed = parse(b"a\n1\n")
    list(parsed)
    with pytest.raises(RuntimeError, match="only once"):
        iter(parsed)


# --- encodings ------------------------------------------------------------------------------


def test_cp1252_file_is_detected_and_decoded() -> None:
    data = "name;price\nCafé;3€\nNaïve “quoted”;4\n".encode("cp1252")
    parsed = parse(data)
    assert parsed.sniffed.encoding == "cp1252"
    assert parsed.sniffed.delimiter == ";"
    assert values(parsed) == [["Café", "3€"], ["Naïve “quoted”", "4"]]


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200),
        "a,b\n1,2\n".encode("utf-16-le"),  # without a byte-order mark nothing proves UTF-16
    ],
    ids=["all-bytes", "png", "utf-16-without-bom"],
)
def test_binary_file_is_undecodable_with_a_fix(data: bytes) -> None:
    with pytest.raises(UndecodableFile) as info:
        parse(data)
    message = str(info.value)
    assert "byte offset" in message
    assert "Re-save the file as UTF-8" in message


def test_decode_error_while_parsing_names_the_offset() -> None:
    good = b"a,b\n" + b"1,2\n" * 50_000
    data = good + b"3,caf\xe9\n"
    with pytest.raises(UndecodableFile, match=rf"0xE9 at byte offset {len(good) + 5}\b"):
        rows(parse_file(io.BytesIO(data), encoding="utf-8"))


def test_sniffer_utf8_split_across_chunks() -> None:
    text = "Zoë, Kraków, 東京, 😀 — done"
    sniffer = EncodingSniffer()
    for byte in text.encode():
        sniffer.feed(bytes([byte]))
    assert sniffer.result() == "utf-8"

    sniffer = EncodingSniffer()
    for byte in ("\ufeff" + text).encode():
        sniffer.feed(bytes([byte]))
    assert sniffer.result() == "utf-8-sig"


@pytest.mark.parametrize(
    "data",
    [
        "Zoë, Kraków\n".encode() + b"plain ascii\n" * 3,
        b"caf\xc3" + b"e, plain ascii after a lead byte\n",  # invalid: Windows-1252
        b"caf\xc3" + b"e ascii\n" + b"\x81",  # invalid in both
        b"ascii\n" * 4 + "東京".encode()[:-1],  # a character cut short at the end
        b"caf\xc3" + b"e\n" + b"\xa9\n",  # a lead byte and a continuation apart: invalid
    ],
)
def test_sniffer_gives_one_answer_however_the_bytes_are_chunked(data: bytes) -> None:
    """Chunks of ASCII are not decoded, unless the one before ended inside a character."""

    def answer(chunks: list[bytes]) -> str:
        sniffer = EncodingSniffer()
        try:
            for chunk in chunks:
                sniffer.feed(chunk)
            return sniffer.result()
        except UndecodableFile as exc:
            return f"error: {exc}"

    whole = answer([data])
    for i, j in itertools.combinations(range(1, len(data)), 2):
        assert answer([data[:i], data[i:j], data[j:]]) == whole, (i, j)


def test_sniffer_cp1252_and_failures() -> None:
    sniffer = EncodingSniffer()
    for byte in "Café\tcrème\r\n".encode("cp1252"):
        sniffer.feed(bytes([byte]))
    assert sniffer.result() == "cp1252"

    sniffer = EncodingSniffer()
    sniffer.feed(b"ok\n")
    sniffer.feed(b"caf\xe9 \x01")
    with pytest.raises(UndecodableFile, match=r"0xE9 at byte offset 6.*0x01 at byte offset 8"):
        sniffer.result()

    # A multi-byte character cut off by the end of the file is not UTF-8: as Windows-1252 the
    # same bytes are "Ã", so they prove cp1252 unless a control byte rules that out.
    sniffer = EncodingSniffer()
    sniffer.feed(b"ab" + "é".encode()[:1])
    assert sniffer.result() == "cp1252"
    sniffer = EncodingSniffer()
    sniffer.feed(b"\x02ab" + "€".encode()[:2])
    with pytest.raises(UndecodableFile, match="0xE2 at byte offset 3"):
        sniffer.result()

    sniffer = EncodingSniffer()
    sniffer.feed(b"a\x00b")
    with pytest.raises(UndecodableFile, match="NUL byte"):
        sniffer.result()


WIDE = "id,name\n1,Zoë\n2,東京 😀\n"


@pytest.mark.parametrize(
    ("codec", "reported"),
    [
        ("utf-16-le", "utf-16-le"),
        ("utf-16-be", "utf-16-be"),
        ("utf-32-le", "utf-32-le"),
        ("utf-32-be", "utf-32-be"),
    ],
)
def test_a_utf16_or_utf32_byte_order_mark_is_read_as_that_encoding(
    codec: str, reported: str
) -> None:
    """The BOM proves the encoding: the file is read (not refused for its 0xFF or NUL bytes),
    plain, gzip-compressed or from a stream that cannot seek, and the encoding is reported."""
    data = ("\ufeff" + WIDE).encode(codec)
    sniffer = EncodingSniffer()
    for byte in data:  # a BOM and characters split over chunks
        sniffer.feed(bytes([byte]))
    assert sniffer.result() == reported
    for raw in (io.BytesIO(data), io.BytesIO(gzip.compress(data)), Unseekable(data, chunk=7)):
        parsed = parse_file(raw)  # type: ignore[arg-type]
        assert parsed.sniffed.encoding == reported
        assert parsed.header == ["id", "name"]
        assert values(parsed) == [["1", "Zoë"], ["2", "東京 😀"]]
    # As stored: the encoding found at upload is passed in.
    assert values(parse_file(io.BytesIO(data), encoding=reported)) == [
        ["1", "Zoë"],
        ["2", "東京 😀"],
    ]
    json_lines = ("\ufeff" + '{"id": 1, "name": "Zoë"}\n').encode(codec)
    parsed = parse(json_lines)
    assert parsed.sniffed.format == "jsonl" and values(parsed) == [{"id": 1, "name": "Zoë"}]


def test_utf16_that_does_not_decode_or_holds_a_nul_is_refused() -> None:
    cut = ("\ufeff" + WIDE).encode("utf-16-le") + b"x"  # an odd byte at the end
    with pytest.raises(UndecodableFile) as info:
        parse(cut)
    assert str(info.value).startswith(
        f"the file starts with a UTF-16 LE byte-order mark but byte 0x78 at byte offset "
        f"{len(cut) - 1} is not valid UTF-16 LE"
    )
    nul = "\ufeffa,b\n1,\x002\n".encode("utf-16-be")
    with pytest.raises(UndecodableFile) as info:
        parse(nul)
    assert str(info.value).startswith(
        "the file is UTF-16 BE text with a NUL character (U+0000) at byte offset 14, "
        "which PostgreSQL cannot store"
    )
    with pytest.raises(FileFormatError, match="the file is empty"):
        parse(codecs.BOM_UTF16_LE + " \n".encode("utf-16-le"))


def test_a_tar_archive_is_refused_as_one() -> None:
    """It used to be "a NUL byte at offset 12 ... re-save it as UTF-8"."""
    payload = b"id,name\n1,a\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo("export/data.csv")
        member.size = len(payload)
        archive.addfile(member, io.BytesIO(payload))
    tar = buffer.getvalue()
    with pytest.raises(UndecodableFile) as info:
        parse(tar)
    assert str(info.value) == (
        "the file is a tar archive (.tar) whose first member is 'export/data.csv', not a data "
        "file: extract it (tar -xf FILE, or any archive tool) and import the file it holds"
    )
    with pytest.raises(UndecodableFile) as info:
        parse(gzip.compress(tar))
    assert str(info.value).startswith(
        "the file is a gzip-compressed tar archive (.tar.gz) whose first member is "
        "'export/data.csv', not a data file: extract it (tar -xzf FILE"
    )


# --- JSON Lines -----------------------------------------------------------------------------


def test_jsonl_with_bad_lines() -> None:
    data = b'{"a": 1}\n\n{"a": 2, "b": [1, 2]}\r\n{not json\n[1, 2]\n  \n{"a": "\xc3\xa9"}'
    parsed = parse(data)
    assert parsed.sniffed.format == "jsonl"
    assert parsed.header is None
    got = rows(parsed)
    assert [row.number for row in got] == [1, 2, 3, 4, 5]
    assert got[0] == ParsedRow(1, {"a": 1})
    assert got[1] == ParsedRow(2, {"a": 2, "b": [1, 2]})
    assert isinstance(got[2], RowProblem)
    assert got[2].raw == "{not json"
    assert "not valid JSON" in got[2].reason
    assert isinstance(got[3], RowProblem)
    assert "found an array" in got[3].reason
    assert got[4] == ParsedRow(5, {"a": "é"})


def test_jsonl_problem_text_is_truncated() -> None:
    got = rows(parse(b'{"a": 1}\n{"b": ' + b"9" * 5000 + b"x}\n"))
    assert isinstance(got[1], RowProblem)
    assert len(got[1].raw) == 1000


def test_jsonl_invalid_utf8_is_undecodable() -> None:
    data = b'{"a": 1}\n{"a": "caf\xe9"}\n'
    with pytest.raises(UndecodableFile, match="0xE9 at byte offset 19"):
        rows(parse_file(io.BytesIO(data), encoding="utf-8"))


def test_jsonl_cp1252() -> None:
    parsed = parse('{"a": "Café"}\n'.encode("cp1252"))
    assert parsed.sniffed.encoding == "cp1252"
    assert values(parsed) == [{"a": "Café"}]


def test_jsonl_over_long_line() -> None:
    data = b'{"a": 1}\n{"a": "' + b"x" * 5000 + b'"}\n'
    with pytest.raises(FileFormatError, match="longer than"):
        rows(parse(data, max_record_bytes=1000))


# --- JSON arrays ----------------------------------------------------------------------------


def test_json_array_elements() -> None:
    elements: list[Any] = [
        {"a": 1, "s": 'tricky }, ] [ { " \\ ,'},
        {"nested": {"x": [1, {"y": "},"}]}, "e": "é😀"},
        42,
        {"last": None},
    ]
    parsed = parse(b" \n" + orjson.dumps(elements, option=orjson.OPT_INDENT_2) + b"\n")
    assert parsed.sniffed.format == "json"
    got = rows(parsed)
    assert [row.number for row in got] == [1, 2, 3, 4]
    assert [row.values for row in got if isinstance(row, ParsedRow)] == [
        elements[0],
        elements[1],
        elements[3],
    ]
    assert isinstance(got[2], RowProblem)
    assert got[2].raw == 42
    assert "found a number" in got[2].reason


def test_json_empty_array_and_bom() -> None:
    assert rows(parse(b"[ ]")) == []
    parsed = parse(b'\xef\xbb\xbf[{"a": "\xc3\xa9"}]')
    assert parsed.sniffed.encoding == "utf-8-sig"
    assert values(parsed) == [{"a": "é"}]


def test_json_array_across_many_buffers_matches_orjson() -> None:
    elements = [
        {"i": i, "s": "}, {" * (i % 7), "n": {"k": [i, "]"]}, "u": "ü" * (i % 3)}
        for i in range(60_000)
    ]
    data = orjson.dumps(elements)
    assert values(parse(data)) == elements
    assert values(parse_file(Unseekable(data), encoding="utf-8")) == elements  # type: ignore[arg-type]


def test_json_syntax_error_names_the_byte_offset() -> None:
    good = orjson.dumps([{"i": i, "é": "x"} for i in range(20_000)])[:-1]
    data = good + b', {"i": 1,, "j": 2}]'
    with pytest.raises(FileFormatError, match=rf"invalid at byte offset {len(good) + 10}\b"):
        rows(parse(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'[{"a": 1} {"b": 2}]', "expected ',' or ']' after an element"),
        (b'[{"a": 1}, {"b": 2}', "the file ends before the array is closed"),
        (b'[{"a": 1}] x', "after the closing ']'"),
        (b'[{"a": 1},]', "byte offset 10"),
    ],
)
def test_json_structure_errors(data: bytes, message: str) -> None:
    with pytest.raises(FileFormatError, match=message):
        rows(parse(data))


def test_json_format_forced_on_an_object() -> None:
    with pytest.raises(FileFormatError, match="JSON Lines"):
        rows(parse(b'{"a": 1}\n', format="json"))


def test_json_over_long_element() -> None:
    data = orjson.dumps([{"a": 1}, {"big": "x" * 50_000}, {"c": 3}])
    with pytest.raises(FileFormatError, match="larger than the 10 KiB allowed"):
        rows(parse(data, max_record_bytes=10 * 1024))


def test_json_array_streams_in_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    element = {"id": 0, "name": "someone", "text": "lorem ipsum, } dolor " * 100}
    body = orjson.dumps([element] * 1000)[1:-1]
    with path.open("wb") as out:
        out.write(b"[")
        for block in range(24):
            out.write(b",\n" if block else b"")
            out.write(body)
        out.write(b"]")
    assert path.stat().st_size > 50_000_000

    started = time.perf_counter()
    tracemalloc.start()
    try:
        count = 0
        with path.open("rb") as raw:
            for row in parse_file(raw, encoding="utf-8"):
                assert isinstance(row, ParsedRow)
                count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 24_000
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert time.perf_counter() - started < 10


# --- gzip -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        (b"a\tb\n1\t2\n", "csv", [["1", "2"]]),
        (b'{"a": 1}\n{"a": 2}\n', "jsonl", [{"a": 1}, {"a": 2}]),
        (b'[{"a": 1}, {"a": 2}]', "json", [{"a": 1}, {"a": 2}]),
        ("x;y\nCafé;1\n".encode("cp1252"), "csv", [["Café", "1"]]),
    ],
)
def test_gzip_of_each_format(data: bytes, fmt: str, expected: list[Any]) -> None:
    compressed = gzip.compress(data)
    parsed = parse(compressed)
    assert parsed.sniffed.compression == "gzip"
    assert parsed.sniffed.format == fmt
    assert values(parsed) == expected
    assert parsed.bytes_read == len(compressed)
    # The same through a stream that cannot seek, with the encoding given as when stored.
    unseekable = parse_file(Unseekable(compressed), encoding=parsed.sniffed.encoding)  # type: ignore[arg-type]
    assert values(unseekable) == expected


def test_gzip_damaged_or_misdeclared() -> None:
    compressed = gzip.compress(b"a,b\n" + b"1,2\n" * 10_000)
    with pytest.raises(FileFormatError, match="gzip data is damaged or cut short"):
        rows(parse(compressed[: len(compressed) // 2]))
    with pytest.raises(FileFormatError, match="does not start with the gzip signature"):
        parse(b"a,b\n1,2\n", compression="gzip")


def test_gzip_bomb_guard() -> None:
    compressed = gzip.compress(b"a,b\n" + b"1,2\n" * 500_000)
    with pytest.raises(FileFormatError, match="decompresses to more than 1 MiB"):
        rows(parse(compressed, max_decompressed_bytes=2**20))
    with pytest.raises(FileFormatError, match="decompresses to more than"):
        open_decompressed(io.BytesIO(compressed), max_decompressed_bytes=1000).read()


def test_open_decompressed_reads_both() -> None:
    assert open_decompressed(io.BytesIO(gzip.compress(b"hello"))).read() == b"hello"
    assert open_decompressed(io.BytesIO(b"\x1f"), "none").read() == b"\x1f"


def test_bytes_read_grows_while_iterating() -> None:
    data = b"a,b\n" + b"1,2\n" * 200_000
    parsed = parse(data)
    seen = []
    for row in parsed:
        if row.number % 50_000 == 0:
            seen.append(parsed.bytes_read)
    assert seen == sorted(seen)
    assert seen[0] < len(data) < parsed.bytes_read + 1


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        FormatOptions(delimiter=";;")
    with pytest.raises(ValueError, match="unknown encoding"):
        FormatOptions(encoding="klingon")


@pytest.mark.parametrize("delimiter", [",", "\t", ";", "|"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_generated_file_matches_the_csv_module(delimiter: str, newline: str) -> None:
    """Across many read chunks, with quotes, line breaks and multi-byte text in fields."""
    rng = random.Random(f"{delimiter}{newline}")
    pieces = ["plain", "a,b", "x;y", "t\tu", "p|q", 'say "hi"', "two\nlines", "cr\rlf\r\n", "é€😀"]
    header = ["id", "a", "b", "c"]
    records = [
        [str(i), *(rng.choice(pieces) * rng.randint(0, 3) for _ in range(3))] for i in range(20_000)
    ]
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(records)
    text = out.getvalue()
    parsed = parse(text.encode())
    assert parsed.sniffed.delimiter == delimiter
    assert parsed.header == header
    got = [row.values if isinstance(row, ParsedRow) else row.raw for row in parsed]
    expected = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    assert got == expected[1:]
    if newline != "\r":  # with CR line ends the writer leaves a lone LF in a field unquoted
        assert got == records
