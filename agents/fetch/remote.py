"""FTP and SFTP pull sources: pick a remote file, stream it, then keep, move or delete it.

``open_remote`` chooses the file (the one named, or the newest match of a pattern) and streams
it in chunks of at most ``CHUNK_BYTES`` bytes; ``finish_remote`` runs after the import succeeded.
Both protocols sit behind ``_Remote``, so choosing, moving and deleting are written once.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Any, Protocol

import aioftp
import asyncssh

from sluice.agents.fetch.base import Fetched, Secrets, secret
from sluice.errors import SourceError, SourceUnavailable
from sluice.schemas.sources import FtpSource

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
FTP_PORT = 21
SFTP_PORT = 22

# Characters that would let a name leave ``folder`` or smuggle a second FTP command.
_UNSAFE_NAME_CHARS = ("/", "\\", "\0", "\r", "\n")
_FTP_TIME = re.compile(r"^(\d{14})(\.\d+)?$")


@dataclass(frozen=True)
class _Candidate:
    name: str
    mtime: float


class _Remote(Protocol):
    """The few operations the FTP and SFTP connections share."""

    where: str

    async def list_files(self, folder: str, pattern: str) -> list[_Candidate]:
        """Regular files in ``folder`` whose names match ``pattern``, with their mtimes."""
        ...

    def download(self, path: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open ``path`` now (a missing file fails here), stream it in the context."""
        ...

    async def exists(self, path: str) -> bool: ...

    async def makedirs(self, path: str) -> None: ...

    async def rename(self, source: str, target: str) -> None: ...

    async def remove(self, path: str) -> None: ...


@asynccontextmanager
async def open_remote(
    source: FtpSource, params: Mapping[str, Any], secrets: Secrets
) -> AsyncIterator[Fetched]:
    """Fetch the file ``source`` (or the trigger's ``params``) names from the FTP/SFTP server.

    ``params`` may give ``file`` (a plain name in ``source.folder``) or ``pattern`` (the newest
    match wins). ``location`` of the result is the full remote path, for ``finish_remote``."""
    file, pattern = _selection(source, params)
    async with _connect(source, secrets) as remote:
        if file is not None:
            path = posixpath.join(source.folder, file)
        else:
            assert pattern is not None
            path = await _newest(remote, source.folder, pattern)
        logger.info("fetching %s from %s", path, remote.where)
        async with remote.download(path) as chunks:
            yield Fetched(name=posixpath.basename(path), chunks=chunks, location=path)


async def finish_remote(source: FtpSource, location: str, secrets: Secrets) -> str:
    """Apply ``source.after`` to the imported file at ``location``; say what was done.

    Safe to run twice: a file already moved or deleted counts as done."""
    # ``location`` comes back from a stored run: it may only name a file of this source's folder.
    parent, name = posixpath.split(location)
    folder = posixpath.normpath(source.folder)
    if not _is_plain_name(name) or posixpath.normpath(parent or ".") != folder:
        raise SourceError(
            f"cannot finish {location!r}: it is not a file of the source folder {source.folder!r}"
        )
    if source.after == "keep":
        return f"kept {location}"
    async with _connect(source, secrets) as remote:
        if source.after == "delete":
            result = await _delete(remote, location)
        else:
            assert source.move_to is not None  # FtpSource checks this
            result = await _move(remote, location, source.move_to)
    logger.info("%s on %s", result, remote.where)
    return result


