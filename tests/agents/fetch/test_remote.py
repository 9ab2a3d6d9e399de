"""FTP and SFTP sources against real local servers: pyftpdlib in a thread and asyncssh in the
test's event loop, each serving a folder of tmp_path with password authentication."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

from sluice.agents.fetch.remote import CHUNK_BYTES, finish_remote, open_remote
from sluice.errors import SourceError, SourceUnavailable
from sluice.schemas.sources import FtpSource

USER = "alice"
PASSWORD = "pw-Sup3r-s3cret!"
SECRETS = {"REMOTE_USER": USER, "REMOTE_PASSWORD": PASSWORD}
NEWEST = random.Random(11).randbytes(2 * CHUNK_BYTES + 4321)
NOW = time.time()


@dataclass
class Server:
    """A running FTP or SFTP server; ``root`` is the local folder it serves as "/"."""

    protocol: str
    port: int
    root: Path
    known_hosts: Path | None = None

    def source(self, **overrides: Any) -> FtpSource:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "protocol": self.protocol,
            "port": self.port,
            "folder": "/in",
            "pattern": "orders-*.csv",
            "user_env": "REMOTE_USER",
            "password_env": "REMOTE_PASSWORD",
            "known_hosts": str(self.known_hosts) if self.known_hosts else None,
            "timeout": 5.0,
        }
        return FtpSource(**(settings | overrides))


def fill(root: Path) -> None:
    """/in holds three orders files (the newest is not the greatest name), a newer file that
    does not match, and a newer folder that matches the pattern but is no file."""
    folder = root / "in"
    folder.mkdir(parents=True)
    files = {
        "orders-1.csv": (b"id\n1\n", NOW - 3000),
        "orders-2.csv": (NEWEST, NOW - 1000),
        "orders-3.csv": (b"id\n3\n", NOW - 2000),
        "notes.txt": (b"newer, but not an orders file", NOW - 10),
    }
    for name, (data, mtime) in files.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, (mtime, mtime))
    (folder / "orders-9.csv").mkdir()
    os.utime(folder / "orders-9.csv", (NOW, NOW))


class QuickHandler(FTPHandler):
    auth_failed_timeout = 0.01  # pyftpdlib waits 3 s after a wrong password by default


class OldHandler(QuickHandler):
    """A server without MLSD and MLST: listing falls back to LIST, times to MDTM."""

    proto_cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k not in ("MLSD", "MLST")}


@contextmanager
def ftp_server(root: Path, handler: type[FTPHandler] = QuickHandler) -> Iterator[Server]:
    authorizer = DummyAuthorizer()
    authorizer.add_user(USER, PASSWORD, str(root), perm="elradfmwMT")

    class Handler(handler):  # type: ignore[valid-type,misc]
        pass

    Handler.authorizer = authorizer
    ioloop = IOLoop()
    server = FTPServer(("127.0.0.1", 0), Handler, ioloop=ioloop)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ioloop.loop(0.02, blocking=False)
        server.close_all()

    thread = threading.Thread(target=serve, name="ftp-server", daemon=True)
    thread.start()
    try:
        yield Server("ftp", server.address[1], root)
    finally:
        stop.set()
        thread.join(10)


class SshServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USER and password == PASSWORD


@pytest.fixture(params=["ftp", "sftp"])
async def remote(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    root = tmp_path / "remote"
    fill(root)
    if request.param == "ftp":
        with ftp_server(root) as server:
            yield server
        return
    key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.create_server(
        SshServer,
        "127.0.0.1",
        0,
        server_host_keys=[key],
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
    )
    port = acceptor.sockets[0].getsockname()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_bytes(f"[127.0.0.1]:{port} ".encode() + key.export_public_key())
    try:
        yield Server("sftp", port, root, known_hosts)
    finally:
        acceptor.close()
        await acceptor.wait_closed()


async def fetch(source: FtpSource, params: dict[str, Any] | None = None) -> tuple[str, str, bytes]:
    """(name, location, bytes) of the file open_remote picks; checks the chunk size too."""
    async with open_remote(source, params or {}, SECRETS) as fetched:
        chunks = [chunk async for chunk in fetched.chunks]
    assert all(0 < len(chunk) <= CHUNK_BYTES for chunk in chunks)
    assert fetched.location is not None
    return fetched.name, fetched.location, b"".join(chunks)


async def test_the_newest_match_is_imported(remote: Server) -> None:
    name, location, data = await fetch(remote.source())
    assert (name, location) == ("orders-2.csv", "/in/orders-2.csv")
    assert data == NEWEST


async def test_equal_times_pick_the_greater_name(remote: Server) -> None:
    for name in ("orders-2.csv", "orders-3.csv"):
        os.utime(remote.root / "in" / name, (NOW - 500, NOW - 500))
    assert (await fetch(remote.source()))[0] == "orders-3.csv"


async def test_the_trigger_names_a_file_or_a_pattern(remote: Server) -> None:
    assert await fetch(remote.source(), {"file": "orders-1.csv"}) == (
        "orders-1.csv",
        "/in/orders-1.csv",
        b"id\n1\n",
    )
    assert (await fetch(remote.source(), {"pattern": "*.txt"}))[0] == "notes.txt"
    assert (await fetch(remote.source(pattern=None, file="orders-3.csv")))[2] == b"id\n3\n"
    with pytest.raises(SourceError, match="not both"):
        await fetch(remote.source(), {"file": "orders-1.csv", "pattern": "*"})
    with pytest.raises(SourceError, match="'file' or a 'pattern'"):
        await fetch(remote.source(pattern=None))


@pytest.mark.parametrize("name", ["../secret.txt", "../../etc/passwd", "..", "sub/a.csv"])
async def test_a_file_must_be_a_plain_name(remote: Server, name: str) -> None:
    (remote.root / "secret.txt").write_text("not for you")
    with pytest.raises(SourceError, match="plain file name"):
        await fetch(remote.source(), {"file": name})
    with pytest.raises(SourceError, match="plain file name"):
        await fetch(remote.source(pattern=None, file=name))


async def test_an_empty_file_has_no_chunks(remote: Server) -> None:
    (remote.root / "in" / "empty.csv").touch()
    assert await fetch(remote.source(), {"file": "empty.csv"}) == (
        "empty.csv",
        "/in/empty.csv",
        b"",
    )


async def test_missing_files_and_folders(remote: Server) -> None:
    with pytest.raises(SourceError, match=r"orders-7\.csv"):
        await fetch(remote.source(), {"file": "orders-7.csv"})
    with pytest.raises(SourceError, match=r"no file in the folder '/in' .* pattern 'x-\*.csv'"):
        await fetch(remote.source(pattern="x-*.csv"))
    with pytest.raises(SourceError, match="/nowhere"):
        await fetch(remote.source(folder="/nowhere"))


async def test_move_is_idempotent(remote: Server) -> None:
    source = remote.source(after="move", move_to="/done/2024")
    _, location, _ = await fetch(source)
    assert await finish_remote(source, location, SECRETS) == (
        "moved /in/orders-2.csv to /done/2024/orders-2.csv"
    )
    assert not (remote.root / "in" / "orders-2.csv").exists()
    assert (remote.root / "done" / "2024" / "orders-2.csv").read_bytes() == NEWEST
    again = await finish_remote(source, location, SECRETS)
    assert again == "/in/orders-2.csv was already moved to /done/2024/orders-2.csv"
    # The next newest is picked once the first one has been moved away.
    assert (await fetch(source))[0] == "orders-3.csv"


async def test_move_replaces_an_older_file_of_the_same_name(remote: Server) -> None:
    (remote.root / "done").mkdir()
    (remote.root / "done" / "orders-1.csv").write_text("yesterday's")
    source = remote.source(after="move", move_to="/done")
    assert (await finish_remote(source, "/in/orders-1.csv", SECRETS)).startswith(
        "moved /in/orders-1.csv to /done/orders-1.csv"
    )
    assert (remote.root / "done" / "orders-1.csv").read_bytes() == b"id\n1\n"


async def test_move_of_a_file_gone_everywhere_fails(remote: Server) -> None:
    source = remote.source(after="move", move_to="/done")
    with pytest.raises(SourceError, match="gone"):
        await finish_remote(source, "/in/orders-8.csv", SECRETS)


async def test_delete_and_keep(remote: Server) -> None:
    keep = remote.source()
    assert await finish_remote(keep, "/in/orders-2.csv", SECRETS) == "kept /in/orders-2.csv"
    assert (remote.root / "in" / "orders-2.csv").exists()
    delete = remote.source(after="delete")
    assert await finish_remote(delete, "/in/orders-2.csv", SECRETS) == "deleted /in/orders-2.csv"
    assert not (remote.root / "in" / "orders-2.csv").exists()
    again = await finish_remote(delete, "/in/orders-2.csv", SECRETS)
    assert again == "/in/orders-2.csv was already deleted"


async def test_finish_stays_in_the_folder(remote: Server) -> None:
    for location in ("/etc/passwd", "/in/../etc/passwd", "/in/..", "/in/", "orders-1.csv"):
        with pytest.raises(SourceError, match="not a file of the source folder"):
            await finish_remote(remote.source(after="delete"), location, SECRETS)
    assert (remote.root / "in" / "orders-1.csv").exists()


async def test_wrong_password_says_what_to_check(remote: Server) -> None:
    wrong = "wrong-Pa55word"
    with pytest.raises(SourceError) as caught:
        async with open_remote(remote.source(), {}, {**SECRETS, "REMOTE_PASSWORD": wrong}):
            pass
    message = str(caught.value)
    assert f"authentication failed for user '{USER}' at 127.0.0.1:{remote.port}" in message
    assert "REMOTE_USER and REMOTE_PASSWORD" in message
    assert wrong not in message and PASSWORD not in message
    shown = "".join(traceback.format_exception(caught.value))
    assert wrong not in shown and PASSWORD not in shown


async def test_an_unset_variable_is_named(remote: Server) -> None:
    with pytest.raises(SourceError, match="REMOTE_PASSWORD is not set"):
        async with open_remote(remote.source(), {}, {"REMOTE_USER": USER}):
            pass


async def test_leaving_early_closes_cleanly(remote: Server) -> None:
    async with open_remote(remote.source(), {}, SECRETS) as fetched:
        first = await anext(fetched.chunks)
    assert first and NEWEST.startswith(first)
    assert (await fetch(remote.source()))[2] == NEWEST


@pytest.mark.parametrize("protocol", ["ftp", "sftp"])
async def test_unreachable_host_is_transient(protocol: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = FtpSource(
        host="127.0.0.1",
        protocol=protocol,
        port=port,
        file="a.csv",
        user_env="REMOTE_USER",
        insecure_any_host_key=True,
    )
    with pytest.raises(SourceUnavailable, match=f"127.0.0.1:{port}"):
        async with open_remote(source, {}, SECRETS):
            pass


@pytest.mark.parametrize("protocol", ["ftp", "sftp"])
async def test_a_silent_server_times_out(protocol: str) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        source = FtpSource(
            host="127.0.0.1",
            protocol=protocol,
            port=silent.getsockname()[1],
            file="a.csv",
            user_env="REMOTE_USER",
            insecure_any_host_key=True,
            timeout=0.3,
        )
        started = time.monotonic()
        with pytest.raises(SourceUnavailable):
            async with open_remote(source, {}, SECRETS):
                pass
        assert time.monotonic() - started < 5


async def test_ftp_without_mlsd_uses_mdtm(tmp_path: Path) -> None:
    fill(tmp_path)
    # Both in the same minute: LIST cannot tell them apart, MDTM can (and the newer one is
    # the smaller name, so a tie would pick the wrong file).
    minute = (int(NOW) // 60) * 60 - 3600
    os.utime(tmp_path / "in" / "orders-1.csv", (minute + 40, minute + 40))
    os.utime(tmp_path / "in" / "orders-3.csv", (minute + 10, minute + 10))
    os.utime(tmp_path / "in" / "orders-2.csv", (minute - 600, minute - 600))
    with ftp_server(tmp_path, OldHandler) as server:
        assert await fetch(server.source()) == ("orders-1.csv", "/in/orders-1.csv", b"id\n1\n")
        source = server.source(after="move", move_to="/done")
        await finish_remote(source, "/in/orders-1.csv", SECRETS)
        assert "already" in await finish_remote(source, "/in/orders-1.csv", SECRETS)
        assert (tmp_path / "done" / "orders-1.csv").exists()


async def test_anonymous_ftp_refused_says_to_set_credentials(tmp_path: Path) -> None:
    fill(tmp_path)
    with ftp_server(tmp_path) as server:
        source = server.source(user_env=None, password_env=None)
        with pytest.raises(SourceError, match=r"anonymous user .* set user_env and password_env"):
            await fetch(source)


@pytest.mark.parametrize("remote", ["sftp"], indirect=True)
async def test_sftp_needs_known_hosts_or_the_insecure_flag(remote: Server) -> None:
    with pytest.raises(SourceError, match="set known_hosts"):
        await fetch(remote.source(known_hosts=None))
    insecure = remote.source(known_hosts=None, insecure_any_host_key=True)
    assert (await fetch(insecure))[0] == "orders-2.csv"


@pytest.mark.parametrize("remote", ["sftp"], indirect=True)
async def test_sftp_refuses_an_unknown_host_key(remote: Server, tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_bytes(f"[127.0.0.1]:{remote.port} ".encode() + other)
    with pytest.raises(SourceError, match=r"host key of 127\.0\.0\.1:.* not in the known_hosts"):
        await fetch(remote.source(known_hosts=str(wrong)))
    with pytest.raises(SourceError, match="cannot read the known_hosts file"):
        await fetch(remote.source(known_hosts=str(tmp_path / "missing")))
