"""``sluice up`` / ``sluice down`` / ``sluice stack``: run the embedded stack under SLUICE_HOME
and keep it running.

The supervisor starts the broker, PostgreSQL, one worker and the HTTP API, then watches them.
A process that ends is reaped at once (a zombie keeps its pid alive, and PostgreSQL takes a
live pid in its lock files for a running server), reported (one line on the output and in
``logs/supervisor.log``: what ended, its exit code or signal, when it starts again) and started
again after a :class:`Backoff`. The broker comes back on its port, empty (the workers recreate
the topics); PostgreSQL on its port and data, its stale lock files cleared. Every start, death
and restart is recorded in ``stack.json`` (:class:`~sluice.stack.StackState`), which
``sluice stack`` and ``sluice env --stack`` show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
from pydantic import SecretStr

from sluice.config import (
    ApiSettings,
    DatabaseSettings,
    FileStoreSettings,
    KafkaSettings,
    MetricsSettings,
    PipelineSettings,
    Settings,
)
from sluice.errors import EmbeddedStackMissing
from sluice.retries import backoff
from sluice.stack import (
    LOCALHOST,
    ComponentState,
    ComponentStatus,
    EmbeddedBroker,
    EmbeddedPostgres,
    SluiceProcess,
    StackState,
    api_token,
    describe_exit,
    find_process_alive,
    free_port,
    read_state,
    remove_state,
    require_embedded,
    start_on_a_free_port,
    terminate,
    wait_for_port,
    write_state,
)

log = logging.getLogger(__name__)

DEFAULT_KAFKA_PORT = 9092
DEFAULT_PG_PORT = 5432

CHECK_INTERVAL = 0.5
"""Seconds between two looks at the processes."""
EVENT_LOG = "supervisor.log"


@dataclass
class Backoff:
    """How long to wait before starting again a process that ended.

    ``base`` seconds after the first death, doubling with each death that follows quickly (within
    ``stable_after`` seconds of the start), never more than ``cap``, plus up to ``jitter`` of the
    delay at random (restarts of several processes do not fall in step). A process that stayed
    up ``stable_after`` seconds starts over from ``base``.
    """

    base: float = 1.0
    cap: float = 30.0
    jitter: float = 0.2
    stable_after: float = 60.0
    failures: int = 0

    def next_delay(self, uptime: float, rand: Callable[[], float] = random.random) -> float:
        """The wait before the next start of a process that ended after ``uptime`` seconds
        up (0 for a start that failed); ``rand`` returns a float in [0, 1)."""
        if uptime >= self.stable_after:
            self.failures = 0
        self.failures += 1
        # The doubling of sluice.retries; the jitter only adds (a restart never comes sooner).
        nominal = backoff(self.failures, first=self.base, cap=self.cap, jitter=False)
        return nominal * (1 + self.jitter * rand())


class Component(Protocol):
    """A process of the stack: EmbeddedBroker, EmbeddedPostgres, SluiceProcess."""

    log_path: Path

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def stop(self) -> None: ...


@dataclass
class _Watched:
    name: str
    component: Component
    backoff: Backoff
    state: ComponentState
    started: float
    """The monotonic time the current process started."""
    due: float | None = None
    """While it is down: the monotonic time of its next start."""


def _create_time(pid: int | None) -> float:
    """When process ``pid`` started, as a Unix timestamp (now when it cannot be told)."""
    if not pid:
        return time.time()
    try:
        return min(float(psutil.Process(pid).create_time()), time.time())
    except (psutil.Error, ValueError):
        return time.time()


class Supervisor:
    """Keeps ``components`` (already started) running; :meth:`check` looks at them once.

    ``say`` receives one line per event; ``on_change`` is called after every change of
    :attr:`states`."""

    def __init__(
        self,
        components: Mapping[str, Component],
        *,
        say: Callable[[str], None],
        on_change: Callable[[], None] = lambda: None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self._say = say
        self._on_change = on_change
        self._watched = []
        for name, c in components.items():
            created = _create_time(c.pid)
            self._watched.append(
                _Watched(
                    name,
                    c,
                    backoff(),
                    ComponentState(pid=c.pid or 0, started_at=created),
                    started=time.monotonic() - (time.time() - created),
                )
            )

    @property
    def states(self) -> dict[str, ComponentState]:
        """What was seen of each process, by name (live objects, updated by :meth:`check`)."""
        return {w.name: w.state for w in self._watched}

    def check(self) -> None:
        """Reap and report the processes that ended; start those whose wait is over."""
        for watched in self._watched:
            if watched.due is None:
                code = watched.component.poll()
                if code is not None:
                    self._ended(watched, code)
            elif time.monotonic() >= watched.due:
                self._restart(watched)

    def _ended(self, watched: _Watched, code: int) -> None:
        uptime = time.monotonic() - watched.started
        delay = watched.backoff.next_delay(uptime)
        watched.due = time.monotonic() + delay
        how = describe_exit(code)
        state = watched.state
        state.status = ComponentStatus.RESTARTING
        state.last_exit = how
        state.last_exit_at = time.time()
        state.next_restart_at = time.time() + delay
        self._say(
            f"{watched.name} (pid {state.pid}) {how} after {uptime:.1f} s up;"
            f" starting it again in {delay:.1f} s (its log: {watched.component.log_path})"
        )
        self._on_change()

    def _restart(self, watched: _Watched) -> None:
        state = watched.state
        try:
            watched.component.start()
        except Exception as exc:
            # A start that fails counts as one more quick death.
            log.warning("%s could not be started", watched.name, exc_info=True)
            delay = watched.backoff.next_delay(0.0)
            watched.due = time.monotonic() + delay
            state.next_restart_at = time.time() + delay
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._say(
                f"{watched.name} could not be started ({reason}); trying again in {delay:.1f} s"
            )
            self._on_change()
            return
        watched.started = time.monotonic()
        watched.due = None
        state.pid = watched.component.pid or 0
        state.status = ComponentStatus.RUNNING
        state.restarts += 1
        state.started_at = state.last_restart_at = time.time()
        state.next_restart_at = None
        self._say(f"{watched.name} started again (pid {state.pid}), restart {state.restarts}")
        self._on_change()


def _event_logger(path: Path) -> logging.Logger:
    """``logs/supervisor.log``: the event lines, as printed. This is the supervisor process's
    entry point, where its handlers are configured."""
    events = logging.getLogger(f"{__name__}.events")
    events.setLevel(logging.INFO)
    events.propagate = False  # printed already; not a second time on stderr
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    events.addHandler(handler)
    return events


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _event_printer(events: logging.Logger) -> Callable[[str], None]:
    """The ``say`` of a :class:`Supervisor`: each event stamped, printed and logged."""

    def say(message: str) -> None:
        line = f"{_stamp()} {message}"
        print(line, flush=True)
        events.info(line)

    return say


class _StopRequest:
    """Set by SIGINT or SIGTERM, its handlers installed when it is made: the supervisor then
    stops the stack, in order, and returns."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True


