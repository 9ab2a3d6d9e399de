"""Importers: declarative definitions, the registry, and ad-hoc imports."""

from sluice.importers.registry import Registry, build_registry
from sluice.schemas.importers import Field, Importer, Unpivot, UriKey, Webhook

__all__ = ["Field", "Importer", "Registry", "Unpivot", "UriKey", "Webhook", "build_registry"]
