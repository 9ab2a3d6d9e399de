"""A SASL-terminating Kafka proxy for the tests (stdlib only): PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 in front of a plaintext broker.

Tansu 0.6.0 has no usable SASL (no user store on memory storage, and a failed SCRAM exchange
is let through), so the tests put this in front of it. Per client connection it

1. relays ApiVersions to the broker (the client sees the broker's version ranges, which include
   SaslHandshake v0-1 and SaslAuthenticate v0-2);
2. answers SaslHandshake (v1) and SaslAuthenticate (v0-2) itself, checking the credentials
   against a users file: PLAIN, or SCRAM (RFC 5802) with the salted password made here;
3. after a success relays bytes both ways; after a failure answers as Apache Kafka does
   (error 58 SASL_AUTHENTICATION_FAILED and a message) and closes. Any other request before
   authentication closes the connection, as Kafka does.

The broker must advertise this proxy's port (or the TLS port in front of it).

    python -m tests.support.sasl_proxy --listen 127.0.0.1:9093 --upstream 127.0.0.1:9092 \\
        --users users.json [--mechanisms PLAIN,SCRAM-SHA-256,SCRAM-SHA-512]

``users.json``: ``{"alice": "alice-secret"}``. It never logs a password.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import signal
import ssl
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("sasl_proxy")

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
ERR_NONE, ERR_UNSUPPORTED_MECHANISM, ERR_ILLEGAL_STATE, ERR_AUTH_FAILED = 0, 33, 34, 58
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_HASH: dict[str, Callable[..., Any]] = {
    "SCRAM-SHA-256": hashlib.sha256,
    "SCRAM-SHA-512": hashlib.sha512,
}
SCRAM_ITERATIONS = 4096  # Kafka's minimum for SCRAM credentials


class AuthFailed(Exception):
    """The client's credentials or SASL message were refused; the text goes to the client."""


# ---------------------------------------------------------------- wire format


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def parse_request_header(request: bytes) -> tuple[int, int, int, int]:
    """api key, api version, correlation id, and where the body starts (request header v1,
    plus tagged fields when the request is a flexible version)."""
    api_key, api_version, correlation = struct.unpack_from(">hhi", request, 0)
    (client_id_len,) = struct.unpack_from(">h", request, 8)
    pos = 10 + max(client_id_len, 0)
    flexible = (api_key == SASL_AUTHENTICATE and api_version >= 2) or (
        api_key == API_VERSIONS and api_version >= 3
    )
    if flexible:
        count, pos = read_uvarint(request, pos)
        for _ in range(count):
            _tag, pos = read_uvarint(request, pos)
            size, pos = read_uvarint(request, pos)
            pos += size
    return api_key, api_version, correlation, pos


def handshake_response(correlation: int, error: int, mechanisms: tuple[str, ...]) -> bytes:
    body = struct.pack(">ihi", correlation, error, len(mechanisms))
    for mechanism in mechanisms:
        name = mechanism.encode()
        body += struct.pack(">h", len(name)) + name
    return frame(body)


def authenticate_response(
    correlation: int, version: int, error: int, message: str | None, auth_bytes: bytes
) -> bytes:
    text = None if message is None else message.encode()
    if version >= 2:  # flexible: response header v1, compact types, tagged fields
        body = struct.pack(">i", correlation) + b"\x00" + struct.pack(">h", error)
        body += b"\x00" if text is None else uvarint(len(text) + 1) + text
        body += uvarint(len(auth_bytes) + 1) + auth_bytes
        body += struct.pack(">q", 0) + b"\x00"  # session lifetime, no tagged fields
        return frame(body)
    body = struct.pack(">ih", correlation, error)
    body += struct.pack(">h", -1) if text is None else struct.pack(">h", len(text)) + text
    body += struct.pack(">i", len(auth_bytes)) + auth_bytes
    if version >= 1:
        body += struct.pack(">q", 0)
    return frame(body)


def authenticate_bytes(request: bytes, version: int, pos: int) -> bytes:
    if version >= 2:
        size, pos = read_uvarint(request, pos)
        return request[pos : pos + size - 1]
    (size,) = struct.unpack_from(">i", request, pos)
    return request[pos + 4 : pos + 4 + size]


