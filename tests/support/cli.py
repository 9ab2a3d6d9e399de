"""The command line as a user runs it: ``python -m sluice ...`` in a process of its own."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT


def sluice(
    *args: str, env: dict[str, str], timeout: float = 180, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def starting_up() -> Iterator[None]:
    """Held by a test while its ``sluice up`` starts: the supervisor takes each default port
    (broker, PostgreSQL, API) that is free when it looks, so two pytest processes of one run
    (make test) starting stacks at once could both take one. The other waits until this stack
    holds its ports."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    with (Path(tempfile.gettempdir()) / f"sluice-tests-up-{run}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
