"""Pull sources, as importer modules import them (``from sluice.sources.base import
ApiSource``). The definitions are in :mod:`sluice.schemas.sources`; the code that fetches is in
:mod:`sluice.agents.fetch`."""

from sluice.errors import SourceError, SourceUnavailable
from sluice.schemas.sources import (
    ApiSource,
    FilesystemSource,
    FtpSource,
    ItemMapper,
    Pagination,
    PullSource,
    RateLimit,
    UrlSource,
    merge_item,
)

__all__ = [
    "ApiSource",
    "FilesystemSource",
    "FtpSource",
    "ItemMapper",
    "Pagination",
    "PullSource",
    "RateLimit",
    "SourceError",
    "SourceUnavailable",
    "UrlSource",
    "merge_item",
]
