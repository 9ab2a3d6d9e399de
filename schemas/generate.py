"""Write the JSON Schema of every event and record to ``schemas/json``: ``make schemas``.

Consumers in any language validate Sluice's messages against these files; a test fails when
they differ from what the models generate. The output is deterministic (sorted keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from sluice.schemas.events import (
    DeadLetter,
    FileRef,
    ImportRequested,
    ItemPage,
    LifecycleEvent,
    TriggerRequested,
)
from sluice.schemas.firehose import BackfillRequested, JetstreamEvent
from sluice.schemas.runs import Run, RunCounters

MODELS: tuple[type[BaseModel], ...] = (
    LifecycleEvent,
    Run,
    ImportRequested,
    TriggerRequested,
    ItemPage,
    JetstreamEvent,
    BackfillRequested,
    FileRef,
    DeadLetter,
    RunCounters,
)
JSON_DIR = Path(__file__).resolve().parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_file_name(model: type[BaseModel]) -> str:
    return f"{model.__name__}.schema.json"


def render_schema(model: type[BaseModel]) -> str:
    """The model's JSON Schema as it appears on the wire (serialization mode), as file text."""
    schema = {"$schema": DIALECT, **model.model_json_schema(mode="serialization")}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_schemas() -> dict[str, str]:
    """File name -> file text, for every model in ``MODELS``."""
    return {schema_file_name(model): render_schema(model) for model in MODELS}


def write_schemas(directory: Path = JSON_DIR) -> list[Path]:
    """Write the files that changed; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main() -> None:
    written = write_schemas()
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{JSON_DIR}: up to date", file=sys.stderr)


if __name__ == "__main__":
    main()
