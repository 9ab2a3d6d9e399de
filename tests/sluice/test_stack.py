"""The embedded stack: real Tansu broker and real PostgreSQL processes, no mocks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sluice.stack import (
    PG_SYSTEM_USER,
    EmbeddedBroker,
    EmbeddedPostgres,
    StackState,
    find_process_alive,
    free_port,
    read_state,
    start_on_a_free_port,
    wait_for_port,
    write_state,
)
from tests.support import ports


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ ports


def test_free_port_prefers_the_given_port_when_free() -> None:
    port = free_port()
    assert free_port(port) == port


def test_free_port_falls_back_when_taken() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        other = free_port(taken)
        assert other != taken
        wait_for_port("127.0.0.1", taken, timeout=1)


def test_the_tests_ports_lie_below_the_ephemeral_range_in_a_block_per_test_process() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    blocks = [ports.block(f"gw{i}") for i in range(4)]
    assert ports.block("") == blocks[0]
    for i, mine in enumerate(blocks):
        assert mine.stop <= low, f"{mine} reaches into the ephemeral range from {low}"
        for theirs in blocks[i + 1 :]:
            assert not set(mine) & set(theirs), f"{mine} and {theirs} share ports"
    chosen = ports.free_port()
    assert chosen in ports.block(os.environ.get("PYTEST_XDIST_WORKER", ""))


def test_the_tests_ports_skip_one_something_listens_on() -> None:
    with socket.socket() as listener:
        # As servers do: a port this test used a moment ago may be in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", ports.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        counting = ports.Ports(range(taken, taken + 2))
        assert [counting.free_port() for _ in range(3)] == [taken + 1] * 3
        wait_for_port("127.0.0.1", taken, timeout=1)


def test_wait_for_port_times_out() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    assert time.monotonic() - started < 2


# ------------------------------------------------------------------------------ broker


async def _roundtrip(bootstrap: str) -> bytes:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # Tansu does not create topics on first use.
        await admin.create_topics([NewTopic("stack-test", num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("stack-test", b"hello", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition("stack-test", 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        record = await asyncio.wait_for(consumer.getone(), timeout=10)
        assert record.key == b"k"
        return bytes(record.value or b"")
    finally:
        await consumer.stop()


@pytest.mark.stack
@pytest.mark.embedded
def test_broker_produce_consume_stop(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    broker.start()
    try:
        assert broker.running
        assert broker.pid is not None and find_process_alive(broker.pid)
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert asyncio.run(_roundtrip(broker.bootstrap)) == b"hello"
    finally:
        broker.stop()
    assert not broker.running
    assert not _port_open(broker.port)
    assert (tmp_path / "broker.log").read_text().strip()


@pytest.mark.stack
@pytest.mark.embedded
def test_broker_kill_and_busy_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    broker.start()
    pid = broker.pid
    assert pid is not None
    broker.kill()
    assert not broker.running
    assert not find_process_alive(pid)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = EmbeddedBroker(listener.getsockname()[1], tmp_path / "busy.log")
        with pytest.raises(RuntimeError, match="already in use"):
            busy.start()
        assert not busy.running


@pytest.mark.stack
@pytest.mark.embedded
def test_a_port_taken_after_it_was_chosen_moves_the_server(tmp_path: Path) -> None:
    """Two stacks starting at once can both be told a port is free: the one that binds it
    second starts elsewhere, and its address says where."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        broker = EmbeddedBroker(taken, tmp_path / "broker.log")
        start_on_a_free_port(broker)
        try:
            assert broker.port != taken
            assert broker.bootstrap == f"127.0.0.1:{broker.port}"
            assert asyncio.run(_roundtrip(broker.bootstrap)) == b"hello"
        finally:
            broker.stop()


class _NeverStarts(EmbeddedBroker):
    """A broker whose start always fails as a crashed one does (without a process)."""

    def __init__(self, port: int, log_path: Path) -> None:
        super().__init__(port, log_path)
        self.tried: list[int] = []

    def start(self) -> None:
        self.tried.append(self.port)
        raise RuntimeError("broker exited with code 1 during start")


def test_only_a_port_someone_else_listens_on_moves_a_server(tmp_path: Path) -> None:
    port = free_port()
    failing = _NeverStarts(port, tmp_path / "broker.log")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        start_on_a_free_port(failing)
    assert failing.tried == [port]  # the port is free: the failure is the server's own

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        failing = _NeverStarts(taken, tmp_path / "broker.log")
        with pytest.raises(RuntimeError, match="exited with code 1"):
            start_on_a_free_port(failing, attempts=3)
    assert failing.tried[0] == taken and len(failing.tried) == 2
    assert failing.tried[1] != taken


# ------------------------------------------------------------------------------ postgres


