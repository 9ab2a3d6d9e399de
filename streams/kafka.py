"""The one place Kafka clients are made: producers, consumers, the admin client and the Faust
app's broker settings, all from :class:`~sluice.config.KafkaSettings` (bootstrap servers, TLS,
SASL, the message size limit). Nothing else in Sluice constructs an aiokafka client.

:func:`check_connection` connects once at start, so a wrong password, an untrusted certificate
or an unreachable broker fails there with a message that names the setting to fix (and never
the secret).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from sluice.config import KafkaSettings
from sluice.errors import KafkaConfigError, KafkaUnavailable

log = logging.getLogger(__name__)

RECORD_OVERHEAD = 1024
"""Bytes a record batch adds to a message's value (batch header, record header, key): the
split keeps batch values this far below the message limit."""


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL, None for plaintext protocols."""
    if not kafka.uses_tls:
        return None
    for setting, path in (
        ("SLUICE_KAFKA_SSL_CAFILE", kafka.ssl_cafile),
        ("SLUICE_KAFKA_SSL_CERTFILE", kafka.ssl_certfile),
        ("SLUICE_KAFKA_SSL_KEYFILE", kafka.ssl_keyfile),
    ):
        if path and not os.path.isfile(path):
            raise KafkaConfigError(f"{setting}={path} is not a file: give the path of a PEM file")
    try:
        context = ssl.create_default_context(cafile=kafka.ssl_cafile or None)
        if kafka.ssl_certfile:
            # Always a string: with None, OpenSSL asks for the pass phrase of an encrypted key on
            # the terminal (a worker would hang there) instead of failing.
            context.load_cert_chain(
                kafka.ssl_certfile,
                kafka.ssl_keyfile or None,
                password=kafka.ssl_key_password.get_secret_value(),
            )
    except ssl.SSLError as exc:
        if exc.reason != "KEY_VALUES_MISMATCH" and _key_is_encrypted(
            kafka.ssl_keyfile or kafka.ssl_certfile
        ):
            raise KafkaConfigError(
                "the client certificate's key is encrypted and cannot be opened: set "
                "SLUICE_KAFKA_SSL_KEY_PASSWORD to its pass phrase (it is missing or wrong)"
            ) from None
        raise KafkaConfigError(
            f"the TLS files are not usable ({exc.reason or exc}): SLUICE_KAFKA_SSL_CAFILE must "
            "be PEM certificates, SLUICE_KAFKA_SSL_CERTFILE and SLUICE_KAFKA_SSL_KEYFILE the "
            "client certificate and its key (SLUICE_KAFKA_SSL_KEY_PASSWORD if it is encrypted)"
        ) from None
    except OSError as exc:
        raise KafkaConfigError(
            f"cannot read {exc.filename or 'a TLS file'} ({exc.strerror or exc}): check "
            "SLUICE_KAFKA_SSL_CAFILE, SLUICE_KAFKA_SSL_CERTFILE and SLUICE_KAFKA_SSL_KEYFILE"
        ) from None
    context.check_hostname = kafka.ssl_check_hostname
    return context