def _wait_for_api(
    api: SluiceProcess, port: int, timeout: float, stopping: Callable[[], bool]
) -> None:
    """Until the API answers on ``port``, or ends (the supervisor starts it again), or the
    supervisor is told to stop. TimeoutError when it lives on and does not answer."""
    deadline = time.monotonic() + timeout
    while not stopping() and api.poll() is None:
        try:
            wait_for_port(LOCALHOST, port, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the API did not answer on port {port} within {timeout:g} s"
                ) from None


def sign_in_hint(home: Path, api_url: str, *, configured: bool) -> str:
    """Where the dashboard is and which token signs in to it."""
    token = (
        "one of the tokens in SLUICE_API_TOKEN / SLUICE_API_TOKENS"
        if configured
        else f"the token in {(home / 'api_token').resolve()} (`sluice env` prints it)"
    )
    return f"dashboard: {api_url}/ui/ (sign in with {token})"


def _print_connection(home: Path, state: StackState, configured: Callable[[], bool]) -> None:
    """What points another shell's ``sluice`` commands at the stack, and how to sign in to the
    dashboard; ``configured`` says whether the user's own tokens sign in (asked only when the
    stack has an API)."""
    print(f"SLUICE_KAFKA_BOOTSTRAP={state.kafka_bootstrap}")
    print(f"SLUICE_DATABASE_URL={state.database_url}")
    print(f"SLUICE_API_URL={state.api_url}")
    if state.api_url:
        print(sign_in_hint(home, state.api_url, configured=configured()))


def _child_settings(
    broker: EmbeddedBroker,
    postgres: EmbeddedPostgres,
    pipeline: PipelineSettings,
    kafka: KafkaSettings,
    api: ApiSettings,
    api_port: int,
    files: FileStoreSettings,
) -> Settings:
    """The settings the worker and the API run with: the configured ones, pointed at this
    stack's broker, database and API port, and its file store."""
    return Settings(
        kafka=kafka.model_copy(update={"bootstrap": broker.bootstrap}),
        database=DatabaseSettings(url=SecretStr(postgres.url)),
        api=api.model_copy(update={"url": f"http://{LOCALHOST}:{api_port}", "port": api_port}),
        pipeline=pipeline,
        files=files,
    )