def _selection(source: FtpSource, params: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(file, pattern), exactly one set: the trigger's choice wins over the importer's."""
    file, pattern = params.get("file"), params.get("pattern")
    for key, value in (("file", file), ("pattern", pattern)):
        if value is not None and (not isinstance(value, str) or not value):
            raise SourceError(f"the trigger's {key!r} must be a non-empty string, not {value!r}")
    if file is not None and pattern is not None:
        raise SourceError("give the trigger either 'file' or 'pattern', not both")
    origin = "the trigger's"
    if file is None and pattern is None:
        file, pattern, origin = source.file, source.pattern, "the importer's"
        if file is not None:
            pattern = None
    if file is not None:
        if not _is_plain_name(file):
            raise SourceError(
                f"{origin} file {file!r} must be a plain file name inside {source.folder!r} "
                "(no '/', '\\' or '..'); set the folder in the importer"
            )
        return file, None
    if pattern is not None:
        if any(c in pattern for c in _UNSAFE_NAME_CHARS):
            raise SourceError(
                f"{origin} pattern {pattern!r} matches file names inside {source.folder!r} "
                "and cannot contain '/' or '\\'; set the folder in the importer"
            )
        return None, pattern
    raise SourceError(
        f"nothing to fetch from {source.host}: give a 'file' or a 'pattern', "
        "in the importer's FtpSource or in the trigger"
    )


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in _UNSAFE_NAME_CHARS)


async def _newest(remote: _Remote, folder: str, pattern: str) -> str:
    candidates = await remote.list_files(folder, pattern)
    if not candidates:
        raise SourceError(
            f"no file in the folder {folder!r} on {remote.where} matches the pattern {pattern!r}"
        )
    # Equal mtimes happen (coarse server clocks, files written together): the greater name wins
    # so that the choice is the same every time.
    best = max(candidates, key=lambda c: (c.mtime, c.name))
    return posixpath.join(folder, best.name)


async def _move(remote: _Remote, location: str, folder: str) -> str:
    target = posixpath.join(folder, posixpath.basename(location))
    await remote.makedirs(folder)
    if not await remote.exists(location):
        if await remote.exists(target):
            return f"{location} was already moved to {target}"
        raise SourceError(
            f"cannot move {location} to {target} on {remote.where}: the file is gone "
            "and is not in the target folder either (was it moved or deleted by someone else?)"
        )
    try:
        await remote.rename(location, target)
        return f"moved {location} to {target}"
    except SourceError:
        # Another finish running at the same time may have moved it meanwhile.
        if not await remote.exists(location):
            if await remote.exists(target):
                return f"{location} was already moved to {target}"
            raise
        # Some servers refuse to replace an existing file; a file of the same name imported
        # earlier is replaced, as a move on a local disk would.
        if not await remote.exists(target):
            raise
    await remote.remove(target)
    await remote.rename(location, target)
    return f"moved {location} to {target}, replacing the file there"


async def _delete(remote: _Remote, location: str) -> str:
    if not await remote.exists(location):
        return f"{location} was already deleted"
    try:
        await remote.remove(location)
    except SourceError:
        if await remote.exists(location):
            raise
        return f"{location} was already deleted"
    return f"deleted {location}"


def _connect(source: FtpSource, secrets: Secrets) -> AbstractAsyncContextManager[_Remote]:
    if source.protocol == "sftp":
        return _connect_sftp(source, secrets)
    return _connect_ftp(source, secrets)


def _auth_failed(source: FtpSource, user: str | None, where: str) -> SourceError:
    if source.user_env is None:
        return SourceError(
            f"authentication failed for the anonymous user at {where}: the server wants a "
            "login; set user_env and password_env to the variables holding user and password"
        )
    variables = " and ".join(v for v in (source.user_env, source.password_env) if v)
    return SourceError(
        f"authentication failed for user {user!r} at {where}: check the values of the "
        f"environment variables {variables} on the workers"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- FTP -----------------------------------------------------------------------------------


def _ftp_reply(exc: aioftp.StatusCodeError) -> str:
    info = exc.info if isinstance(exc.info, str) else " ".join(exc.info)
    return f"{exc.received_codes[-1]} {info.strip()}".strip()


@contextmanager
def _ftp_errors(where: str, what: str) -> Iterator[None]:
    """Library failures as Sluice's: 4xx replies and network trouble may pass, 5xx will not."""
    try:
        yield
    except aioftp.StatusCodeError as exc:
        if exc.received_codes[-1].matches("4xx"):
            raise SourceUnavailable(f"{what} on {where}: {_ftp_reply(exc)}") from exc
        raise SourceError(f"{what} on {where}: the server answered {_ftp_reply(exc)}") from exc
    except (OSError, TimeoutError) as exc:
        raise SourceUnavailable(f"{what} on {where}: {_describe(exc)}") from exc
    except ValueError as exc:  # aioftp could not parse a reply or a listing line
        raise SourceError(f"{what} on {where}: unexpected answer from the server ({exc})") from exc


def _parse_ftp_time(value: str | None) -> float | None:
    """Seconds since the epoch from an MLSD ``modify`` fact or an MDTM reply (UTC)."""
    match = _FTP_TIME.match((value or "").strip())
    if match is None:
        return None
    moment = datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    return moment.timestamp() + float(match.group(2) or 0)


def _login(
    source: FtpSource, secrets: Secrets, default_port: int, protocol: str
) -> tuple[int, str, str | None, str | None]:
    """The port, ``host:port`` for messages, and the user and password from their settings."""
    port = source.port or default_port
    where = f"{source.host}:{port}"
    user = secret(secrets, source.user_env, f"{protocol} user for {where}")
    password = secret(secrets, source.password_env, f"{protocol} password for {where}")
    return port, where, user, password


@asynccontextmanager
async def _connect_ftp(source: FtpSource, secrets: Secrets) -> AsyncIterator[_Remote]:
    port, where, user, password = _login(source, secrets, FTP_PORT, "FTP")
    client = aioftp.Client(
        socket_timeout=source.timeout,
        connection_timeout=source.timeout,
        path_timeout=source.timeout,
    )
    try:
        with _ftp_errors(where, "cannot connect to the FTP server"):
            await client.connect(source.host, port)
        with _ftp_errors(where, "cannot log in"):
            try:
                await client.login(user or "anonymous", password or ("" if user else "anon@"))
            except aioftp.StatusCodeError as exc:
                if exc.received_codes[-1].matches("530"):
                    raise _auth_failed(source, user, where) from None
                raise
        yield _FtpRemote(client, where)
    finally:
        # QUIT is a courtesy: after an abandoned transfer the server may answer otherwise.
        with suppress(Exception):
            await asyncio.wait_for(client.quit(), source.timeout)
        client.close()


class _FtpRemote:
    # Data connections are opened here rather than through aioftp's list() and
    # download_stream(): those leave the connection open when the server refuses the command.

    def __init__(self, client: aioftp.Client, where: str) -> None:
        self.client = client
        self.where = where

    async def list_files(self, folder: str, pattern: str) -> list[_Candidate]:
        with _ftp_errors(self.where, f"cannot list the folder {folder!r}"):
            entries, from_mlsd = await self._entries(folder)
            candidates = []
            for name, info in entries:
                if info.get("type") != "file" or not fnmatchcase(name, pattern):
                    continue
                # MLSD's modify fact is exact; LIST shows minutes at best, so MDTM comes first.
                mtime = _parse_ftp_time(str(info.get("modify"))) if from_mlsd else None
                if mtime is None:
                    mtime = await self._mdtm(posixpath.join(folder, name))
                if mtime is None:
                    mtime = _parse_ftp_time(str(info.get("modify"))) or 0.0
                candidates.append(_Candidate(name, mtime))
        return candidates

    async def _entries(self, folder: str) -> tuple[list[tuple[str, Mapping[str, object]]], bool]:
        """(name, facts) of everything in ``folder``, and whether MLSD (not LIST) gave them."""
        parse: Callable[[bytes], tuple[PurePosixPath, Mapping[str, object]]]
        try:
            lines = await self._read_all("MLSD " + folder)
            parse, from_mlsd = self.client.parse_mlsx_line, True
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("50x"):
                raise
            lines = await self._read_all("LIST " + folder)  # an old server without MLSD
            parse, from_mlsd = self.client.parse_list_line, False
        entries: list[tuple[str, Mapping[str, object]]] = []
        for line in lines:
            try:
                path, info = parse(line)
            except ValueError:  # "total 42" and other lines that name no file
                logger.debug("skipping the listing line %r from %s", line, self.where)
                continue
            if path.name not in ("", ".", ".."):
                entries.append((path.name, info))
        return entries, from_mlsd

    async def _open_data(self, command: str) -> aioftp.DataConnectionThrottleStreamIO:
        reader, writer = await self.client.get_passive_connection("I")
        try:
            await self.client.command(command, "1xx")
        except BaseException:
            writer.close()
            raise
        return aioftp.DataConnectionThrottleStreamIO(
            self.client,
            reader,
            writer,
            throttles={"_": self.client.throttle},
            timeout=self.client.socket_timeout,
        )

    async def _read_all(self, command: str) -> list[bytes]:
        stream = await self._open_data(command)
        lines = []
        try:
            while line := await stream.readline():
                lines.append(line)
        except BaseException:
            stream.close()
            raise
        await stream.finish()
        return lines

    async def _mdtm(self, path: str) -> float | None:
        try:
            _, info = await self.client.command("MDTM " + path, "213")
        except aioftp.StatusCodeError as exc:
            # 50x: no MDTM on this server; 550: the file went away since the listing.
            if exc.received_codes[-1].matches("50x") or exc.received_codes[-1].matches("550"):
                return None
            raise
        return _parse_ftp_time(info[-1])

    async def _exists(self, path: str) -> bool:
        try:
            await self.client.command("MLST " + path, "2xx")
            return True
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("550"):
                return False
            if not exc.received_codes[-1].matches("50x"):
                raise
        parent, name = posixpath.split(posixpath.normpath(path))
        try:
            entries, _ = await self._entries(parent or ".")
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("550"):  # not even the parent folder exists
                return False
            raise
        return any(entry == name for entry, _ in entries)

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[AsyncIterator[bytes]]:
        with _ftp_errors(self.where, f"cannot download {path}"):
            stream = await self._open_data("RETR " + path)
        chunks = self._chunks(stream, path)
        try:
            yield chunks
        finally:
            await chunks.aclose()
            stream.close()

    async def _chunks(
        self, stream: aioftp.DataConnectionThrottleStreamIO, path: str
    ) -> AsyncGenerator[bytes, None]:
        while True:
            with _ftp_errors(self.where, f"downloading {path} failed"):
                chunk = await stream.read(CHUNK_BYTES)
            if not chunk:
                break
            yield chunk
        # The end of the data connection alone does not prove the file was sent whole: the
        # server's 226 does.
        with _ftp_errors(self.where, f"downloading {path} failed"):
            await stream.finish()

    async def exists(self, path: str) -> bool:
        with _ftp_errors(self.where, f"cannot check whether {path} exists"):
            return await self._exists(path)

    async def makedirs(self, path: str) -> None:
        with _ftp_errors(self.where, f"cannot create the folder {path!r}"):
            missing = []
            folder = PurePosixPath(path)
            while folder.name and not await self._exists(str(folder)):
                missing.append(folder)
                folder = folder.parent
            for folder in reversed(missing):
                try:
                    await self.client.command(f"MKD {folder}", "257")
                except aioftp.StatusCodeError:
                    if not await self._exists(str(folder)):  # or made by someone else meanwhile
                        raise

    async def rename(self, source: str, target: str) -> None:
        with _ftp_errors(self.where, f"cannot move {source} to {target}"):
            await self.client.rename(source, target)

    async def remove(self, path: str) -> None:
        with _ftp_errors(self.where, f"cannot delete {path}"):
            await self.client.remove_file(path)


# --- SFTP ----------------------------------------------------------------------------------


async def _known_hosts(source: FtpSource, where: str) -> asyncssh.SSHKnownHosts | None:
    if source.known_hosts is None:
        if not source.insecure_any_host_key:
            raise SourceError(
                f"SFTP to {where} has no known_hosts: set known_hosts to a known_hosts file "
                f"holding the server's host key (ssh-keyscan -p {source.port or SFTP_PORT} "
                f"{source.host}), or insecure_any_host_key=True to accept any key"
            )
        logger.warning("accepting any SSH host key from %s (insecure_any_host_key)", where)
        return None
    try:
        return await asyncio.to_thread(asyncssh.read_known_hosts, source.known_hosts)
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"cannot read the known_hosts file {source.known_hosts!r} for {where}: {exc}"
        ) from exc


