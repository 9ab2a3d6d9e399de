"""Faust agents, one module per pipeline stage. Each module has a plain async function that does
the work (testable without Faust) and a ``register(app, ...)`` that binds it to a topic."""