# ---------------------------------------------------------------- SASL servers


@dataclass(frozen=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class Users:
    """Passwords, and the SCRAM credentials a broker would store for them."""

    def __init__(self, passwords: Mapping[str, str]) -> None:
        self.passwords = dict(passwords)
        self.scram: dict[tuple[str, str], ScramCredential] = {}
        for user, password in self.passwords.items():
            for mechanism, digest in SCRAM_HASH.items():
                salt = secrets.token_bytes(16)
                salted = hashlib.pbkdf2_hmac(
                    digest().name, password.encode(), salt, SCRAM_ITERATIONS
                )
                client_key = hmac.new(salted, b"Client Key", digest).digest()
                self.scram[(user, mechanism)] = ScramCredential(
                    salt=salt,
                    iterations=SCRAM_ITERATIONS,
                    stored_key=digest(client_key).digest(),
                    server_key=hmac.new(salted, b"Server Key", digest).digest(),
                )


class Exchange(Protocol):
    mechanism: str
    done: bool
    user: str | None

    def step(self, data: bytes) -> bytes: ...


class Plain:
    def __init__(self, users: Users, mechanism: str) -> None:
        self.users, self.mechanism = users, mechanism
        self.done = False
        self.user: str | None = None

    def step(self, data: bytes) -> bytes:
        try:
            _authzid, user, password = data.decode().split("\0")
        except ValueError:
            raise AuthFailed("Authentication failed: Invalid PLAIN message") from None
        wanted = self.users.passwords.get(user)
        if wanted is None or not hmac.compare_digest(wanted.encode(), password.encode()):
            raise AuthFailed("Authentication failed: Invalid username or password")
        self.done, self.user = True, user
        return b""


class Scram:
    FAILED = (
        "Authentication failed during authentication due to invalid credentials with SASL "
        "mechanism {}"
    )

    def __init__(self, users: Users, mechanism: str) -> None:
        self.users, self.mechanism, self.digest = users, mechanism, SCRAM_HASH[mechanism]
        self.done = False
        self.user: str | None = None
        self.stage = 0
        self.credential: ScramCredential | None = None
        self.gs2_header = self.nonce = self.client_first_bare = self.server_first = ""

    def _fail(self) -> AuthFailed:
        return AuthFailed(self.FAILED.format(self.mechanism))

    def step(self, data: bytes) -> bytes:
        message = data.decode()
        if self.stage == 0:
            return self._first(message)
        if self.stage == 1:
            return self._final(message)
        raise self._fail()

    def _first(self, message: str) -> bytes:
        gs2, _, rest = message.partition(",")
        authzid, _, bare = rest.partition(",")
        if gs2 not in ("n", "y") or not bare:  # no channel binding
            raise self._fail()
        attrs = dict(kv.split("=", 1) for kv in bare.split(","))
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        credential = self.users.scram.get((user, self.mechanism))
        if credential is None or "r" not in attrs:
            raise self._fail()  # Kafka refuses an unknown user at the first message too
        self.user, self.credential = user, credential
        self.gs2_header = f"{gs2},{authzid},"
        self.nonce = attrs["r"] + base64.b64encode(secrets.token_bytes(18)).decode()
        self.client_first_bare = bare
        salt = base64.b64encode(credential.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={credential.iterations}"
        self.stage = 1
        return self.server_first.encode()

    def _final(self, message: str) -> bytes:
        credential = self.credential
        without_proof, sep, proof_b64 = message.rpartition(",p=")
        if credential is None or not sep:
            raise self._fail()
        attrs = dict(kv.split("=", 1) for kv in without_proof.split(","))
        if (
            attrs.get("r") != self.nonce
            or base64.b64decode(attrs.get("c", "")) != self.gs2_header.encode()
        ):
            raise self._fail()
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(credential.stored_key, auth_message, self.digest).digest()
        proof = base64.b64decode(proof_b64)
        if len(proof) != len(signature):
            raise self._fail()
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(self.digest(client_key).digest(), credential.stored_key):
            raise self._fail()
        self.stage, self.done = 2, True
        server_signature = hmac.new(credential.server_key, auth_message, self.digest).digest()
        return b"v=" + base64.b64encode(server_signature)


# ---------------------------------------------------------------- connections


class Proxy:
    def __init__(
        self, upstream: tuple[str, int], users: Users, mechanisms: tuple[str, ...]
    ) -> None:
        self.upstream, self.users, self.mechanisms = upstream, users, mechanisms

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        peer = cwriter.get_extra_info("peername")
        uwriter: asyncio.StreamWriter | None = None
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
            if await self._authenticate(peer, creader, cwriter, ureader, uwriter):
                await self._relay(creader, cwriter, ureader, uwriter)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            log.debug("%s: %s", peer, exc)
        except Exception:
            log.exception("%s: unexpected error", peer)
        finally:
            for writer in (cwriter, uwriter):
                if writer is not None:
                    writer.close()

    async def _authenticate(
        self,
        peer: Any,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        ureader: asyncio.StreamReader,
        uwriter: asyncio.StreamWriter,
    ) -> bool:
        exchange: Exchange | None = None
        while True:
            request = await read_frame(creader)
            api_key, version, correlation, pos = parse_request_header(request)
            if api_key == API_VERSIONS:
                uwriter.write(frame(request))
                await uwriter.drain()
                cwriter.write(frame(await read_frame(ureader)))
            elif api_key == SASL_HANDSHAKE:
                (size,) = struct.unpack_from(">h", request, pos)
                mechanism = request[pos + 2 : pos + 2 + size].decode()
                if mechanism not in self.mechanisms:
                    cwriter.write(
                        handshake_response(correlation, ERR_UNSUPPORTED_MECHANISM, self.mechanisms)
                    )
                    await cwriter.drain()
                    log.info("%s: unsupported mechanism %r", peer, mechanism)
                    return False
                if version == 0:
                    log.info("%s: SaslHandshake v0 (raw tokens) is not supported", peer)
                    return False
                exchange = (
                    Plain(self.users, mechanism)
                    if mechanism == "PLAIN"
                    else Scram(self.users, mechanism)
                )
                cwriter.write(handshake_response(correlation, ERR_NONE, self.mechanisms))
            elif api_key == SASL_AUTHENTICATE:
                if exchange is None:
                    cwriter.write(
                        authenticate_response(
                            correlation,
                            version,
                            ERR_ILLEGAL_STATE,
                            "Unexpected SaslAuthenticate: no SaslHandshake",
                            b"",
                        )
                    )
                    await cwriter.drain()
                    return False
                try:
                    try:
                        out = exchange.step(authenticate_bytes(request, version, pos))
                    except (ValueError, KeyError, UnicodeDecodeError) as exc:
                        raise AuthFailed(
                            f"Authentication failed: malformed {exchange.mechanism} message"
                        ) from exc
                except AuthFailed as exc:
                    cwriter.write(
                        authenticate_response(correlation, version, ERR_AUTH_FAILED, str(exc), b"")
                    )
                    await cwriter.drain()
                    log.info("%s: %s", peer, exc)
                    return False
                cwriter.write(authenticate_response(correlation, version, ERR_NONE, None, out))
                if exchange.done:
                    await cwriter.drain()
                    log.info("%s: authenticated %s via %s", peer, exchange.user, exchange.mechanism)
                    return True
            else:
                log.info("%s: api key %d before authentication: closing", peer, api_key)
                return False
            await cwriter.drain()

    @staticmethod
    async def _relay(
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        ureader: asyncio.StreamReader,
        uwriter: asyncio.StreamWriter,
    ) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(pipe(creader, uwriter), pipe(ureader, cwriter), return_exceptions=True)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    with open(args.users) as fh:
        users = Users(json.load(fh))
    mechanisms = tuple(m.strip() for m in args.mechanisms.split(",") if m.strip())
    proxy = Proxy(args.upstream, users, mechanisms)
    server = await asyncio.start_server(proxy.handle, *args.listen)
    log.info("listening on %s:%s -> %s:%s, mechanisms %s", *args.listen, *args.upstream, mechanisms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="SASL-terminating Kafka proxy for tests")
    parser.add_argument("--listen", required=True, type=host_port)
    parser.add_argument("--upstream", required=True, type=host_port)
    parser.add_argument("--users", required=True, help="JSON file {user: password}")
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