@asynccontextmanager
async def _connect_sftp(source: FtpSource, secrets: Secrets) -> AsyncIterator[_Remote]:
    port, where, user, password = _login(source, secrets, SFTP_PORT, "SFTP")
    if user is None:
        raise SourceError(
            f"SFTP to {where} needs a user: set user_env (and password_env) to the "
            "environment variables holding them"
        )
    known_hosts = await _known_hosts(source, where)
    try:
        # Only the configured password: never the workers' own keys, agent or ssh config.
        conn = await asyncssh.connect(
            source.host,
            port,
            username=user,
            password=password,
            known_hosts=known_hosts,
            client_keys=None,
            agent_path=None,
            gss_host=None,
            config=[],
            connect_timeout=source.timeout,
            login_timeout=source.timeout,
        )
    except asyncssh.PermissionDenied:
        raise _auth_failed(source, user, where) from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise SourceError(
            f"the SSH host key of {where} is not in the known_hosts file "
            f"{source.known_hosts!r} (or it changed): after checking the key, add it "
            f"with ssh-keyscan -p {port} {source.host} >> {source.known_hosts}"
        ) from exc
    except (
        asyncssh.KeyExchangeFailed,
        asyncssh.ProtocolNotSupported,
        asyncssh.IllegalUserName,
    ) as exc:
        raise SourceError(f"cannot speak SSH with {where}: {exc.reason}") from exc
    except asyncssh.DisconnectError as exc:
        raise SourceUnavailable(f"SSH connection to {where} failed: {exc.reason}") from exc
    except (OSError, TimeoutError) as exc:
        raise SourceUnavailable(f"cannot connect to {where}: {_describe(exc)}") from exc
    async with conn:
        try:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), source.timeout)
        except asyncssh.ChannelOpenError as exc:
            raise SourceError(f"{where} refused an SFTP session: {exc.reason}") from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"cannot start SFTP on {where}: {_describe(exc)}") from exc
        async with sftp:
            yield _SftpRemote(sftp, where, source.timeout)


