"""A byte range read by columns: pyarrow's CSV parser and compute kernels instead of a Python
loop per row, for the ranges where that gives exactly what the csv module gives.

``ranges.read_range`` asks here first. The csv module reads a range for about 4.7 us a row
(parsing 2.3, ``RecordMapper.map_text`` 2.5, routing); by columns, pyarrow parses, strips,
blanks the null markers, joins the COPY lines and groups them by partition (``routed``: one body
of bytes per partition, no Python object per row), and the whole range takes about 2.3. A range
is read here only when the answer is the csv module's, row for row; otherwise ``None`` sends
it to the csv module, which finds the problems and words them:

- Quotes. pyarrow is lenient where the csv module (strict) is not: text after a closing quote
  (``"b" ,c``) and a quote left open at the end are read without complaint. So the range's
  quotes must all be structural: splitting its bytes at the quotes, the pieces outside quotes
  (every other one) start, after a closing quote, with the delimiter or a line end (or are
  empty: a doubled quote), end, before an opening quote, with one too, and the count of quotes
  is even. A quote inside an unquoted field (``5 inch" screen``) breaks that rule too and goes
  to the csv module, which reads it as text.
- Anything pyarrow refuses: bytes that are not UTF-8 (in the range's encoding, for the others).
- A record with the wrong number of fields is skipped by pyarrow and logged with the csv
  module's reason, whose line number is the record's when each record is one line (no empty
  line, no line end inside quotes, no lone carriage return); otherwise the csv module, which
  counts the lines, reads the range.
- A field longer than ``max_record_bytes``, which the csv module refuses with its reason.
- Cells read in Python (a date or number format, ``TextLayout.reads``).

A record the mapping rejects (an empty key or required cell) is a few rows: those alone are
mapped by ``RecordMapper.map_text``, so their reasons are its own. A differential test reads
thousands of random ranges both ways (tests/agents/split/test_columnar.py).
"""

from __future__ import annotations

import array
import codecs
import csv
import sys
import zlib
from typing import Any

from sluice.agents.split.lines import CopyLines
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.parse.delimited import wrong_width
from sluice.agents.split.repeats import BUCKETS
from sluice.schemas.formats import ParsedRow
from sluice.schemas.runs import RowFailure

# pyarrow (about 50 MB resident once imported) is imported by the first range read here, in
# the pool's processes, not by every worker that imports this module.
pa: Any = None
pc: Any = None
pcsv: Any = None
_missing = False

enabled = True
"""False: the csv module reads every range (the tests compare both ways)."""

_whitespace = ""
"""What ``str.strip`` strips (pyarrow's own whitespace is not quite Python's), found when
pyarrow is (45 ms: not at every import)."""

_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
"""COPY text escapes (``schemas.events.copy_lines``), the backslash first."""


def available() -> bool:
    """Whether ranges can be read by columns here: pyarrow is installed (the base install
    leaves it out: the csv module reads every range)."""
    global pa, pc, pcsv, _missing, _whitespace
    if pa is None and not _missing:
        try:
            import pyarrow
            import pyarrow.compute
            import pyarrow.csv
        except ImportError:
            _missing = True
        else:
            pa, pc, pcsv = pyarrow, pyarrow.compute, pyarrow.csv
            _whitespace = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    return pa is not None


