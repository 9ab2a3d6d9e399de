"""`sluice up` keeps its stack running: real `sluice up --detach` processes, real SIGKILLs.

A killed broker or PostgreSQL comes back on its port, a crashing worker is started again with
growing delays, the supervisor reaps its children and records every death and restart in
stack.json, which `sluice stack` and `sluice env --stack` show."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from sluice.stack import StackState, find_process_alive, read_state
from sluice.supervisor import EVENT_LOG, Backoff
from tests.conftest import ROOT
from tests.support.cli import sluice, starting_up

pytestmark = pytest.mark.stack


@dataclass
class Up:
    """A `sluice up --detach` stack of a test's own."""

    home: Path
    env: dict[str, str]

    def state(self) -> StackState:
        state = read_state(self.home)
        assert state is not None, f"the stack is gone:\n{self.events()}"
        return state

    def events(self) -> str:
        path = self.home / "logs" / EVENT_LOG
        return path.read_text() if path.exists() else "(no supervisor log)"

    def wait_for(self, what: str, test: Callable[[StackState], bool], timeout: float) -> StackState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if test(state):
                return state
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout:g} s\n{self.events()}")

    def zombies(self) -> list[psutil.Process]:
        supervisor = psutil.Process(self.state().pids["supervisor"])
        return [c for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE]


def start_up(home: Path, **extra: str) -> Up:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(SLUICE_HOME=str(home), PYTHONPATH=str(ROOT), **extra)
    with starting_up():
        started = sluice("up", "--detach", env=env, timeout=240)
    assert started.returncode == 0, started.stdout + started.stderr
    return Up(home, env)


def stop_up(up: Up) -> None:
    state = read_state(up.home)
    down = sluice("down", env=up.env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    if state is not None:
        assert not any(find_process_alive(pid) for pid in state.pids.values())


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = start_up(tmp_path_factory.mktemp("up") / "home")
    try:
        yield stack
    finally:
        stop_up(stack)


def restarted(name: str, before: int) -> Callable[[StackState], bool]:
    def test(state: StackState) -> bool:
        comp = state.components[name]
        return comp.restarts > before and comp.status == "running"

    return test


def test_postgres_sigkilled_under_sluice_up_is_back_and_serves_an_import(
    up: Up, tmp_path: Path
) -> None:
    before = up.state().components["postgres"]
    assert before.status == "running" and find_process_alive(before.pid)

    os.kill(before.pid, signal.SIGKILL)  # the postmaster alone, as a crash would
    after = up.wait_for("postgres started again", restarted("postgres", before.restarts), 60)

    postgres = after.components["postgres"]
    assert postgres.pid != before.pid and find_process_alive(postgres.pid)
    assert postgres.restarts == before.restarts + 1
    assert postgres.last_exit == "was killed by SIGKILL"
    assert postgres.last_restart_at is not None and postgres.last_exit_at is not None
    assert postgres.last_exit_at <= postgres.last_restart_at
    assert after.pids["postgres"] == postgres.pid
    output = (up.home / "logs" / "up.log").read_text()  # what `sluice up` printed
    for events in (up.events(), output):
        assert f"postgres (pid {before.pid}) was killed by SIGKILL" in events
        assert f"postgres started again (pid {postgres.pid}), restart {postgres.restarts}" in events
    assert not up.zombies()

    # The stack view and `sluice env --stack` show it; `sluice env` is unchanged.
    view = sluice("stack", env=up.env)
    assert view.returncode == 0, view.stderr
    line = next(ln for ln in view.stdout.splitlines() if ln.startswith("postgres"))
    assert f"pid {postgres.pid}" in line and f"restarts {postgres.restarts}" in line
    assert "was killed by SIGKILL" in line and "started again" in line
    as_json = json.loads(sluice("stack", "--json", env=up.env).stdout)
    assert as_json["components"]["postgres"]["restarts"] == postgres.restarts
    plain = sluice("env", env=up.env)
    with_stack = sluice("env", "--stack", env=up.env)
    assert plain.returncode == 0 and with_stack.returncode == 0, with_stack.stderr
    assert with_stack.stdout.startswith(plain.stdout)
    assert all(ln.startswith("SLUICE_") for ln in plain.stdout.splitlines())
    comments = with_stack.stdout[len(plain.stdout) :].splitlines()
    assert comments and all(ln.startswith("# ") for ln in comments)
    assert any(
        ln.startswith("# postgres") and f"restarts {postgres.restarts}" in ln for ln in comments
    )

    # A client imports through the restarted database, by the same URL.
    path = tmp_path / "after_restart.csv"
    path.write_text("id,name\n1,one\n2,two\n3,three\n")
    imported = sluice(
        "import", str(path), "--into", "after_pg_restart", "--key", "id", "--wait", "--json",
        env=up.env,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stdout + imported.stderr
    run = json.loads(imported.stdout)
    assert run["status"] == "completed" and run["created_rows"] + run["unchanged_rows"] == 3
    # The stack keeps stored files in its own directory on this disk, where `sluice env`
    # points every shell; the file is whole there, and no part file is left.
    store = f"file://{(up.home / 'files').resolve()}"
    assert up.state().file_store == store
    assert f"SLUICE_FILE_STORE={store}\n" in plain.stdout
    stored = (up.home / "files").resolve() / str(run["file_id"])
    assert stored.read_bytes() == path.read_bytes()
    assert not [p.name for p in stored.parent.iterdir() if p.name.endswith(".part")]


def test_broker_sigkilled_under_sluice_up_is_back_on_its_port(up: Up) -> None:
    state = up.state()
    before = state.components["broker"]
    port = int(state.kafka_bootstrap.rsplit(":", 1)[1])

    os.kill(before.pid, signal.SIGKILL)
    after = up.wait_for("broker started again", restarted("broker", before.restarts), 60)

    broker = after.components["broker"]
    assert broker.pid != before.pid and broker.last_exit == "was killed by SIGKILL"
    assert after.kafka_bootstrap == state.kafka_bootstrap
    listening = {
        c.laddr.port for c in psutil.Process(broker.pid).net_connections() if c.status == "LISTEN"
    }
    assert port in listening
    assert f"broker (pid {before.pid}) was killed by SIGKILL" in up.events()
    assert not up.zombies()


STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})"


