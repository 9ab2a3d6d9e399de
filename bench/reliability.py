"""Reliability report: the fault-injection suite (tests/chaos) for a number of rounds, plus the
hostile-input tests (tests/hostile, marker ``hostile``) when they exist, then one table.

For each fault: how many times it ran, rows lost, rows duplicated, counters wrong (all must be
0), lifecycle events lost, whether a worker had to be restarted by a supervisor, and the time
from the fault to the run's completion (median and max). For each hostile-input test: how many
times it ran (its parametrisations) and its outcome, from pytest's JUnit XML.

    .venv/bin/python bench/reliability.py [--rounds 5] [--seed N] [--stall-timeout 120]
        [--out bench/out]

The stall timeout is the product's default (120 s) unless given: recovery must not wait for a
stall when a worker knows what was lost (``make test`` runs the same cases once with 15 s).

The chaos suite prints its seed; ``--seed`` repeats the same random moments. The exit status is
1 when a case failed or a figure that must be 0 is not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "hostile"


@dataclass
class Row:
    case: str
    kind: str  # fault | hostile
    ran: int = 0
    passed: int = 0
    lost: int | None = None
    duplicated: int | None = None
    counters_wrong: int | None = None
    events_lost: int | None = None
    supervisor: bool | None = None
    recover: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        figures = (self.lost, self.duplicated, self.counters_wrong)
        return self.passed == self.ran and all(not f for f in figures)


def pytest(args: list[str], env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "pytest", "-q", *args]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT, env=env)


def junit_cases(path: Path) -> list[tuple[str, str, str]]:
    """(module, test name, outcome) of every test case in a JUnit XML file."""
    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "error"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        out.append((case.get("classname", ""), case.get("name", ""), outcome))
    return out


def add(total: int | None, value: Any) -> int | None:
    if value is None:
        return total
    return (total or 0) + int(value)


def fault_rows(report: Path, junit: Path) -> list[Row]:
    rows: dict[str, Row] = {}
    records = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    for r in records:
        row = rows.setdefault(r["case"], Row(r["case"], "fault"))
        row.ran += 1
        row.passed += r["outcome"] == "passed"
        row.lost = add(row.lost, r["lost"])
        row.duplicated = add(row.duplicated, r["duplicated"])
        row.counters_wrong = add(row.counters_wrong, r["counters_wrong"])
        row.events_lost = add(row.events_lost, r.get("events_lost"))
        row.supervisor = bool(row.supervisor) or bool(r.get("restarted_by_supervisor"))
        if r["recover_seconds"] is not None:
            row.recover.append(float(r["recover_seconds"]))
        if r["outcome"] != "passed":
            row.problems.append(f"round {r['round']}: {r['notes'][-200:]}")
    # Tests that failed before they could write a record (in a fixture, say).
    failed_records = sum(r["outcome"] != "passed" for r in records)
    broken = [name for _, name, outcome in junit_cases(junit) if outcome in ("failed", "error")]
    if len(broken) > failed_records:
        row = Row("tests that failed without a record", "fault", ran=len(broken) - failed_records)
        row.problems = broken
        rows[row.case] = row
    return list(rows.values())


def hostile_rows(junit: Path) -> list[Row]:
    rows: dict[str, Row] = {}
    for module, name, outcome in junit_cases(junit):
        test = f"{module.rsplit('.', 1)[-1]}::{name.split('[', 1)[0]}"
        row = rows.setdefault(test, Row(test, "hostile"))
        row.ran += 1
        if outcome in ("passed", "skipped"):
            row.passed += 1
        if outcome != "passed":
            row.problems.append(f"{name}: {outcome}")
    return list(rows.values())


def cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(rows: list[Row]) -> str:
    lines = [
        "| case | ran | lost | duplicated | counters wrong | lifecycle events lost"
        " | restarted by supervisor | recovery min / median / max | outcome |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        if row.recover:
            recovery = (
                f"{min(row.recover):.1f} / {statistics.median(row.recover):.1f} /"
                f" {max(row.recover):.1f} s"
            )
        else:
            recovery = "-"
        supervisor = "-" if row.supervisor is None else ("yes" if row.supervisor else "no")
        if row.ok:
            outcome = f"passed {row.passed}/{row.ran}"
        else:
            outcome = f"**FAILED** {row.ran - row.passed}/{row.ran}"
        lines.append(
            f"| {row.case} | {row.ran} | {cell(row.lost)} | {cell(row.duplicated)}"
            f" | {cell(row.counters_wrong)} | {cell(row.events_lost)} | {supervisor}"
            f" | {recovery} | {outcome} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every fault (5)")
    parser.add_argument(
        "--stall-timeout", type=float, default=120.0, help="SLUICE_STALL_TIMEOUT (120)"
    )
    parser.add_argument("--seed", type=int, help="the chaos seed (default: a random one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="result files")
    parser.add_argument("--no-hostile", action="store_true", help="skip tests/hostile")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = out / "chaos.jsonl"
    report.unlink(missing_ok=True)
    env = {
        **os.environ,
        "CHAOS_ROUNDS": str(args.rounds),
        "CHAOS_SEED": str(seed),
        "CHAOS_REPORT": str(report),
        "CHAOS_STALL_TIMEOUT": f"{args.stall_timeout:g}",
    }
    started = time.monotonic()
    chaos_xml = out / "chaos.xml"
    chaos_xml.unlink(missing_ok=True)
    status = pytest(["-m", "chaos", "tests/chaos", f"--junitxml={chaos_xml}"], env)
    chaos_took = time.monotonic() - started
    rows = fault_rows(report, chaos_xml) if report.exists() else []
    if not rows:
        print(f"the chaos suite recorded nothing (pytest exit {status})", file=sys.stderr)
        return 1
    hostile_took = 0.0
    if HOSTILE.is_dir() and not args.no_hostile:
        hostile_xml = out / "hostile.xml"
        hostile_xml.unlink(missing_ok=True)
        started = time.monotonic()
        code = pytest(
            ["-m", "hostile", str(HOSTILE.relative_to(ROOT)), f"--junitxml={hostile_xml}"], env
        )
        hostile_took = time.monotonic() - started
        hostile = hostile_rows(hostile_xml)
        if not hostile_xml.exists():
            # pytest died before writing its report (a signal: -9 is the OOM killer's).
            broken = Row("tests/hostile", "hostile", ran=1)
            broken.problems.append(f"pytest exited with {code} and wrote no JUnit XML")
            hostile = [broken]
        elif not hostile:
            hostile = [Row("tests/hostile (no test selected by -m hostile)", "hostile")]
        rows += hostile
    else:
        print(f"no {HOSTILE.relative_to(ROOT)}: hostile-input tests not included")

    print()
    print(
        f"Reliability, {time.strftime('%Y-%m-%d')}: {args.rounds} round(s) of every fault,"
        f" stall timeout {args.stall_timeout:g} s, seed {seed} (repeat: bench/reliability.py"
        f" --rounds {args.rounds} --seed {seed});"
        f" chaos {chaos_took:.0f}s" + (f", hostile {hostile_took:.0f}s" if hostile_took else "")
    )
    print()
    print(table(rows))
    problems = [f"- {row.case}: {p}" for row in rows for p in row.problems]
    if problems:
        print("\nproblems:\n" + "\n".join(problems))
    print(f"\nrecords: {report}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
