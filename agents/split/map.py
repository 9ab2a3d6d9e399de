"""Map parsed rows to records of an importer's target table, and validate them.

``RecordMapper.map_rows(rows)`` takes parsed rows (or row problems) and returns records ready for
a batch plus the failures, each with its row number and a reason that says what is wrong.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, NamedTuple, Optional

import orjson
from pydantic import Field as Constraint
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from sluice.agents.split.read import Reader, Reading, field_readings, reader
from sluice.errors import MappingError
from sluice.schemas.formats import ParsedRow, RowProblem
from sluice.schemas.importers import EmptyCell, Field, Importer, UriKey, normalize_header
from sluice.schemas.runs import SOURCE_COLUMNS, RowFailure
from sluice.storage.writer import ROW, SUB

Record = dict[str, Any]

_MAX_CACHED_KEYS = 10_000
# What a batch message can carry: an int past 64 bits cannot be encoded (it would fail the whole
# split), and an infinite or NaN float would turn into null on the way. Such a value rejects its
# row here. (An int past a 32-bit integer column's range is PostgreSQL's to reject.)
_INT64 = Constraint(ge=-(2**63), le=2**63 - 1)
_LIMITS: dict[str, Any] = {
    "integer": _INT64,
    "bigint": _INT64,
    "double": Constraint(allow_inf_nan=False),
}


def _annotation(field: Field) -> Any:
    limit = _LIMITS.get(field.type) if field.annotation is None else None
    return Annotated[field.python_type, limit] if limit is not None else field.python_type


class _TransformFailed(Exception):
    """A user transform raised or returned something other than a dict."""


class _Issue(NamedTuple):
    """One thing wrong with a record: the field (or column) and what is wrong with it."""

    field: str
    text: str


class _Rejected(NamedTuple):
    """A record refused by the mapper: the row log's reason, and the same as issues."""

    number: int
    sub: int
    record: Any
    reason: str
    issues: list[_Issue]


class _Wide:
    """One source row an unpivot turned into records: what the row log keeps when any of
    them is refused (the row as the file had it), and which column each record came from."""

    __slots__ = ("columns", "empty", "gaps", "values")

    def __init__(self, values: list[Any] | dict[str, Any]) -> None:
        self.values = values
        self.columns: list[str] = []  # the period column of each record, by sub
        self.gaps = 0  # empty period cells without a record (empty="gap")
        self.empty: list[str] = []  # empty period cells that reject the row (empty="reject")

    def raw(self, header: list[str] | None) -> Any:
        if isinstance(self.values, dict):  # a retry file's row, in its order
            columns = [k for k in self.values if k != SOURCE_COLUMNS]
            return {**self.values, SOURCE_COLUMNS: columns}
        if header is None:
            return self.values
        return {**dict(zip(header, self.values, strict=False)), SOURCE_COLUMNS: header}


_EMPTY_KEY = "empty, but it is part of the key"
_EMPTY_REQUIRED = "empty, but the field is required"
_EMPTY_REJECTED = "empty; this importer rejects a row with an empty period (Unpivot empty='reject')"


def _has_nul(value: Any) -> bool:
    """True when a NUL character is anywhere in the value: PostgreSQL text and JSON refuse it."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


def _storable(value: Any) -> Any:
    """The value with each NUL character written as the six characters ``\\u0000``, so the
    row log (jsonb) can keep a rejected row."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return value


def _may_hold_nul(values: list[str] | dict[str, Any]) -> bool:
    if isinstance(values, dict):
        return True
    try:  # one C-level scan for the usual row of strings
        return "\x00" in "".join(values)
    except TypeError:
        return _has_nul(values)


def _nul_fields(record: Record) -> list[str]:
    return [name for name, value in record.items() if _has_nul(value)]


def _blank(value: Any, nulls: frozenset[str] = frozenset({""})) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return None if value in nulls else value
    return value


