"""``sluice up`` / ``sluice down``: run the embedded stack and its processes under SLUICE_HOME."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import SecretStr

from sluice.config import (
    ApiSettings,
    DatabaseSettings,
    KafkaSettings,
    MetricsSettings,
    PipelineSettings,
    Settings,
)
from sluice.errors import EmbeddedStackMissing
from sluice.runtime import Runtime
from sluice.stack import (
    EmbeddedBroker,
    EmbeddedPostgres,
    StackState,
    api_token,
    find_process_alive,
    free_port,
    read_state,
    require_embedded,
    wait_for_port,
    write_state,
)

log = logging.getLogger(__name__)

DEFAULT_KAFKA_PORT = 9092
DEFAULT_PG_PORT = 5432
DEFAULT_API_PORT = 8000


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    out = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "sluice", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def supervise(
    home: Path,
    pipeline: PipelineSettings,
    kafka: KafkaSettings,
    api: ApiSettings,
    metrics: MetricsSettings | None = None,
) -> int:
    """Start everything, print how to connect, and wait for Ctrl-C or SIGTERM."""
    from sluice.worker import prepare

    metrics = metrics or MetricsSettings()

    home.mkdir(parents=True, exist_ok=True)
    if read_state(home) is not None:
        print(f"a stack is already running under {home.resolve()}; `sluice env` shows it")
        return 1
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    broker = EmbeddedBroker(free_port(DEFAULT_KAFKA_PORT), logs / "broker.log")
    postgres = EmbeddedPostgres(home / "pg", free_port(DEFAULT_PG_PORT), logs / "postgres.log")
    worker: subprocess.Popen[bytes] | None = None
    api_proc: subprocess.Popen[bytes] | None = None
    try:
        broker.start()
        postgres.start()
        api_port = free_port(api.port if api.port != DEFAULT_API_PORT else DEFAULT_API_PORT)
        api_url = f"http://127.0.0.1:{api_port}"
        # The configured tokens reach the children through the environment as they were
        # written (names included); without any, the stack's own token (named "api").
        own_token = {} if api.all_tokens() else {"SLUICE_API_TOKEN": api_token(home)}
        settings = Settings(
            kafka=kafka.model_copy(update={"bootstrap": broker.bootstrap}),
            database=DatabaseSettings(url=SecretStr(postgres.url)),
            api=api.model_copy(update={"url": api_url, "port": api_port}),
            pipeline=pipeline,
        )
        asyncio.run(prepare(Runtime(settings)))
        # The worker's metrics port: the configured one, or another when it is taken (a worker
        # that cannot serve its metrics exits, and this loop would start it again and again).
        metrics_port = str(metrics.port and free_port(metrics.port))
        env = {
            **os.environ,
            "SLUICE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SLUICE_DATABASE_URL": postgres.url,
            "SLUICE_API_URL": api_url,
            **own_token,
            "SLUICE_API_PORT": str(api_port),
            "SLUICE_METRICS_PORT": metrics_port,
        }
        worker = _spawn(["worker"], env, logs / "worker.log")
        api_proc = _spawn(["api", "--port", str(api_port)], env, logs / "api.log")
        # The stack is announced (state file, `sluice up --detach` returning) once it answers.
        wait_for_port("127.0.0.1", api_port, timeout=60)
        state = StackState(
            kafka_bootstrap=broker.bootstrap,
            database_url=postgres.url,
            api_url=api_url,
            pids={
                "supervisor": os.getpid(),
                "broker": broker.pid or 0,
                "postgres": postgres.pid or 0,
                "worker": worker.pid,
                "api": api_proc.pid,
            },
            started_at=time.time(),
        )
        write_state(home, state)
        print(f"SLUICE_KAFKA_BOOTSTRAP={broker.bootstrap}")
        print(f"SLUICE_DATABASE_URL={postgres.url}")
        print(f"SLUICE_API_URL={api_url}")
        if metrics_port != "0":
            print(f"worker metrics on http://{metrics.host}:{metrics_port}/metrics")
        print(f"logs in {logs.resolve()}; Ctrl-C stops everything", flush=True)
        while not stopping:
            time.sleep(0.3)
            if worker.poll() is not None and not stopping:
                log.warning("worker exited with %s; starting a new one", worker.returncode)
                if metrics.port:  # its port again, unless another process took it meanwhile
                    env["SLUICE_METRICS_PORT"] = str(free_port(int(env["SLUICE_METRICS_PORT"])))
                worker = _spawn(["worker"], env, logs / "worker.log")
                state.pids["worker"] = worker.pid
                write_state(home, state)
        return 0
    finally:
        (home / "stack.json").unlink(missing_ok=True)
        _stop(api_proc)
        _stop(worker)
        postgres.stop()
        broker.stop()


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
    out = (home / "logs" / "up.log").open("ab")
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
            print(f"SLUICE_KAFKA_BOOTSTRAP={state.kafka_bootstrap}")
            print(f"SLUICE_DATABASE_URL={state.database_url}")
            print(f"SLUICE_API_URL={state.api_url}")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    print(f"the stack did not start; see {(home / 'logs' / 'up.log').resolve()}", file=sys.stderr)
    _stop(proc)
    return 1


def stop_detached(home: Path, timeout: float = 60) -> int:
    state = read_state(home)
    if state is None:
        print(f"no stack is running under {home.resolve()}")
        return 0
    pid = state.pids.get("supervisor", 0)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and find_process_alive(pid):
        time.sleep(0.2)
    if find_process_alive(pid):
        print("the stack did not stop in time; killing it", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
        return 1
    print("stopped")
    return 0
