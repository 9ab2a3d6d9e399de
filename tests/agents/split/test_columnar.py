"""A range read by columns (pyarrow) gives exactly what the csv module gives, or is left to it:
random ranges of quotes, delimiters, line ends, whitespace, null markers and escapes are read
both ways and compared, and the ranges pyarrow would read differently (text after a closing
quote, a quote left open, a stray quote) are shown to go to the csv module."""

from __future__ import annotations

import csv
import io
import random
import zlib
from pathlib import Path

import pytest

from sluice.agents.split import columnar
from sluice.agents.split.infer import DEFAULT_NULL_MARKERS, adhoc_importer
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.ranges import RangeJob, RangeResult, RangeSpec, read_range
from sluice.errors import FileFormatError
from sluice.schemas.importers import Field

pytestmark = pytest.mark.skipif(not columnar.available(), reason="pyarrow is not installed")

HEADER = ["id", "note", "qty"]
PIECES = ["a", "b", "7", ",", ",", '"', '""', "\n", "\r\n", "\r", " ", "\u00a0", "\x1c", "\\", "\t"]
PIECES += ["NA", "-", "é", "x y"]


def importer(required: bool = False):
    fields = [Field("id", "text"), Field("note", "text"), Field("qty", "text", required=required)]
    return adhoc_importer("t", ["id"], fields, null_markers=DEFAULT_NULL_MARKERS)


def both_ways(path: Path, body: bytes, spec: RangeSpec) -> tuple[object, object, bool]:
    """(the csv module's result or error, the result by columns or error, whether the columns
    took the range)."""
    path.write_bytes(body)
    job = RangeJob(0, len(body), 0, 1, True)
    mapper = RecordMapper(spec.importer, spec.header)
    took = (
        columnar.read_columns(
            body, spec.encoding, spec.delimiter, 3, mapper, 0, 1, spec.max_record_bytes, spec.key_at
        )
        is not None
    )
    results = []
    for arrow in (False, True):
        columnar.enabled = arrow
        try:
            results.append(comparable(read_range(spec, job)))
        except FileFormatError as exc:
            results.append(("error", str(exc)))
        finally:
            columnar.enabled = True
    return results[0], results[1], took


def comparable(result: RangeResult) -> tuple:
    failures = [(f.row_number, f.sub, f.reason, f.raw) for f in result.failures]
    return result.records, result.lines, failures, result.hashes, result.unclosed


@pytest.mark.parametrize("required", [False, True])
def test_random_ranges_read_by_columns_equal_the_csv_module(tmp_path: Path, required: bool) -> None:
    rnd = random.Random(17 + required)
    path = tmp_path / "r.csv"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(required), 3, (2,), 1 << 20)
    taken = widths = 0
    for case in range(3000):
        if case % 2:  # well formed (as csv.writer quotes): cells of any of the pieces
            out = io.StringIO()
            quoting = rnd.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
            writer = csv.writer(out, quoting=quoting, lineterminator=rnd.choice(["\n", "\r\n"]))
            for _ in range(rnd.randrange(1, 6)):
                width = rnd.choice([3, 3, 3, 3, 2, 4])  # now and then a wrong field count
                writer.writerow(
                    ["".join(rnd.choices(PIECES, k=rnd.randrange(0, 4))) for _ in range(width)]
                )
            text = out.getvalue()
        else:  # anything
            text = "".join(rnd.choices(PIECES, k=rnd.randrange(1, 20)))
        by_csv, by_columns, took = both_ways(path, text.encode(), spec)
        assert by_columns == by_csv, text
        taken += took
        if took:
            failures = by_columns[2]  # type: ignore[index]
            widths += any("fields as in the header" in f[2] for f in failures)
    # Both kinds of ranges were met: the comparison covered the columns' reading, of
    # records with a wrong field count too.
    assert 400 < taken < 2000
    assert widths > 50


@pytest.mark.parametrize(
    "text",
    [
        '1,"b" ,c\n',  # text after a closing quote: the csv module's row problem
        '1,"b"c,d\n',
        '1,b,"c\n',  # a quote left open (at the end of the file: its error)
        '1,5 inch" screen,3\n',  # a stray quote: text to the csv module, not to pyarrow
        '1,"a,"x,3\n',
        '1,"",x"\n2,b,c\n',
    ],
)
def test_quotes_pyarrow_reads_otherwise_go_to_the_csv_module(tmp_path: Path, text: str) -> None:
    path = tmp_path / "q.csv"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(), 3, (2,), 1 << 20)
    assert not columnar.structural_quotes(text.encode(), b",")
    by_csv, by_columns, took = both_ways(path, text.encode(), spec)
    assert not took
    assert by_columns == by_csv


