"""Readings: text cells written as Europe and the UK write them, read into what PostgreSQL and
the validation take (ISO 8601 dates, ``.`` decimals).

A field's reading is its own (``Field(date_format=..., decimal=..., thousands=...)``), else the
run's (``--date-format``, ``--decimal-comma``), else its importer's defaults. An ad-hoc
import's readings are inferred from the sample (see ``sluice.agents.split.infer``). A reader
takes a cell's text and returns it as ISO or ``.``-decimal text; a value that fits no reading
raises ``ValueError`` with what was tried.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sluice.schemas.importers import DATE_TYPES, NUMBER_TYPES, Field, Importer, date_formats

Reader = Callable[[str], str]

# What is read as it is, whatever the formats: ISO 8601 (a retry file's values, a typed
# source's cells written as text).
_ISO = re.compile(r"[+-]?\d{4}-\d{2}-\d{2}([T ].*)?")


@dataclass(frozen=True)
class Reading:
    """How one field's text cells are read, and who said so (``by``: field, run, importer or
    inferred; ``why``: inference's evidence)."""

    formats: tuple[str, ...] = ()
    decimal: str | None = None
    thousands: str | None = None
    by: str = "field"
    why: str = ""

    def describe(self, column: str) -> dict[str, Any]:
        """The provenance's entry for this reading of ``column``."""
        out: dict[str, Any] = {"column": column, "by": self.by}
        if self.formats:
            out["date_format"] = list(self.formats)
        if self.decimal or self.thousands:
            out["decimal"] = self.decimal or "."
            out["thousands"] = self.thousands
        if self.why:
            out["why"] = self.why
        return out


@dataclass(frozen=True)
class RunReading:
    """A run's own reading options: ``date_formats`` (``--date-format``, repeatable) and
    ``decimal_comma`` (``--decimal-comma``: ``1.234,5``)."""

    date_formats: tuple[str, ...] = ()
    decimal_comma: bool = False

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> RunReading:
        formats = date_formats(
            options.get("date_formats") or (), "the run's date format (--date-format)"
        )
        return cls(formats, bool(options.get("decimal_comma")))

    def apply(self, importer: Importer) -> Importer:
        """The importer with the run's options as its defaults (a field's own still wins)."""
        changes: dict[str, Any] = {}
        if self.date_formats:
            changes["date_format"] = self.date_formats
        if self.decimal_comma:
            changes |= {"decimal": ",", "thousands": "."}
        return dataclasses.replace(importer, **changes) if changes else importer


def field_readings(importer: Importer, fields: Iterable[Field]) -> dict[str, Reading]:
    """The readings of the ``fields`` of ``importer`` whose cells are not read as ISO and
    ``.`` decimals, by field name."""
    out: dict[str, Reading] = {}
    for f in fields:
        if f.type in DATE_TYPES:
            own = f.formats
            formats = own or importer.formats
            if formats:
                out[f.name] = Reading(formats=formats, by="field" if own else "importer")
        elif f.type in NUMBER_TYPES:
            own_sep = f.decimal is not None or f.thousands is not None
            decimal = f.decimal if own_sep else importer.decimal
            thousands = f.thousands if own_sep else importer.thousands
            if (decimal or ".") != "." or thousands:
                by = "field" if own_sep else "importer"
                out[f.name] = Reading(decimal=decimal, thousands=thousands, by=by)
    return out


def reader(reading: Reading, type_: str) -> Reader:
    """The reader of a field of ``type_`` (a date or number type) with ``reading``."""
    if type_ in DATE_TYPES:
        return _date_reader(reading.formats, as_date=type_ == "date")
    return _number_reader(reading.decimal or ".", reading.thousands)


def _date_reader(formats: tuple[str, ...], *, as_date: bool) -> Reader:
    tried = ", ".join(formats)
    strptime = datetime.strptime
    iso = _ISO.fullmatch

    def read(text: str) -> str:
        for fmt in formats:
            try:
                value = strptime(text, fmt)
            except ValueError:
                continue
            return value.date().isoformat() if as_date else value.isoformat()
        if iso(text):
            return text
        raise ValueError(
            f"not a date in any of the formats tried: {tried} (or ISO 8601, YYYY-MM-DD)"
        )

    return read


def _number_reader(decimal: str, thousands: str | None) -> Reader:
    t = re.escape(thousands) if thousands else None
    d = re.escape(decimal)
    grouped = (
        re.compile(rf"[+-]?\d{{1,3}}({t}\d{{3}})+({d}\d*)?([eE][+-]?\d+)?").fullmatch if t else None
    )
    spelled = f"decimal {decimal!r}" + (f", thousands {thousands!r}" if thousands else "")

    def read(text: str) -> str:
        if thousands and thousands in text:
            if grouped is None or not grouped(text):
                raise ValueError(
                    f"not a number written with {spelled}: the {thousands!r} must group the"
                    " digits by three"
                )
            text = text.replace(thousands, "")
        if decimal != ".":
            if "." in text:
                raise ValueError(
                    f"not a number written with {spelled}: it has a '.'; fix the value or"
                    " the field's separators"
                )
            text = text.replace(decimal, ".")
        return text

    return read
