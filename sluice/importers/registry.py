"""The importer registry: bundled examples plus the modules named in the configuration."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from sluice.errors import ImporterNotFound
from sluice.schemas.importers import Importer

BUNDLED = ("sluice.importers.examples",)


class Registry:
    def __init__(self) -> None:
        self._importers: dict[str, Importer] = {}

    def register(self, importer: Importer) -> Importer:
        existing = self._importers.get(importer.slug)
        if existing is not None and existing != importer:
            raise ValueError(f"two importers share the slug {importer.slug!r}")
        self._importers[importer.slug] = importer
        return importer

    def load_module(self, path: str) -> None:
        """Register every ``Importer`` defined at module level in ``path``."""
        module = importlib.import_module(path)
        for value in vars(module).values():
            if isinstance(value, Importer):
                self.register(value)

    def get(self, slug: str) -> Importer:
        try:
            return self._importers[slug]
        except KeyError:
            known = ", ".join(sorted(self._importers)) or "none"
            raise ImporterNotFound(f"no importer {slug!r}; registered importers: {known}") from None

    def __iter__(self) -> Iterable[Importer]:
        return iter(sorted(self._importers.values(), key=lambda i: i.slug))

    def all(self) -> list[Importer]:
        return sorted(self._importers.values(), key=lambda i: i.slug)


def build_registry(modules: str = "") -> Registry:
    registry = Registry()
    for path in (*BUNDLED, *(m.strip() for m in modules.split(",") if m.strip())):
        registry.load_module(path)
    return registry