def cell_text(value: Any) -> Any:
    """A typed cell (XLSX, Parquet) for a text field: as a CSV of the same data spells it."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return orjson.dumps(value).decode()


def _as_date(value: Any) -> Any:
    # Excel has no date type: a date is a datetime at midnight (the readers make most of them
    # dates already).
    if isinstance(value, datetime) and value.time() == time() and value.tzinfo is None:
        return value.date()
    return value


def _as_timestamp(value: Any) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return value


def _same(value: Any) -> Any:
    return value


# How a typed cell is made to fit a field of each type; other types take the cell as it is.
_CELL_COERCIONS: dict[str, Callable[[Any], Any]] = {
    "text": cell_text,
    "date": _as_date,
    "timestamptz": _as_timestamp,
}


class TextLayout(NamedTuple):
    """``RecordMapper.map_text`` as steps over columns (see ``RecordMapper.text_layout``)."""

    positions: tuple[int, ...]
    """the header position of each output cell, in order"""
    keys: tuple[int, ...]
    """the output cells of the key (a row without one is rejected; null markers do not apply)"""
    required: tuple[int, ...]
    """the other output cells a row must fill"""
    markers: frozenset[str]
    """cell texts (after stripping) that read as null, "" aside"""
    reads: bool
    """some cell is read in Python (a date or number format): the columns cannot do it"""


class RecordMapper:
    """Built once per file, from the importer and the file's header."""

    def __init__(self, importer: Importer, header: list[str] | None) -> None:
        self.importer = importer
        self.header = header
        self.fields = list(importer.fields)
        self.aliases: dict[str, str] = {}
        # A header spelled exactly as a field's name or alias goes to that field first: two
        # headers that only differ in case, spaces or '_' ("a b", "a_b") stay two columns.
        self.exact: dict[str, str] = {}
        for f in self.fields:
            self.exact.setdefault(f.name, f.name)
        for f in self.fields:
            for name in (f.name, *f.aliases):
                self.aliases.setdefault(normalize_header(name), f.name)
                self.exact.setdefault(name, f.name)
        if importer.unpivot is not None:  # records already unpivoted (a retry) keep theirs
            for name in (importer.unpivot.index_field, importer.unpivot.value_field):
                self.aliases.setdefault(normalize_header(name), name)
        self.unpivot_cols: list[tuple[int | str, Any]] = []
        self.mapping: dict[str, str] = {}
        up = importer.unpivot
        self._pattern = re.compile(up.columns) if up is not None else None
        self.gaps = 0
        """Empty period cells of the rows mapped so far that made no record (empty="gap")."""
        if header is not None:
            self._index = self._resolve_header(header)
        else:
            self._index = {}
        self._json_keys: dict[str, tuple[str | None, bool]] = {}
        # Hot-path lookups, computed once: this runs for every row of every file.
        self._names = tuple(self._index)
        self._pick = operator.itemgetter(*self._index.values()) if len(self._index) > 1 else None
        self._keys = tuple(sorted(self._key_sources()))
        self._required = tuple(f.name for f in self.fields if f.required)
        self._adapter: TypeAdapter[list[Any]] | None = None
        self._one: TypeAdapter[Any] | None = None
        if not importer.validate_in_database:
            typed = TypedDict(  # type: ignore[misc]
                f"{importer.slug}_record",
                {f.name: Optional[_annotation(f)] for f in self._validated_fields()},  # noqa: UP045
                total=False,
            )
            self._adapter = TypeAdapter(list[typed])
            self._one = TypeAdapter(typed)
        self._uri = importer.key if isinstance(importer.key, UriKey) else None
        # Null markers ("NA", "-") read as null in delimited and spreadsheet cells, except in
        # key columns ("NA" is Namibia's code); JSON has its own null and keeps its strings.
        nulls = frozenset({"", *importer.null_markers})
        blank_only = frozenset({""})
        self._markers = len(nulls) > 1
        self._nulls = nulls
        self._cell_nulls = tuple(
            blank_only if name in self._keys else nulls for name in self._names
        )
        types = {f.name: f.type for f in self._validated_fields()}
        self._coercions = tuple(
            _CELL_COERCIONS.get(types.get(name, ""), _same) for name in self._names
        )
        self._unpivot_cell = _CELL_COERCIONS.get(up.value_type, _same) if up else _same
        # The file's header name of each field, for messages about a source row.
        self._columns = {t: header[i] for t, i in self._index.items()} if header else {}
        # Fields whose text is not read as ISO dates and "." decimals (see agents.split.read).
        self.readings: dict[str, Reading] = field_readings(importer, self._validated_fields())
        self._readers: tuple[tuple[str, Reader], ...] = tuple(
            (name, reader(r, types[name])) for name, r in self.readings.items()
        )
        self._periods: list[tuple[int, Any, str]] = [
            (int(i), period, header[int(i)]) for i, period in self.unpivot_cols if header
        ]
        self._transforms = bool(importer.transforms)

    def _validated_fields(self) -> list[Field]:
        out = list(self.fields)
        if self.importer.unpivot is not None:
            up = self.importer.unpivot
            out += [Field(up.index_field, up.index_type), Field(up.value_field, up.value_type)]
        return out

    def _resolve_header(self, header: list[str]) -> dict[str, int]:
        index: dict[str, int] = {}
        pattern = self._pattern
        exact: dict[int, str] = {}
        claimed: set[str] = set()
        for i, name in enumerate(header):
            target = self.exact.get(name)
            if target is not None and target not in claimed:
                exact[i] = target
                claimed.add(target)
        for i, name in enumerate(header):
            target = exact.get(i)
            if target is None:
                target = self.aliases.get(normalize_header(name))
                if target in claimed:
                    target = None
            if target is not None and target not in index:
                index[target] = i
                self.mapping[name] = target
            elif pattern is not None and (m := pattern.fullmatch(name.strip())):
                self.unpivot_cols.append((i, m.group(1)))
                self.mapping[name] = f"{self.importer.unpivot.value_field}[{m.group(1)}]"  # type: ignore[union-attr]
        needed = [f for f in self.fields if f.required or f.name in self._key_sources()]
        missing = [f for f in needed if f.name not in index]
        if missing:
            described = "; ".join(
                f"{f.name!r} (accepted headers: {', '.join(repr(a) for a in (f.name, *f.aliases))})"
                for f in missing
            )
            raise MappingError(
                f"the file has no column for {described}. The header found was: "
                f"{', '.join(repr(h) for h in header)}. Rename the column or add an alias."
            )
        if pattern is not None and not self.unpivot_cols:
            raise MappingError(
                f"importer {self.importer.slug!r} makes one record of each column whose name"
                f" matches the pattern {pattern.pattern} (a regular expression), and no column"
                " of this file does. The header found was: "
                f"{', '.join(repr(h) for h in header)}."
            )
        return index

    def _key_sources(self) -> set[str]:
        key = self.importer.key
        if isinstance(key, UriKey):
            return set(re.findall(r"{(\w+)}", key.template))
        return set(key) - ({self.importer.unpivot.index_field} if self.importer.unpivot else set())

    def _json_target(self, key: str) -> tuple[str | None, bool]:
        hit = self._json_keys.get(key)
        if hit is None:
            exact = self.exact.get(key)
            if exact is not None:
                hit = (exact, True)
            else:
                hit = (self.aliases.get(normalize_header(key)), False)
            if len(self._json_keys) < _MAX_CACHED_KEYS:  # objects with endless distinct keys
                self._json_keys[key] = hit
        return hit

    def _from_json(self, obj: dict[str, Any]) -> Record:
        out: Record = {}
        loose: set[str] | None = None  # targets filled by a look-alike key, not an exact one
        for k, v in obj.items():
            target, exact = self._json_target(k)
            if target is None:
                continue
            if target not in out:
                out[target] = _blank(v)
                if not exact:
                    loose = loose or set()
                    loose.add(target)
            elif exact and loose and target in loose:
                # A key spelled exactly as the field wins over a look-alike seen before it.
                out[target] = _blank(v)
                loose.discard(target)
        return out

    def _expand(self, row: ParsedRow) -> tuple[list[Record], _Wide | None]:
        """The row's records; for a wide row an unpivot reads, also what it came from."""
        values = row.values
        if isinstance(values, dict):
            base = self._from_json(values)
        else:
            picked = (
                self._pick(values)
                if self._pick is not None
                else [values[i] for i in self._index.values()]
            )
            try:  # delimited files: every cell is a str
                if not self._markers:
                    cells = [v.strip() or None for v in picked]
                else:
                    cells = [
                        None if (v := c.strip()) in nulls else v
                        for c, nulls in zip(picked, self._cell_nulls, strict=True)
                    ]
            except AttributeError:  # typed cells (XLSX, Parquet)
                cells = [
                    coerce(_blank(v, nulls))
                    for v, coerce, nulls in zip(
                        picked, self._coercions, self._cell_nulls, strict=True
                    )
                ]
            base = dict(zip(self._names, cells, strict=True))
        for transform in self.importer.transforms:
            try:
                base = transform(base)
            except Exception as exc:
                raise _TransformFailed(str(exc)) from exc
            if not isinstance(base, dict):
                raise _TransformFailed(f"{transform!r} returned {type(base).__name__}, not a dict")
        up = self.importer.unpivot
        if up is None:
            return [base], None
        periods: list[tuple[str, Any, Any]]
        if isinstance(values, dict):
            assert self._pattern is not None
            match = self._pattern.fullmatch
            periods = [
                (k, m.group(1), v)
                for k, v in values.items()
                if isinstance(k, str) and (m := match(k.strip()))
            ]
            if not periods:  # records already unpivoted (a retry of an older run's rejections)
                return [base], None
        else:
            periods = [(name, period, values[i]) for i, period, name in self._periods]
        wide = _Wide(values)
        on_empty = up.on_empty
        out = []
        for name, period, value in periods:
            cell = self._unpivot_cell(_blank(value, self._nulls))
            if cell is None and on_empty is not EmptyCell.NULL:
                if on_empty is EmptyCell.GAP:
                    wide.gaps += 1
                else:
                    wide.empty.append(name)
                continue
            out.append({**base, up.index_field: period, up.value_field: cell})
            wide.columns.append(name)
        return out, wide

    def text_names(self) -> tuple[str, ...] | None:
        """The fields ``map_text`` fills, in order, when this mapper can take that path: cells
        that stay text (no Python validation, transform, unpivot or URI template). None if not."""
        imp = self.importer
        if self.header is None or not imp.validate_in_database or imp.transforms:
            return None
        if imp.unpivot is not None or self._uri is not None:
            return None
        return self._names

    def text_layout(self) -> TextLayout | None:
        """What ``map_text`` does to a row's cells, for a reader that does it by columns
        (``agents.split.columnar``); None when ``map_text`` cannot take the file."""
        names = self.text_names()
        if names is None:
            return None
        keys = tuple(names.index(k) for k in self._keys)
        required = tuple(i for i, n in enumerate(names) if n in self._required and i not in keys)
        return TextLayout(
            positions=tuple(self._index.values()),
            keys=keys,
            required=required,
            markers=self._nulls - {""},
            reads=any(name in names for name, _ in self._readers),
        )

    def map_text(
        self, rows: Iterable[ParsedRow | RowProblem]
    ) -> tuple[list[list[str]], list[RowFailure]]:
        """``map_rows`` for rows of a delimited file when ``text_names()`` is not None, without
        a dict per row: each row is ``[row number, "0", *cells]`` as text, "" for null (blank
        cells and null markers), ready for a COPY batch. A delimited file with a NUL was refused
        as a whole, so no cell holds one."""
        out: list[list[str]] = []
        failures: list[RowFailure] = []
        names, pick = self._names, self._pick
        index = list(self._index.values())
        # Positions in an output row: the row number and sub-row come first.
        at = {name: i + 2 for i, name in enumerate(names)}
        keys = [at[k] for k in self._keys]
        required = [at[n] for n in self._required if n in at and at[n] not in keys]
        must = keys + required
        lacking: Callable[[list[str]], bool]
        if len(must) == 1:
            lacking = lambda cells: not cells[must[0]]  # noqa: E731
        else:
            must_get = operator.itemgetter(*must)
            lacking = lambda cells: "" in must_get(cells)  # noqa: E731
        markers = self._nulls - {""}
        key_positions = set(keys)  # null markers do not apply to keys
        readers = [(at[name], name, read) for name, read in self._readers if name in at]
        for row in rows:
            if isinstance(row, RowProblem):
                failures.append(RowFailure(row.number, 0, row.raw, row.reason))
                continue
            values = row.values
            picked = pick(values) if pick is not None else [values[i] for i in index]  # type: ignore[index]
            cells = [str(row.number), "0", *map(str.strip, picked)]
            # Most rows hold no marker: one C-level set test instead of one per cell.
            if markers and not markers.isdisjoint(cells):
                cells[2:] = [
                    "" if c in markers and i not in key_positions else c
                    for i, c in enumerate(cells[2:], start=2)
                ]
            if lacking(cells):
                if not all(cells[i] for i in keys):
                    reason = _empty_key([names[i - 2] for i in keys if not cells[i]])
                else:
                    reason = _required_empty([names[i - 2] for i in required if not cells[i]])
                record = {n: c or None for n, c in zip(names, cells[2:], strict=True)}
                failures.append(RowFailure(row.number, 0, record, reason))
                continue
            if readers:
                original = cells[2:]
                issues = _read_cells(cells, readers)
                if issues:
                    record = {n: c or None for n, c in zip(names, original, strict=True)}
                    failures.append(RowFailure(row.number, 0, record, _reason(issues)))
                    continue
            out.append(cells)
        return out, failures

    def map_rows(
        self, rows: Iterable[ParsedRow | RowProblem]
    ) -> tuple[list[Record], list[RowFailure]]:
        candidates: list[tuple[int, int, Record]] = []
        failures: list[RowFailure] = []
        rejected: list[_Rejected] = []
        wide: dict[int, _Wide] = {}
        for row in rows:
            if isinstance(row, RowProblem):
                failures.append(RowFailure(row.number, 0, row.raw, row.reason))
                continue
            try:
                expanded, source = self._expand(row)
            except _TransformFailed as exc:  # a user transform that raised rejects its row only
                failures.append(RowFailure(row.number, 0, row.values, f"transform failed: {exc}"))
                continue
            except Exception as exc:  # a row that does not fit the header (a caller's bug)
                failures.append(
                    RowFailure(row.number, 0, row.values, f"the row cannot be mapped: {exc!r}")
                )
                continue
            if source is not None:
                wide[row.number] = source
            # A NUL reaches here from JSON (\u0000), from a transform, or from a caller that
            # did not parse the file (delimited text with a NUL is refused as a whole file).
            suspect = self._transforms or _may_hold_nul(row.values)
            for sub, record in enumerate(expanded):
                bad = _nul_fields(record) if suspect else None
                if bad:
                    text = (
                        "contains a NUL character (\\u0000), which PostgreSQL cannot store in"
                        " text or JSON; remove it from the source"
                    )
                    reason = f"{', '.join(bad)}: {text}"
                    issues = [_Issue(name, text) for name in bad]
                    rejected.append(_Rejected(row.number, sub, record, reason, issues))
                    continue
                candidates.append((row.number, sub, record))
        records = self._validate(candidates, rejected)
        if wide:
            records = self._whole_rows(records, rejected, wide, failures)
        else:
            failures += [RowFailure(r.number, r.sub, r.record, r.reason) for r in rejected]
        for failure in failures:
            # The row log is jsonb: it cannot hold a NUL either.
            if _has_nul(failure.raw):
                failure.raw = _storable(failure.raw)
            if "\x00" in failure.reason:
                failure.reason = failure.reason.replace("\x00", "\\u0000")
        return records, failures

    def _whole_rows(
        self,
        records: list[Record],
        rejected: list[_Rejected],
        wide: dict[int, _Wide],
        failures: list[RowFailure],
    ) -> list[Record]:
        """An unpivoted source row is imported whole or not at all: a row with any refused
        record becomes one failure that holds the row as the file had it and names every
        column at fault (deduplicated: a bad date is one issue, not one per period)."""
        bad: dict[int, list[_Issue]] = {
            n: [_Issue(c, _EMPTY_REJECTED) for c in w.empty] for n, w in wide.items() if w.empty
        }
        for r in rejected:
            source = wide.get(r.number)
            if source is None:
                failures.append(RowFailure(r.number, r.sub, r.record, r.reason))
                continue
            issues = bad.setdefault(r.number, [])
            for issue in r.issues:
                named = _Issue(self._column_of(issue.field, r.sub, source), issue.text)
                if named not in issues:
                    issues.append(named)
        for number, source in wide.items():
            if number not in bad:
                self.gaps += source.gaps
        if not bad:
            return records
        for number, issues in bad.items():
            reason = "; ".join(f"{i.field}: {i.text}" for i in issues)
            failures.append(RowFailure(number, 0, wide[number].raw(self.header), reason))
        return [r for r in records if r[ROW] not in bad]

    def _column_of(self, field: str, sub: int, source: _Wide) -> str:
        """The file's name for ``field`` of record ``sub`` of a wide row."""
        up = self.importer.unpivot
        assert up is not None
        if field in (up.value_field, up.index_field) and sub < len(source.columns):
            return source.columns[sub]
        if isinstance(source.values, dict):
            return next((k for k in source.values if self._json_target(k)[0] == field), field)
        return self._columns.get(field, field)

    def _validate(
        self, candidates: list[tuple[int, int, Record]], rejected: list[_Rejected]
    ) -> list[Record]:
        keyed = []
        for number, sub, record in candidates:
            missing = [k for k in self._keys if record.get(k) is None]
            if missing:
                issues = [_Issue(k, _EMPTY_KEY) for k in missing]
                rejected.append(_Rejected(number, sub, record, _empty_key(missing), issues))
                continue
            required = self._required and [n for n in self._required if record.get(n) is None]
            if required:
                reason = _required_empty(required)
                issues = [_Issue(n, _EMPTY_REQUIRED) for n in required]
                rejected.append(_Rejected(number, sub, record, reason, issues))
                continue
            keyed.append((number, sub, record))
        originals: dict[tuple[int, int], Record] = {}
        if self._readers:
            keyed = self._read(keyed, rejected, originals)
        if self._adapter is None:
            valid = keyed
        else:
            valid = self._typed(keyed, rejected, originals)
        out = []
        for number, sub, record in valid:
            if self._uri is not None:
                record[self._uri.column] = self._uri.template.format(**record)
            record[ROW] = number
            record[SUB] = sub
            out.append(record)
        return out

    def _read(
        self,
        keyed: list[tuple[int, int, Record]],
        rejected: list[_Rejected],
        originals: dict[tuple[int, int], Record],
    ) -> list[tuple[int, int, Record]]:
        """Text cells read by the fields' readings; a record whose cell fits none is rejected
        as the file had it, and so is a record refused later (``originals``)."""
        out = []
        for number, sub, record in keyed:
            issues: list[_Issue] = []
            read: Record | None = None
            for name, read_cell in self._readers:
                value = record.get(name)
                if type(value) is not str:
                    continue
                try:
                    text = read_cell(value)
                except ValueError as exc:
                    issues.append(_Issue(name, f"{exc} (got {value!r})"))
                    continue
                if text != value:
                    read = read if read is not None else dict(record)
                    read[name] = text
            if issues:
                rejected.append(_Rejected(number, sub, record, _reason(issues), issues))
            elif read is not None:
                originals[number, sub] = record
                out.append((number, sub, read))
            else:
                out.append((number, sub, record))
        return out

    def _typed(
        self,
        keyed: list[tuple[int, int, Record]],
        rejected: list[_Rejected],
        originals: dict[tuple[int, int], Record],
    ) -> list[tuple[int, int, Record]]:
        assert self._adapter is not None and self._one is not None
        try:
            typed = self._adapter.validate_python([r for _, _, r in keyed])
            return [(n, s, t) for (n, s, _), t in zip(keyed, typed, strict=True)]
        except ValidationError:
            pass  # rare: find the bad rows one by one
        out = []
        for number, sub, record in keyed:
            try:
                out.append((number, sub, self._one.validate_python(record)))
            except ValidationError as exc:
                issues = validation_issues(exc)
                original = originals.get((number, sub), record)
                rejected.append(_Rejected(number, sub, original, _reason(issues), issues))
        return out