def _key_is_encrypted(path: str) -> bool:
    """Whether the PEM file holds an encrypted private key (PKCS#8 or the older Proc-Type)."""
    try:
        with open(path, "rb") as fh:
            return b"ENCRYPTED" in fh.read(1 << 20)
    except OSError:
        return False


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """What every aiokafka client takes: where the brokers are and how to authenticate."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "ssl_context": ssl_context(kafka),
    }
    if kafka.uses_sasl:
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password.get_secret_value(),
        )
    return options


def producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all, a bounded request timeout (a missing topic must not hang a send for long), and
    the configured message limit as the client's own: a message too big fails here, as it
    would on a broker that enforces ``message.max.bytes``."""
    options: dict[str, Any] = {
        **client_options(kafka),
        "acks": "all",
        "request_timeout_ms": int(kafka.request_timeout * 1000),
        "max_request_size": kafka.max_message_bytes,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def event_limit(kafka: KafkaSettings) -> int:
    """The largest event value a producer of ``kafka`` sends: the message limit less a
    record's overhead (its key, headers and framing)."""
    return kafka.max_message_bytes - RECORD_OVERHEAD


def event_producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    """A producer for a stream of small events (the firehose), whose batches of up to 256 KiB
    ``streams.publish.KeyedBatches`` fills for SLUICE_FIREHOSE_LINGER_MS: it sends each batch
    handed to it at once (a linger here would add its own wait to theirs). Fewer, larger
    batches cost less CPU per event in the producer and on every broker; on Tansu's memory
    storage, which lists a partition's batches on every fetch, 5 ms batches made the broker's
    CPU grow to a core within a minute at 2,000 events/s, 50 ms ones to a fifth of that in
    three (bench/firehose.py)."""
    return producer(kafka, linger_ms=0, max_batch_size=262144)


def consumer(
    kafka: KafkaSettings, *topics: str, group_id: str | None = None, **overrides: Any
) -> AIOKafkaConsumer:
    """No auto-commit: Sluice commits after the work is done."""
    session_ms = int(kafka.session_timeout * 1000)
    options: dict[str, Any] = {
        **client_options(kafka),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "request_timeout_ms": int(max(kafka.request_timeout, kafka.session_timeout + 5) * 1000),
        "session_timeout_ms": session_ms,
        "heartbeat_interval_ms": max(min(3000, session_ms // 3), 100),
        # Fetches may hold a whole batch message: at least one message limit per partition.
        "max_partition_fetch_bytes": max(1_048_576, kafka.max_message_bytes + RECORD_OVERHEAD),
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        **client_options(kafka), request_timeout_ms=int(max(kafka.request_timeout, 15) * 1000)
    )


def faust_broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The Faust app's settings for the same brokers, TLS and SASL as every other client."""
    import faust

    context = ssl_context(kafka)
    credentials: Any = None
    if kafka.uses_sasl:
        credentials = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    return {
        "broker": [f"kafka://{server}" for server in kafka.bootstrap_servers],
        "broker_credentials": credentials,
        "broker_client_id": kafka.client_id,
        "producer_max_request_size": kafka.max_message_bytes,
        "producer_request_timeout": kafka.request_timeout,
        "consumer_max_fetch_size": max(1_048_576, kafka.max_message_bytes + RECORD_OVERHEAD),
        "broker_session_timeout": kafka.session_timeout,
        "broker_heartbeat_interval": min(3.0, kafka.session_timeout / 3),
    }


async def check_connection(kafka: KafkaSettings, *, within: float = 15.0) -> None:
    """Connect to a bootstrap server and authenticate, or raise with what to fix.

    Raises :class:`KafkaConfigError` for what a retry cannot mend (an untrusted certificate,
    a refused password, a mechanism the broker does not offer) and :class:`KafkaUnavailable`
    when no bootstrap server answers. aiokafka itself reports all of these as "Unable to
    bootstrap", so this opens one connection by hand to see the cause, and asks it for the
    cluster's metadata as aiokafka's bootstrap does."""
    options = client_options(kafka)
    options.pop("bootstrap_servers")
    options.pop("client_id")
    errors: list[str] = []
    for server in kafka.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host.strip("[]"),
                    int(port),
                    client_id=kafka.client_id,
                    request_timeout_ms=int(within * 1000),
                    **options,
                ),
                within,
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            problem = _explain(kafka, server, exc)
            if isinstance(problem, KafkaConfigError):
                raise problem from None
            errors.append(str(problem))
            continue
        try:
            # A broker answers ApiVersions before authentication (KIP-43): a listener that
            # wants SASL from a client that sent none accepts the connection and closes it at
            # the next request, the metadata request aiokafka's bootstrap sends.
            await asyncio.wait_for(conn.send(MetadataRequest([])), within)
        except (KafkaError, OSError, TimeoutError) as exc:
            if not kafka.uses_sasl:
                raise KafkaConfigError(
                    f"the broker at {server} closed the connection at the first request after "
                    f"connecting with {kafka.security_protocol}: it wants authentication; check "
                    "SLUICE_KAFKA_SECURITY_PROTOCOL (SASL_PLAINTEXT or SASL_SSL) and the "
                    "SLUICE_KAFKA_SASL_* settings"
                ) from None
            errors.append(f"{server}: the metadata request failed ({_short(exc)})")
            continue
        finally:
            conn.close()
        return
    raise KafkaUnavailable(
        f"no Kafka broker answered at {kafka.bootstrap} ({'; '.join(errors)}); check "
        "SLUICE_KAFKA_BOOTSTRAP and that the broker is running and reachable"
        + (
            " (`sluice up` starts an embedded one)"
            if kafka.security_protocol == "PLAINTEXT"
            else ""
        )
    )


def _explain(kafka: KafkaSettings, server: str, exc: BaseException) -> KafkaConfigError | str:
    cause: BaseException = exc
    while not isinstance(cause, ssl.SSLError | SaslAuthenticationFailed) and cause.__cause__:
        cause = cause.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return KafkaConfigError(
            f"the broker at {server} has a certificate this client does not trust "
            f"({cause.verify_message}): set SLUICE_KAFKA_SSL_CAFILE to the CA that signed it"
            + (
                ", or turn hostname checking off (SLUICE_KAFKA_SSL_CHECK_HOSTNAME=false) if "
                "the name is the problem"
                if "match" in (cause.verify_message or "")
                else ""
            )
        )
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            hint = (
                "the broker asks for a client certificate: set SLUICE_KAFKA_SSL_CERTFILE and "
                "SLUICE_KAFKA_SSL_KEYFILE"
            )
        elif "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
            hint = (
                "the broker does not trust the client certificate: SLUICE_KAFKA_SSL_CERTFILE "
                "must be signed by a CA the broker accepts"
            )
        elif "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            hint = (
                "the broker does not speak TLS on this port: check SLUICE_KAFKA_SECURITY_PROTOCOL "
                "and SLUICE_KAFKA_BOOTSTRAP"
            )
        else:
            hint = "check the SLUICE_KAFKA_SSL_* settings"
        return KafkaConfigError(f"TLS with the broker at {server} failed ({reason}): {hint}")
    if isinstance(cause, SaslAuthenticationFailed):
        return KafkaConfigError(
            f"the broker at {server} refused user {kafka.sasl_username!r} with "
            f"{kafka.sasl_mechanism}: check SLUICE_KAFKA_SASL_USERNAME and "
            "SLUICE_KAFKA_SASL_PASSWORD (and SLUICE_KAFKA_SASL_MECHANISM)"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return KafkaConfigError(
            f"the broker at {server} does not offer SASL mechanism {kafka.sasl_mechanism}: "
            "set SLUICE_KAFKA_SASL_MECHANISM to one it enables (Sluice speaks PLAIN, "
            "SCRAM-SHA-256 and SCRAM-SHA-512)"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) and kafka.uses_tls:
        return (
            f"{server}: no answer to the TLS handshake (is it a plaintext port? check "
            "SLUICE_KAFKA_SECURITY_PROTOCOL)"
        )
    if isinstance(exc, KafkaConnectionError) and "closed" in str(exc) and kafka.uses_tls:
        # TLS 1.3: the client's side of the handshake ends before the server checks the
        # client certificate; its refusal (no certificate, or one it does not trust) then
        # arrives as a closed connection rather than as an alert, depending on timing.
        if kafka.ssl_certfile:
            why = (
                "probably does not trust the client certificate: SLUICE_KAFKA_SSL_CERTFILE "
                "must be signed by a CA the broker accepts"
            )
        else:
            why = (
                "probably requires a client certificate: set SLUICE_KAFKA_SSL_CERTFILE and "
                "SLUICE_KAFKA_SSL_KEYFILE"
            )
        return KafkaConfigError(
            f"the broker at {server} closed the connection right after the TLS handshake: it " + why
        )
    if isinstance(exc, KafkaConnectionError | KafkaError | OSError | TimeoutError):
        return f"{server}: {_short(exc)}"
    return f"{server}: {type(exc).__name__}: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."
