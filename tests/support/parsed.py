"""What a parsed file holds, as plain lists of cell values."""

from __future__ import annotations

from typing import Any

from sluice.agents.split.parse import ParsedFile
from sluice.schemas.formats import ParsedRow


def values(parsed: ParsedFile) -> list[Any]:
    out = []
    for row in parsed:
        assert isinstance(row, ParsedRow), row
        out.append(row.values)
    return out
