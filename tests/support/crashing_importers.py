"""An importers module that cannot be imported: a worker named to load it (SLUICE_IMPORTERS)
exits at once, which tests/sluice/test_supervisor.py uses to make a worker crash in a loop."""

raise RuntimeError("tests.support.crashing_importers is broken on purpose")