def read_columns(
    data: bytes,
    encoding: str,
    delimiter: str,
    width: int,
    mapper: RecordMapper,
    number: int,
    lines: int,
    max_record_bytes: int,
    key_at: tuple[int, ...],
) -> tuple[int, Any, list[bytes], list[RowFailure]] | None:
    """The range ``data`` (whole records) read by columns: (records, COPY lines of the rows in
    order (a pyarrow string array, see ``routed``), each row's key as bytes, the rejected
    rows in order), numbered from ``number`` + 1,
    after ``lines`` lines of the file; ``key_at``: the positions of the key's cells in a mapped
    row (``RangeSpec.key_at``). None when the csv module must read it (see the module's doc)."""
    layout = mapper.text_layout()
    if not enabled or layout is None or layout.reads or not data or not available():
        return None
    structural, line_end_quoted = _quotes(data, delimiter.encode())
    if not structural:
        return None
    if codecs.lookup(encoding).name != "utf-8":
        try:
            data = data.decode(encoding).encode()
        except UnicodeDecodeError:
            return None
    # No cell holds a byte COPY text escapes when the range holds no tab or backslash and no
    # line end inside quotes (outside quotes, a \r or \n ends a record): then the COPY lines
    # need no scan (two counts of the joined lines' bytes, about 12 ms a range).
    plain = not line_end_quoted and b"\t" not in data and b"\\" not in data
    wrong: list[tuple[int, str]] = []  # (record, its text): a wrong number of fields

    def skip(row: Any) -> str:
        wrong.append((row.number or 0, row.text))
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.py_buffer(data),
            read_options=pcsv.ReadOptions(
                column_names=[f"c{i}" for i in range(width)],
                use_threads=False,
                block_size=max(len(data) + 1, 1 << 20),
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter,
                newlines_in_values=True,
                ignore_empty_lines=True,
                invalid_row_handler=skip,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={f"c{i}": pa.string() for i in range(width)},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    rows = table.num_rows
    records = rows + len(wrong)
    # Each record's number; those with a wrong number of fields, with the csv module's reason.
    numbers_of: Any = range(number + 1, number + 1 + rows)
    failures: list[RowFailure] = []
    if wrong:
        if line_end_quoted or not _one_line_each(data) or not all(k for k, _ in wrong):
            return None  # a reason names the line a record ends on: the csv module counts them
        skipped = {k for k, _ in wrong}
        numbers_of = [number + k for k in range(1, records + 1) if k not in skipped]
        for k, text in wrong:
            fields = next(csv.reader([text], delimiter=delimiter, strict=True))
            reason = wrong_width(width, len(fields), lines + k)
            failures.append(RowFailure(number + k, 0, fields, reason))
    if rows == 0:
        return None
    raw = [table.column(i).combine_chunks() for i in range(width)]
    if len(data) > max_record_bytes and any(
        pc.max(pc.utf8_length(raw[i])).as_py() > max_record_bytes for i in range(width)
    ):
        return None
    markers = pa.array(sorted(layout.markers), pa.string()) if layout.markers else None
    # A column whose cells are all longer than every marker holds none (most columns): a
    # length per cell is cheaper than a look-up per cell.
    longest = max((len(m.encode()) for m in layout.markers), default=0)
    cells = []
    for at, position in enumerate(layout.positions):
        cell = pc.utf8_trim(raw[position], characters=_whitespace)
        if (
            markers is not None
            and at not in layout.keys
            and pc.min(pc.binary_length(cell)).as_py() <= longest
        ):
            marked = pc.is_in(cell, value_set=markers)
            if pc.any(marked).as_py():
                cell = pc.if_else(marked, "", cell)
        cells.append(cell)
    keep: Any = None
    must = layout.keys + layout.required
    if must:
        lacking = pc.equal(cells[must[0]], "")
        for at in must[1:]:
            lacking = pc.or_(lacking, pc.equal(cells[at], ""))
        if pc.any(lacking).as_py():
            keep = pc.invert(lacking)
            bad = pc.indices_nonzero(lacking).to_pylist()
            rejected = [ParsedRow(numbers_of[i], [c[i].as_py() for c in raw]) for i in bad]
            mapped, lacking_failures = mapper.map_text(rejected)
            assert not mapped, "a row the columns reject is one map_text rejects"
            failures = sorted(failures + lacking_failures, key=lambda f: f.row_number)
    numbers = pc.cast(pa.array(numbers_of, pa.int64()), pa.string())
    copy = _copy_lines(numbers, cells, plain)
    if len(key_at) == 1:
        key = cells[key_at[0] - 2]
    else:  # the key text the router gives (route.BatchRouter), in the router's key order
        key = pc.binary_join_element_wise(*(cells[k - 2] for k in key_at), "\x1f")
    if keep is not None:
        copy, key = copy.filter(keep), key.filter(keep)
    return records, copy, pc.cast(key, pa.binary()).to_pylist(), failures


def routed(lines: Any, keys: list[bytes], partitions: int) -> tuple[list[CopyLines], list[bytes]]:
    """What ``ranges._Placer`` makes of ``read_columns``' lines and keys, by columns: per
    partition (a row's is its key's CRC-32 modulo ``partitions``) the COPY lines of its rows in
    order, as the bytes of one body; and per bucket of the repeat counter, the 64-bit hashes
    of its keys (CRC-32 and Adler-32, less 2**63) in row order."""
    crc = pa.array(list(map(zlib.crc32, keys)), pa.uint64())
    adler = pa.array(list(map(zlib.adler32, keys)), pa.uint64())
    u64 = pa.uint64()  # every operand: a plain int would make the kernels' type int64
    joined = pc.bit_wise_or(pc.shift_left(crc, pa.scalar(32, u64)), adler)
    # Less 2**63 in 64 bits is the top bit flipped; the low bits (the bucket) stay.
    hashes = pc.cast(pc.bit_wise_xor(joined, pa.scalar(1 << 63, u64)), pa.int64(), safe=False)
    buckets = _grouped(hashes, pc.bit_wise_and(adler, pa.scalar(BUCKETS - 1, u64)), BUCKETS)
    n = pa.scalar(partitions, u64)
    at = pc.subtract(crc, pc.multiply(pc.divide(crc, n), n))
    parts = []
    for taken in _grouped(lines, at, partitions):
        if not len(taken):
            parts.append(CopyLines(b"", array.array("q")))
            continue
        # The n + 1 offsets of the lines into the data buffer, from the array's own offset.
        offsets = pa.Array.from_buffers(
            pa.int32(), len(taken) + 1, [None, taken.buffers()[1]], offset=taken.offset
        )
        start, end = offsets[0].as_py(), offsets[-1].as_py()
        ends = pc.cast(pc.subtract(offsets.slice(1), start), pa.int64())
        parts.append(
            CopyLines(
                taken.buffers()[2].slice(start, end - start).to_pybytes(),
                array.array("q", _int64_bytes(ends)),
            )
        )
    return parts, [_int64_bytes(b) for b in buckets]


def _grouped(values: Any, group: Any, groups: int) -> list[Any]:
    """``values`` in ``groups`` arrays by their ``group`` (0 to groups - 1), each in order."""
    order = pc.sort_indices(group)  # a stable sort: each group keeps its rows' order
    ordered = values.take(order)
    counts = dict.fromkeys(range(groups), 0)
    for row in pc.value_counts(group).to_pylist():
        counts[row["values"]] = row["counts"]
    out, at = [], 0
    for g in range(groups):
        out.append(ordered.slice(at, counts[g]))
        at += counts[g]
    return out


def _int64_bytes(values: Any) -> bytes:
    """The native bytes of an int64 array (an array of "q" takes them)."""
    data = values.buffers()[1]
    if data is None:
        return b""
    return bytes(data.slice(values.offset * 8, len(values) * 8).to_pybytes())


def _one_line_each(data: bytes) -> bool:
    """Whether the k-th record of ``data`` ends on its k-th line, given no line end inside
    quotes (``_quotes`` tells): no empty line, no lone carriage return."""
    if data.startswith((b"\n", b"\r\n")) or b"\n\n" in data or b"\n\r\n" in data:
        return False
    return b"\r" not in data or data.count(b"\r") == data.count(b"\r\n")


def _copy_lines(numbers: Any, cells: list[Any], plain: bool = False) -> Any:
    """The COPY text line of each row (``schemas.events.copy_lines``): its number, sub-row 0
    and cells, escaped where a cell needs it (usually none does: ``plain`` says so, from the
    range's bytes, or scans of the lines' bytes prove it, as copy_lines does)."""
    lines = _joined(numbers, cells)
    if plain:
        return lines
    body = lines.buffers()[2]  # a kernel's fresh array: its bytes start at 0
    size = pc.sum(pc.binary_length(lines)).as_py() or 0
    text = body.to_pybytes()[:size] if body is not None else b""
    rows = len(lines)
    if (
        b"\\" not in text
        and b"\r" not in text
        and text.count(b"\t") == rows * (len(cells) + 1)
        and text.count(b"\n") == rows
    ):
        return lines
    escaped = []
    for column in cells:
        for char, escape in _ESCAPES:
            if pc.any(pc.match_substring(column, char)).as_py():
                column = pc.replace_substring(column, char, escape)
        escaped.append(column)
    return _joined(numbers, escaped)


def _joined(numbers: Any, cells: list[Any]) -> Any:
    last = pc.binary_join_element_wise(cells[-1], "", "\n")  # the line end, on the narrowest
    return pc.binary_join_element_wise(numbers, "0", *cells[:-1], last, "\t")


def structural_quotes(data: bytes, delimiter: bytes) -> bool:
    """Whether every quote of ``data`` opens, closes or doubles inside a quoted field, with the
    last one closed: the bytes where pyarrow's parser and the csv module (strict) agree."""
    return _quotes(data, delimiter)[0]


def _quotes(data: bytes, delimiter: bytes) -> tuple[bool, bool]:
    """(``structural_quotes``, and if so whether a line end, \n or \r, is inside quotes)."""
    pieces = data.split(b'"')
    if len(pieces) == 1:
        return True, False
    if len(pieces) % 2 == 0:  # an odd count of quotes: one is left open
        return False, False
    outside = pieces[::2]
    ends = {b"", delimiter, b"\n", b"\r"}
    # Before an opening quote: the start of a field. After a closing one: its end.
    if not ({p[-1:] for p in outside[:-1]} <= ends and {p[:1] for p in outside[1:]} <= ends):
        return False, False
    quoted = b"".join(pieces[1::2])
    return True, b"\n" in quoted or b"\r" in quoted