def test_a_well_quoted_range_is_read_by_columns(tmp_path: Path) -> None:
    text = '1,"two\nlines, ""quoted""",3\r\n2,  plain  ,NA\n\n3,"tab\there\\",-\n'
    path = tmp_path / "w.csv"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(), 3, (2,), 1 << 20)
    by_csv, by_columns, took = both_ways(path, text.encode(), spec)
    assert took
    assert by_columns == by_csv
    lines = sorted(line for part in by_columns[1] for line in part.texts())  # type: ignore[index]
    assert lines == [
        '1\t0\t1\ttwo\\nlines, "quoted"\t3\n',
        "2\t0\t2\tplain\t\n",
        "3\t0\t3\ttab\\there\\\\\t\n",
    ]


def test_rows_the_mapping_rejects_have_the_csv_modules_reasons(tmp_path: Path) -> None:
    text = "1,a,1\n,b,2\n3,c,\n4,d,NA\n5,e,5\n"
    path = tmp_path / "k.csv"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(required=True), 3, (2,), 1 << 20)
    by_csv, by_columns, took = both_ways(path, text.encode(), spec)
    assert took
    assert by_columns == by_csv
    failures = by_columns[2]  # type: ignore[index]
    assert [(f[0], f[2]) for f in failures] == [
        (2, "empty key: id has no value"),
        (3, "required field empty: qty"),
        (4, "required field empty: qty"),
    ]


def test_a_windows_1252_range_is_read_by_columns_as_the_csv_module_reads_it(
    tmp_path: Path,
) -> None:
    text = "1,caf\xe9 \u20ac,2\n2,\u201cquoted\u201d,3\n"
    path = tmp_path / "c.csv"
    spec = RangeSpec(str(path), "cp1252", ",", HEADER, importer(), 3, (2,), 1 << 20)
    by_csv, by_columns, took = both_ways(path, text.encode("cp1252"), spec)
    assert took
    assert by_columns == by_csv


def test_a_field_over_the_limit_goes_to_the_csv_module(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    long = "1," + "x" * 300 + ",3\n2,b,3\n"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(), 3, (2,), 200)
    by_csv, by_columns, took = both_ways(path, long.encode(), spec)
    assert not took and by_csv == by_columns and by_csv[0] == "error"


def test_records_of_a_wrong_field_count_have_the_csv_modules_numbers_and_reasons(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.csv"
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, importer(), 3, (2,), 1 << 20)
    text = b'1,a,1\r\n2,"b, c"\r\n3,c,3\r\n4,d,4,"x"\r\n,e,5\r\n6,f,6\r\n'
    by_csv, by_columns, took = both_ways(path, text, spec)
    assert took and by_csv == by_columns
    assert [(f[0], f[2], f[3]) for f in by_columns[2]] == [  # type: ignore[index]
        (2, "expected 3 fields as in the header, found 2 (record ending on line 3)", ["2", "b, c"]),
        (4, "expected 3 fields as in the header, found 4 (record ending on line 5)",
         ["4", "d", "4", "x"]),
        (5, "empty key: id has no value", {"id": None, "note": "e", "qty": "5"}),
    ]  # fmt: skip
    lines = sorted(line for part in by_columns[1] for line in part.texts())  # type: ignore[index]
    assert [line.split("\t")[0] for line in lines] == ["1", "3", "6"]
    # An empty line or a line end inside quotes: the csv module counts the lines.
    for text in (b"1,a,1\n\n2,b\n", b'1,"a\nz",1\n2,b\n'):
        by_csv, by_columns, took = both_ways(path, text, spec)
        assert not took and by_csv == by_columns


def test_a_key_of_two_columns_is_the_routers_text_in_the_routers_order(tmp_path: Path) -> None:
    """The router's key is ("note", "id"): its text "note\x1fid" decides the partition, not
    the columns' order in the importer."""
    fields = [Field("id", "text"), Field("note", "text"), Field("qty", "text")]
    two = adhoc_importer("t", ["note", "id"], fields, null_markers=DEFAULT_NULL_MARKERS)
    path = tmp_path / "k.csv"
    text = "".join(f"{i},n{i % 7},{i}\n" for i in range(1, 200)).encode()
    spec = RangeSpec(str(path), "utf-8", ",", HEADER, two, 3, (3, 2), 1 << 20)
    by_csv, by_columns, took = both_ways(path, text, spec)
    assert took and by_csv == by_columns
    parts = by_columns[1]  # type: ignore[index]
    for p, lines in enumerate(parts):
        for line in lines.texts():
            _, _, id_, note, _ = line.split("\t")
            assert zlib.crc32(f"{note}\x1f{id_}".encode()) % 3 == p
