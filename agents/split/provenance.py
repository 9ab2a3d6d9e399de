"""Provenance: what a run read (the file, its format, delimiter, sheet and encoding, its header)
and how its columns were mapped, saved with the run; an earlier run of the same file is named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice.agents.deps import Deps
from sluice.agents.split.evolve import SchemaChange
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.parse import ParsedFile
from sluice.agents.split.read import Reading
from sluice.schemas.events import ImportRequested
from sluice.schemas.importers import normalize_header


async def describe_source(
    deps: Deps,
    request: ImportRequested,
    parsed: ParsedFile,
    mapper: RecordMapper,
    inferred: Mapping[str, Reading] | None = None,
) -> dict[str, Any]:
    """The run's provenance: what it read, how the columns were mapped and how their numbers
    and dates were read (``readings``: the field's, the run's or the importer's, or for an
    ad-hoc import inferred, with the evidence)."""
    ref = request.file
    runs = deps.runs
    content_type = await deps.files.content_type(ref.id)
    columns = dict(mapper.mapping)
    duplicate = await runs.same_file_run(request.importer, ref.sha256, request.run_id)
    return {
        "file": {
            "name": ref.name,
            "size": ref.size,
            "content_type": content_type,
            "compression": ref.compression,
        },
        "sha256": ref.sha256,
        "format": parsed.sniffed.format,
        "delimiter": parsed.sniffed.delimiter,
        "sheet": parsed.sniffed.sheet,
        "encoding": parsed.sniffed.encoding,
        "header": parsed.header,
        "columns": columns,
        # Unpivoted columns map to "value[period]": they are listed in columns, not as aliases.
        "aliases": {
            f: n
            for n, f in columns.items()
            if "[" not in f and normalize_header(n) != normalize_header(f)
        },
        "ignored": [h for h in (parsed.header or []) if h not in columns],
        "duplicate_of": str(duplicate) if duplicate else None,
        "readings": [r.describe(c) for c, r in {**mapper.readings, **(inferred or {})}.items()],
    }


async def record_provenance(
    deps: Deps,
    request: ImportRequested,
    parsed: ParsedFile,
    mapper: RecordMapper,
    inferred: Mapping[str, Reading] | None = None,
) -> dict[str, Any]:
    """Save and return the run's provenance, with the schema changes an earlier split of the
    run reported: a split done again (after a crash, or a retry) finds its schema changes made
    already, and the first report stands."""
    runs = deps.runs
    earlier_changes = list(await runs.schema_changes(request.run_id))
    provenance = await describe_source(deps, request, parsed, mapper, inferred)
    provenance["schema_changes"] = earlier_changes
    await runs.save_provenance(request.run_id, provenance)
    return provenance


async def record_schema_changes(
    deps: Deps, request: ImportRequested, provenance: dict[str, Any], changes: list[SchemaChange]
) -> None:
    """Save the provenance again with the schema changes this split made (if it made none, the
    ones an earlier split reported stay)."""
    provenance["schema_changes"] = [c.to_json() for c in changes] or provenance["schema_changes"]
    await deps.runs.save_provenance(request.run_id, provenance)