class _SftpRemote:
    def __init__(self, sftp: asyncssh.SFTPClient, where: str, timeout: float) -> None:
        self.sftp = sftp
        self.where = where
        self.timeout = timeout

    @asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        """One request with the source's timeout, its failures as Sluice's."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath) as exc:
            raise SourceError(f"{what} on {self.where}: no such file or folder") from exc
        except asyncssh.SFTPPermissionDenied as exc:
            raise SourceError(f"{what} on {self.where}: permission denied") from exc
        except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection) as exc:
            raise SourceUnavailable(f"{what} on {self.where}: {exc.reason}") from exc
        except asyncssh.SFTPError as exc:
            raise SourceError(f"{what} on {self.where}: {exc.reason}") from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"{what} on {self.where}: {_describe(exc)}") from exc

    async def list_files(self, folder: str, pattern: str) -> list[_Candidate]:
        async with self._op(f"cannot list the folder {folder!r}"):
            entries = await self.sftp.readdir(folder)
        candidates = []
        for entry in entries:
            name = str(entry.filename)
            if name in (".", "..") or not fnmatchcase(name, pattern):
                continue
            attrs = entry.attrs
            if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK:
                try:
                    async with self._op(f"cannot follow the link {name!r}"):
                        attrs = await self.sftp.stat(posixpath.join(folder, name))
                except SourceError:
                    continue  # a dangling link is no file to import
            if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR or attrs.mtime is None:
                continue
            candidates.append(_Candidate(name, attrs.mtime + (attrs.mtime_ns or 0) / 1e9))
        return candidates

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._op(f"cannot open {path}"):
            attrs = await self.sftp.stat(path)
            if attrs.permissions is not None and not stat.S_ISREG(attrs.permissions):
                raise SourceError(f"cannot download {path} from {self.where}: not a file")
            file = await self.sftp.open(path, "rb")
        chunks = self._chunks(file, path)
        try:
            yield chunks
        finally:
            await chunks.aclose()
            with suppress(asyncssh.Error, OSError):
                await file.close()

    async def _chunks(
        self, file: asyncssh.SFTPClientFile, path: str
    ) -> AsyncGenerator[bytes, None]:
        while True:
            async with self._op(f"downloading {path} failed"):
                chunk = await file.read(CHUNK_BYTES)
            if not chunk:
                return
            assert isinstance(chunk, bytes)  # opened in binary mode
            yield chunk

    async def exists(self, path: str) -> bool:
        async with self._op(f"cannot check whether {path} exists"):
            found = await self.sftp.exists(path)
        return found

    async def makedirs(self, path: str) -> None:
        async with self._op(f"cannot create the folder {path!r}"):
            await self.sftp.makedirs(path, exist_ok=True)

    async def rename(self, source: str, target: str) -> None:
        async with self._op(f"cannot move {source} to {target}"):
            try:
                await self.sftp.posix_rename(source, target)
            except asyncssh.SFTPOpUnsupported:
                await self.sftp.rename(source, target)

    async def remove(self, path: str) -> None:
        async with self._op(f"cannot delete {path}"):
            await self.sftp.remove(path)