def _times(events: str, pattern: str) -> list[datetime]:
    return [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
        for m in re.finditer(rf"^{STAMP} {pattern}", events, re.MULTILINE)
    ]


def test_a_crashing_worker_is_started_again_with_growing_delays(tmp_path: Path) -> None:
    # The supervisor hands its environment to the worker, which cannot import the module.
    up = start_up(tmp_path / "home", SLUICE_IMPORTERS="tests.support.crashing_importers")
    try:
        up.wait_for("3 restarts", lambda s: s.components["worker"].restarts >= 3, timeout=150)
        events = up.events()
        died = _times(events, r"worker \(pid \d+\) exited with code 1 after")
        again = _times(events, r"worker started again \(pid \d+\), restart \d+")
        assert len(died) >= 3 and len(again) >= 3, events
        waits = [(a - d).total_seconds() for d, a in zip(died, again, strict=False)][:3]
        # 1 s, 2 s, 4 s (plus up to 20% jitter) between a death and the next start.
        for wait, least in zip(waits, (1.0, 2.0, 4.0), strict=True):
            assert wait >= least - 0.01, (waits, events)
        assert waits[0] < waits[1] < waits[2], (waits, events)
        worker_log = (up.home / "logs" / "worker.log").read_text()
        assert "crashing_importers is broken on purpose" in worker_log

        state = up.state()
        assert find_process_alive(state.pids["supervisor"])
        assert state.components["broker"].restarts == state.components["postgres"].restarts == 0
        assert state.components["worker"].last_exit == "exited with code 1"
        assert not up.zombies()
    finally:
        stop_up(up)


# ------------------------------------------------------------------------------ backoff


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_over_after_a_stable_run() -> None:
    rand = random.Random(7).random
    backoff = Backoff(base=1.0, cap=8.0, jitter=0.2, stable_after=60.0)
    delays = [backoff.next_delay(uptime=3.0, rand=rand) for _ in range(6)]
    for delay, nominal in zip(delays, (1, 2, 4, 8, 8, 8), strict=True):
        assert nominal <= delay < nominal * 1.2
    assert len(set(delays[3:])) == 3  # the jitter keeps capped delays apart
    # Up a minute or more: the next death waits the base delay again.
    assert 1.0 <= backoff.next_delay(uptime=61.0, rand=rand) < 1.2
    assert 2.0 <= backoff.next_delay(uptime=0.0, rand=rand) < 2.4
    assert Backoff(jitter=0).next_delay(0.0) == 1.0
