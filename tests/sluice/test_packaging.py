"""The distribution a user installs: the wheel, in a fresh virtualenv of its own, with nothing of
this checkout on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sluice import __version__

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a clean copy of the checkout (its symlinks kept): setuptools would otherwise reuse a
    # stale build/ folder of the checkout, and leave one behind.
    source = tmp_path_factory.mktemp("source") / "sluice"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "artifacts"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("sluice_ingest-*.whl")
    return found


def test_the_wheel_installs_one_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"sluice", f"sluice_ingest-{__version__}.dist-info"}
    for module in (
        "sluice/agents/split/split.py",
        "sluice/storage/migrations/0001_core.sql",
        "sluice/streams/kafka.py",
        "sluice/schemas/json/Run.schema.json",
        "sluice/web/static/common.js",
    ):
        assert module in names
    assert not [n for n in names if n.startswith("sluice/tests") or "/tests/" in n]


def test_a_fresh_virtualenv_runs_the_installed_command(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    # Nothing of this checkout on the path: with PYTHONPATH naming it, pip would take its
    # egg-info for an installed sluice-ingest and skip the wheel.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        [*pip, "install", str(wheel)], capture_output=True, text=True, timeout=900, env=clean
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Run from an empty folder with a clean environment: nothing of the checkout is importable.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run(
        [str(venv / "bin" / "sluice"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"sluice, version {__version__}"
    config = subprocess.run(
        [str(venv / "bin" / "sluice"), "config", "--all"],
        cwd=tmp_path,
        env={**env, "SLUICE_KAFKA_SASL_PASSWORD": "pw-never-shown"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stderr
    assert "SLUICE_KAFKA_SASL_PASSWORD=**********" in config.stdout.splitlines()
    assert "SLUICE_TOPIC_PREFIX=sluice" in config.stdout.splitlines()
    assert "pw-never-shown" not in config.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sluice.agents, sys; print(sluice.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv))
    for name in ("agents", "storage", "streams", "schemas"):
        gone = subprocess.run(
            [str(venv / "bin" / "python"), "-c", f"import {name}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert gone.returncode != 0, f"the wheel installs a top-level package {name!r}"
