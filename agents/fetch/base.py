"""What every pull source shares: a file being fetched, the secrets sources name, and the
path into a JSON answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sluice.errors import SourceError


@dataclass
class Fetched:
    """A file being fetched from a source: consume ``chunks`` once, inside the context that
    produced it. ``location`` says where it came from (the final URL, the remote path)."""

    name: str
    chunks: AsyncIterator[bytes]
    content_type: str | None = None
    location: str | None = None


Secrets = Mapping[str, str]
"""Environment variable name -> value, read once by the entry point."""


def secret(secrets: Secrets, name: str | None, what: str) -> str | None:
    """The value of the variable ``name``; SourceError naming the variable when it is unset."""
    if name is None:
        return None
    value = secrets.get(name)
    if value is None:
        raise SourceError(f"{what}: the environment variable {name} is not set on the workers")
    return value


def dig(data: Any, path: str | None) -> Any:
    """``data`` at a dotted ``path`` (``"meta.next"``); None where a step is missing."""
    if not path:
        return data
    for step in path.split("."):
        if isinstance(data, dict):
            data = data.get(step)
        elif isinstance(data, list) and step.isdigit() and int(step) < len(data):
            data = data[int(step)]
        else:
            return None
    return data