def stack_file_store(home: Path, files: FileStoreSettings) -> FileStoreSettings:
    """Where the stack stores files: as configured, else in ``home/files`` on this disk. One
    machine's stack shares one disk, and a file kept there costs no write into PostgreSQL (at
    1,000,000 rows about 160 MB of WAL and 2-3 s before the split can start)."""
    if files.store:
        return files
    return files.model_copy(update={"store": f"file://{(home / 'files').resolve()}"})


def _metrics_port(metrics: MetricsSettings) -> str:
    """The worker's metrics port: the configured one, or another when it is taken (a worker
    that cannot serve its metrics exits, and the supervisor would start it again and again);
    "0" for none."""
    return str(metrics.port and free_port(metrics.port))


def _child_env(
    home: Path, settings: Settings, api: ApiSettings, metrics_port: str
) -> dict[str, str]:
    """The environment of the worker and the API: ours, with the stack's addresses."""
    # The configured tokens reach the children through the environment as they were written
    # (names included); without any, the stack's own token (named "api").
    own_token = {} if api.all_tokens() else {"SLUICE_API_TOKEN": api_token(home)}
    return {
        **os.environ,
        "SLUICE_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "SLUICE_DATABASE_URL": settings.database.url.get_secret_value(),
        "SLUICE_API_URL": settings.api.url,
        **own_token,
        "SLUICE_API_PORT": str(settings.api.port),
        "SLUICE_METRICS_PORT": metrics_port,
        "SLUICE_FILE_STORE": settings.files.store,
    }


def _stack_state(settings: Settings) -> StackState:
    """What ``stack.json`` says of a stack whose children run with ``settings``."""
    return StackState(
        kafka_bootstrap=settings.kafka.bootstrap,
        database_url=settings.database_url,
        api_url=settings.api.url,
        started_at=time.time(),
        importers=settings.pipeline.importers,
        workdir=str(Path.cwd()),
        file_store=settings.files.store,
    )


def _record(home: Path, state: StackState, supervisor: Supervisor) -> None:
    """``stack.json`` again, with what the supervisor saw last of every process."""
    state.components = supervisor.states
    state.pids = {"supervisor": os.getpid()}
    state.pids.update({name: c.pid for name, c in state.components.items()})
    write_state(home, state)


def _print_endpoints(logs: Path, metrics: MetricsSettings, metrics_port: str) -> None:
    """What ``sluice up`` prints after :func:`_print_connection`: the worker's metrics (unless
    it serves none) and the logs."""
    if metrics_port != "0":
        print(f"worker metrics on http://{metrics.host}:{metrics_port}/metrics")
    print(f"logs in {logs.resolve()}; Ctrl-C stops everything", flush=True)


def _pid_summary(states: Mapping[str, ComponentState]) -> str:
    return ", ".join(f"{name} pid {state.pid}" for name, state in states.items())


def _watch(supervisor: Supervisor, stop: _StopRequest) -> None:
    while not stop.requested:
        supervisor.check()
        time.sleep(CHECK_INTERVAL)


def _stop_stack(
    home: Path, broker: EmbeddedBroker, postgres: EmbeddedPostgres, children: list[SluiceProcess]
) -> None:
    """Everything down, in the reverse order of the starts; ``stack.json`` first, so no
    command finds a stack that is going away."""
    remove_state(home)
    for child in reversed(children):
        child.stop()
    postgres.stop()
    broker.stop()


