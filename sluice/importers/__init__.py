"""Importers: declarative definitions, the registry, and ad-hoc imports."""

from sluice.importers.dsl import Field, Importer, Unpivot, UriKey, Webhook
from sluice.importers.registry import Registry, build_registry

__all__ = ["Field", "Importer", "Registry", "Unpivot", "UriKey", "Webhook", "build_registry"]