async def _query(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        if sql.lstrip().upper().startswith("SELECT"):
            return await conn.fetchval(sql)
        # Simple-query protocol: several statements at once.
        return await conn.execute(sql)
    finally:
        await conn.close()


def _sql(pg: EmbeddedPostgres, sql: str) -> object:
    return asyncio.run(_query(pg.url, sql))


@pytest.mark.stack
@pytest.mark.embedded
def test_postgres_restart_keeps_data_and_survives_kill(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    pg = EmbeddedPostgres(data, free_port(), tmp_path / "pg.log")
    pg.start()
    try:
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/sluice"
        assert (data / "PG_VERSION").exists()
        assert _sql(pg, "SELECT 1") == 1
        _sql(pg, "CREATE TABLE kept (id int); INSERT INTO kept VALUES (42)")

        # Clean stop, restart on the same directory: data is still there.
        pg.stop()
        assert not pg.running
        assert not _port_open(pg.port)
        pg.start()
        assert _sql(pg, "SELECT id FROM kept") == 42

        # Crash: the pid file stays behind with a dead pid; the next start recovers.
        _sql(pg, "INSERT INTO kept VALUES (43)")
        killed = pg.pid
        assert killed is not None
        pg.kill()
        assert not pg.running and not find_process_alive(killed)
        assert (data / "postmaster.pid").exists()
        pg.start()
        assert pg.pid != killed
        assert _sql(pg, "SELECT count(*) FROM kept") == 2
        pg.stop()

        # A pid file naming a live process that is not a postmaster (pid reuse after a reboot).
        with subprocess.Popen(["sleep", "30"]) as other:
            try:
                (data / "postmaster.pid").write_text(f"{other.pid}\n{data}\n")
                pg.start()
                assert _sql(pg, "SELECT count(*) FROM kept") == 2
            finally:
                other.kill()
    finally:
        pg.stop()
    assert not pg.running


@pytest.mark.embedded
@pytest.mark.stack
def test_postgres_clears_stale_lock_files_and_never_a_live_servers(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    pg = EmbeddedPostgres(data, free_port(), tmp_path / "pg.log")
    pg.start()
    try:
        lock = pg.socket_lock
        assert int(lock.read_text().split()[0]) == pg.pid
        # A second server on the same data is refused; the live server keeps its files.
        other = EmbeddedPostgres(data, pg.port, tmp_path / "other.log")
        with pytest.raises(RuntimeError, match="already running"):
            other.start()
        assert lock.exists() and (data / "postmaster.pid").exists()
        assert _sql(pg, "SELECT 1") == 1
        pg.stop()

        # Left by a crash, naming a pid that is now another process of the server's user (a
        # reused pid, or the dead server as a zombie nobody reaped): PostgreSQL itself refuses
        # to start ("Is another postmaster (PID n) running?").
        as_server = {"user": PG_SYSTEM_USER} if os.geteuid() == 0 else {}
        with subprocess.Popen(["sleep", "30"], **as_server) as squatter:  # type: ignore[call-overload]
            try:
                pg.socket_dir.mkdir(exist_ok=True)
                for path in (data / "postmaster.pid", lock):
                    path.write_text(f"{squatter.pid}\n{data}\n")
                pg.start()
                assert int(lock.read_text().split()[0]) == pg.pid
                assert _sql(pg, "SELECT 1") == 1
            finally:
                squatter.kill()
    finally:
        pg.stop()


@pytest.mark.embedded
@pytest.mark.stack
async def test_postgres_start_from_inside_an_event_loop(tmp_path: Path) -> None:
    # start() is sync; called from async code it must not trip over the running loop.
    pg = EmbeddedPostgres(tmp_path / "pgdata", free_port(), tmp_path / "pg.log")
    pg.start()
    try:
        assert await _query(pg.url, "SELECT current_database()") == "sluice"
    finally:
        pg.stop()


# ------------------------------------------------------------------------------ state file


def _state(supervisor: int) -> StackState:
    return StackState(
        kafka_bootstrap="127.0.0.1:19092",
        database_url="postgresql://postgres@127.0.0.1:15432/sluice",
        api_url="http://127.0.0.1:8000",
        pids={"broker": 11, "postgres": 12, "worker": 13, "api": 14, "supervisor": supervisor},
        started_at=time.time(),
    )


def test_state_round_trip(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert read_state(home) is None
    state = _state(os.getpid())
    write_state(home, state)
    assert (home / "stack.json").exists()
    assert read_state(home) == state


def test_state_with_dead_supervisor_is_removed(tmp_path: Path) -> None:
    write_state(tmp_path, _state(_dead_pid()))
    assert read_state(tmp_path) is None
    assert not (tmp_path / "stack.json").exists()


def test_unreadable_state_is_removed(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{not json")
    assert read_state(tmp_path) is None
    assert not (tmp_path / "stack.json").exists()


def test_find_process_alive() -> None:
    assert find_process_alive(os.getpid())
    assert not find_process_alive(_dead_pid())
    assert not find_process_alive(0)