def fitting_importers(importers: Iterable[Importer], header: list[str]) -> list[str]:
    """The slugs of the importers that take uploaded files and find every column they need
    in ``header``: what to suggest when a file does not fit the importer it was sent to."""
    fits = []
    for importer in importers:
        if not {"upload", "file"} & set(importer.sources) or importer.firehose:
            continue
        try:
            RecordMapper(importer, header)
        except MappingError:
            continue
        fits.append(importer.slug)
    return fits


def _reason(issues: list[_Issue]) -> str:
    return "; ".join(f"{i.field}: {i.text}" for i in issues)


def _read_cells(cells: list[str], readers: list[tuple[int, str, Reader]]) -> list[_Issue]:
    """A COPY row's cells read in place by ``readers`` (position, field, reader); the issues
    of the cells that fit none."""
    issues = []
    for at, name, read in readers:
        value = cells[at]
        if value:
            try:
                cells[at] = read(value)
            except ValueError as exc:
                issues.append(_Issue(name, f"{exc} (got {value!r})"))
    return issues


def _empty_key(names: list[str]) -> str:
    return f"empty key: {', '.join(names)} has no value"


def _required_empty(names: list[str]) -> str:
    return f"required field empty: {', '.join(names)}"


# pydantic's errors for a date or timestamp it cannot parse; a year past 9999 reads to it as a
# wrong separator after four digits ("invalid date separator, expected `-`").
_DATE_ERRORS = frozenset(
    {"date_parsing", "date_from_datetime_parsing", "datetime_parsing", "datetime_from_date_parsing"}
)
_YEAR = re.compile(r"\s*([+-]?\d+)-")
_MAX_YEAR = 9999


def _message(err: Any) -> str:
    """pydantic's message, or a clearer one where it points the wrong way."""
    got = err.get("input")
    if err["type"] in _DATE_ERRORS and isinstance(got, str):
        year = _YEAR.match(got)
        if year is not None and not 1 <= int(year.group(1)) <= _MAX_YEAR:
            return f"year {int(year.group(1))} is out of range (1 to {_MAX_YEAR})"
    return str(err["msg"])


def validation_issues(exc: ValidationError) -> list[_Issue]:
    return [
        _Issue(".".join(str(p) for p in err["loc"]), f"{_message(err)} (got {err.get('input')!r})")
        for err in exc.errors(include_url=False)
    ]


def describe_validation(exc: ValidationError) -> str:
    return "; ".join(f"{i.field}: {i.text}" for i in validation_issues(exc))
