"""The importer DSL, as importer modules import it (``from sluice.importers.dsl import
Field, Importer``). The definitions are in :mod:`sluice.schemas.importers`."""

from sluice.schemas.formats import FormatOptions
from sluice.schemas.importers import (
    ADHOC,
    EmptyCell,
    Field,
    Importer,
    Lookup,
    Schedule,
    Transform,
    Unpivot,
    UriKey,
    Webhook,
    normalize_header,
)

__all__ = [
    "ADHOC",
    "EmptyCell",
    "Field",
    "FormatOptions",
    "Importer",
    "Lookup",
    "Schedule",
    "Transform",
    "Unpivot",
    "UriKey",
    "Webhook",
    "normalize_header",
]