def supervise(
    home: Path,
    pipeline: PipelineSettings,
    kafka: KafkaSettings,
    api: ApiSettings,
    metrics: MetricsSettings | None = None,
    files: FileStoreSettings | None = None,
) -> int:
    """Start everything, print how to connect, keep it running until Ctrl-C or SIGTERM."""
    from sluice.importers.registry import build_registry
    from sluice.worker import prepare

    metrics = metrics or MetricsSettings()
    home.mkdir(parents=True, exist_ok=True)
    if read_state(home) is not None:
        print(f"a stack is already running under {home.resolve()}; `sluice env` shows it")
        return 1
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    say = _event_printer(_event_logger(logs / EVENT_LOG))
    stop = _StopRequest()
    broker = EmbeddedBroker(free_port(DEFAULT_KAFKA_PORT), logs / "broker.log")
    postgres = EmbeddedPostgres(home / "pg", free_port(DEFAULT_PG_PORT), logs / "postgres.log")
    children: list[SluiceProcess] = []
    try:
        start_on_a_free_port(broker)
        start_on_a_free_port(postgres)
        api_port = free_port(api.port)
        files = stack_file_store(home, files or FileStoreSettings())
        settings = _child_settings(broker, postgres, pipeline, kafka, api, api_port, files)
        # The bundled importers only: a worker prepares the tables of SLUICE_IMPORTERS itself,
        # and a module there that fails to import must not keep the stack from starting (the
        # worker says why in its log, and is started again with backoff).
        asyncio.run(prepare(settings, build_registry()))
        metrics_port = _metrics_port(metrics)
        env = _child_env(home, settings, api, metrics_port)
        worker = SluiceProcess("worker", ["worker"], env, logs / "worker.log")
        api_proc = SluiceProcess("api", ["api", "--port", str(api_port)], env, logs / "api.log")
        children = [worker, api_proc]
        for child in children:
            child.start()
        state = _stack_state(settings)
        supervisor = Supervisor(
            {"broker": broker, "postgres": postgres, "worker": worker, "api": api_proc},
            say=say,
            on_change=lambda: _record(home, state, supervisor),
        )
        # The stack is announced (state file, `sluice up --detach` returning) once the API
        # answers, or has ended: then it is started again like any process that ends.
        _wait_for_api(api_proc, api_port, timeout=60, stopping=lambda: stop.requested)
        if stop.requested:
            return 0
        _record(home, state, supervisor)
        _print_connection(home, state, configured=lambda: bool(api.all_tokens()))
        _print_endpoints(logs, metrics, metrics_port)
        say(f"stack up: {_pid_summary(supervisor.states)}")
        _watch(supervisor, stop)
        return 0
    finally:
        _stop_stack(home, broker, postgres, children)


def start_detached(home: Path, timeout: float = 120) -> int:
    home.mkdir(parents=True, exist_ok=True)
    state = read_state(home)
    if state is not None:
        print(f"a stack is already running under {home.resolve()}")
        return 0
    try:
        require_embedded()
    except EmbeddedStackMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (home / "logs").mkdir(exist_ok=True)
    with (home / "logs" / "up.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", "up"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None:
            _print_connection(home, state, configured=lambda: bool(ApiSettings().all_tokens()))
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    print(f"the stack did not start; see {(home / 'logs' / 'up.log').resolve()}", file=sys.stderr)
    terminate(proc, timeout=60, name="sluice up")
    return 1


def stop_detached(home: Path, timeout: float = 60) -> int:
    state = read_state(home)
    if state is None:
        print(f"no stack is running under {home.resolve()}")
        return 0
    pid = state.pids["supervisor"]  # read_state checked it is alive
    if not terminate(pid, timeout=timeout, name="the supervisor"):
        print("the stack did not stop in time; it was killed", file=sys.stderr)
        return 1
    print("stopped")
    return 0


# --------------------------------------------------------------------------------------------
# sluice stack


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    clock = time.strftime("%H:%M:%S", time.localtime(ts))
    secs = now - ts
    if secs < 0:
        return f"{clock} (in {-secs:.0f} s)"
    return f"{clock} ({_duration(secs)} ago)"


def _duration(secs: float) -> str:
    if secs < 120:
        return f"{secs:.0f} s"
    if secs < 7200:
        return f"{secs / 60:.0f} min"
    return f"{secs / 3600:.1f} h"


def describe_stack(home: Path, state: StackState, now: float | None = None) -> list[str]:
    """``sluice stack``: one line for the stack, one per process (pid, status, restarts, how
    it last ended and when it was started again)."""
    now = time.time() if now is None else now
    supervisor = state.pids.get("supervisor", 0)
    lines = [
        f"stack under {home.resolve()}: supervisor pid {supervisor},"
        f" up since {_ago(state.started_at, now)}"
    ]
    for name, comp in state.components.items():
        status = comp.status.value
        if comp.status is ComponentStatus.RUNNING and not find_process_alive(comp.pid):
            status = "gone"  # ended since the supervisor last looked, or the supervisor is gone
        line = f"{name:<9} pid {comp.pid:<8} {status:<11} restarts {comp.restarts}"
        if comp.last_exit is not None:
            line += f"  last: {comp.last_exit} at {_ago(comp.last_exit_at, now)}"
        if comp.status is ComponentStatus.RESTARTING:
            line += f", next start at {_ago(comp.next_restart_at, now)}"
        elif comp.last_restart_at is not None:
            line += f", started again at {_ago(comp.last_restart_at, now)}"
        lines.append(line)
    return lines
