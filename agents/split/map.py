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
from typing import Annotated, Any, Optional

import orjson
from pydantic import Field as Constraint
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from sluice.errors import MappingError
from sluice.schemas.formats import ParsedRow, RowProblem
from sluice.schemas.importers import Field, Importer, UriKey, normalize_header
from sluice.schemas.runs import RowFailure
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
        up = importer.unpivot
        self._unpivot_cell = _CELL_COERCIONS.get(up.value_type, _same) if up else _same
        self._transforms = bool(importer.transforms)

    def _validated_fields(self) -> list[Field]:
        out = list(self.fields)
        if self.importer.unpivot is not None:
            up = self.importer.unpivot
            out += [Field(up.index_field, up.index_type), Field(up.value_field, up.value_type)]
        return out

    def _resolve_header(self, header: list[str]) -> dict[str, int]:
        index: dict[str, int] = {}
        pattern = re.compile(self.importer.unpivot.columns) if self.importer.unpivot else None
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
                f"no header matches the unpivot pattern {self.importer.unpivot.columns!r}"  # type: ignore[union-attr]
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

    def _expand(self, row: ParsedRow) -> list[Record]:
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
        if up is None or isinstance(values, dict):
            return [base]
        out = []
        for i, period in self.unpivot_cols:
            cell = self._unpivot_cell(_blank(values[i], self._nulls))  # type: ignore[index]
            if cell is None and up.skip_empty:
                continue
            out.append({**base, up.index_field: period, up.value_field: cell})
        return out

    def text_names(self) -> tuple[str, ...] | None:
        """The fields ``map_text`` fills, in order, when this mapper can take that path: cells
        that stay text (no Python validation, transform, unpivot or URI template). None if not."""
        imp = self.importer
        if self.header is None or not imp.validate_in_database or imp.transforms:
            return None
        if imp.unpivot is not None or self._uri is not None:
            return None
        return self._names

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
            out.append(cells)
        return out, failures

    def map_rows(
        self, rows: Iterable[ParsedRow | RowProblem]
    ) -> tuple[list[Record], list[RowFailure]]:
        candidates: list[tuple[int, int, Record]] = []
        failures: list[RowFailure] = []
        for row in rows:
            if isinstance(row, RowProblem):
                failures.append(RowFailure(row.number, 0, row.raw, row.reason))
                continue
            try:
                expanded = self._expand(row)
            except _TransformFailed as exc:  # a user transform that raised rejects its row only
                failures.append(RowFailure(row.number, 0, row.values, f"transform failed: {exc}"))
                continue
            except Exception as exc:  # a row that does not fit the header (a caller's bug)
                failures.append(
                    RowFailure(row.number, 0, row.values, f"the row cannot be mapped: {exc!r}")
                )
                continue
            # A NUL reaches here from JSON (\u0000), from a transform, or from a caller that
            # did not parse the file (delimited text with a NUL is refused as a whole file).
            suspect = self._transforms or _may_hold_nul(row.values)
            for sub, record in enumerate(expanded):
                bad = _nul_fields(record) if suspect else None
                if bad:
                    failures.append(
                        RowFailure(
                            row.number,
                            sub,
                            record,
                            f"{', '.join(bad)}: contains a NUL character (\\u0000), which "
                            f"PostgreSQL cannot store in text or JSON; remove it from the source",
                        )
                    )
                    continue
                candidates.append((row.number, sub, record))
        records = self._validate(candidates, failures)
        for failure in failures:
            # The row log is jsonb: it cannot hold a NUL either.
            if _has_nul(failure.raw):
                failure.raw = _storable(failure.raw)
            if "\x00" in failure.reason:
                failure.reason = failure.reason.replace("\x00", "\\u0000")
        return records, failures

    def _validate(
        self, candidates: list[tuple[int, int, Record]], failures: list[RowFailure]
    ) -> list[Record]:
        keyed = []
        for number, sub, record in candidates:
            missing = [k for k in self._keys if record.get(k) is None]
            if missing:
                failures.append(RowFailure(number, sub, record, _empty_key(missing)))
                continue
            required = self._required and [n for n in self._required if record.get(n) is None]
            if required:
                reason = _required_empty(required)
                failures.append(RowFailure(number, sub, record, reason))
                continue
            keyed.append((number, sub, record))
        if self._adapter is None:
            valid = keyed
        else:
            valid = self._typed(keyed, failures)
        out = []
        for number, sub, record in valid:
            if self._uri is not None:
                record[self._uri.column] = self._uri.template.format(**record)
            record[ROW] = number
            record[SUB] = sub
            out.append(record)
        return out

    def _typed(
        self, keyed: list[tuple[int, int, Record]], failures: list[RowFailure]
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
                failures.append(RowFailure(number, sub, record, describe_validation(exc)))
        return out


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


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        parts.append(f"{where}: {_message(err)} (got {got!r})")
    return "; ".join(parts)
