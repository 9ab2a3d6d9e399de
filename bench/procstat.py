"""CPU seconds per process of a stack, read from /proc/<pid>/stat, for the benchmarks.

A snapshot before and one after a run give, per named process, the CPU it spent in between
(user + system). PostgreSQL is one figure for the postmaster and all its children: the
backends come and go during a run, so a snapshot sums the postmaster's own time, its
``cutime``/``cstime`` (the time of every child it has reaped, over their whole lives) and the
live children's times. A backend that ends during the run is counted in the live sum before and
in the postmaster's ``cutime`` after, whole: the difference is what the tree spent in between
(see tree_cpu for a child that ends while a snapshot is taken: the backend of a command that
has just exited often does).
The process that runs the benchmark measures the commands it starts (the sluice CLI, psql,
Sling, pgloader) with getrusage(RUSAGE_CHILDREN), which holds every child it has waited for.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

TICK = float(os.sysconf("SC_CLK_TCK"))


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the name may hold spaces and
    parentheses): index 0 is the state, 1 the parent pid, 11-14 utime, stime, cutime, cstime."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds ``pid`` has used (user + system), with its reaped children's if asked; 0 for
    a process that is gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def children_of(parent: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def descendants(root: int) -> list[int]:
    """The live children of ``root``, their children and so on."""
    found, parents = [], [root]
    while parents:
        children = [c for parent in parents for c in children_of(parent)]
        found += children
        parents = children
    return found


def tree_cpu(root: int, attempts: int = 20) -> float:
    """CPU seconds of ``root`` and all its descendants, live and reaped (PostgreSQL's backends;
    a worker's fork server and the range readers it forked).

    A child reaped while /proc is scanned would be missed twice (not yet in the root's
    ``cutime`` when that was read, gone from /proc when its turn came): the root is read again
    after the scan, and the scan repeated while the root's figure moved meanwhile. A child that
    ended but is not reaped yet still shows its times (a zombie keeps them)."""
    own = process_cpu(root, children=True)
    for _ in range(attempts):
        live = sum(process_cpu(child, children=True) for child in descendants(root))
        again = process_cpu(root, children=True)
        if again == own:
            break
        own = again
    return own + live


def own_children_cpu() -> float:
    """CPU seconds of every child of this process that has been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Snapshots of the CPU seconds of named processes; ``trees`` are counted with their
    children (PostgreSQL's postmaster), ``client`` is the commands this process ran."""

    def __init__(self, processes: Mapping[str, int], trees: Mapping[str, int]) -> None:
        self.processes = dict(processes)
        self.trees = dict(trees)

    def snapshot(self) -> dict[str, float]:
        shot = {"client": own_children_cpu()}
        shot.update({name: process_cpu(pid) for name, pid in self.processes.items()})
        shot.update({name: tree_cpu(pid) for name, pid in self.trees.items()})
        return shot

    @staticmethod
    def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        """CPU seconds per name between two snapshots (never below 0: a restarted process
        starts again from 0)."""
        return {name: round(max(0.0, after[name] - before.get(name, 0.0)), 2) for name in after}
