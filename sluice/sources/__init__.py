"""Pull sources for importer modules: see :mod:`sluice.sources.base`."""
