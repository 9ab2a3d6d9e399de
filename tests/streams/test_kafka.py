"""sluice.streams.kafka against real secured listeners (tests/support/secure_broker.py): TLS,
mutual TLS, SASL PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512 over plaintext and over TLS.

``check_connection`` must succeed where the settings are right, and fail at once where they are
wrong with a message that names the setting to fix, and never the secret.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr, ValidationError

from sluice.config import KafkaSettings, Settings
from sluice.errors import KafkaConfigError, KafkaUnavailable
from sluice.streams import kafka as clients
from sluice.streams.admin import ensure_topics
from sluice.streams.kafka import check_connection, faust_broker_options
from sluice.streams.topics import Topics
from tests.support.ports import free_port
from tests.support.secure_broker import USER, SecureBroker
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.stack

WRONG = "not-the-Pa55word"
LISTENERS: dict[str, dict[str, Any]] = {
    "tls": {"protocol": "SSL"},
    "mtls": {"protocol": "SSL", "client_auth": True},
    "self_signed": {"protocol": "SSL", "self_signed": True},
    "sasl_plaintext": {"protocol": "SASL_PLAINTEXT"},
    "sasl_ssl": {"protocol": "SASL_SSL"},
    "scram512_only": {"protocol": "SASL_PLAINTEXT", "mechanisms": ("SCRAM-SHA-512",)},
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def listener(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], SecureBroker]]:
    """A listener by name (LISTENERS), started on first use and kept for the module."""
    started: dict[str, SecureBroker] = {}
    root = tmp_path_factory.mktemp("listeners")

    def get(name: str) -> SecureBroker:
        if name not in started:
            started[name] = SecureBroker(root / name, pki, **LISTENERS[name]).start()
        return started[name]

    try:
        yield get
    finally:
        for broker in started.values():
            broker.stop()


async def refused(kafka: KafkaSettings, error: type[Exception] = KafkaConfigError) -> str:
    """check_connection's message for settings it must refuse, at once."""
    started = time.monotonic()
    with pytest.raises(error) as caught:
        await check_connection(kafka, within=30)
    assert time.monotonic() - started < 10, "refused only after waiting for a timeout"
    message = str(caught.value)
    for secret in (kafka.sasl_password, kafka.ssl_key_password):
        assert not secret.get_secret_value() or secret.get_secret_value() not in message
    return message


# ---------------------------------------------------------------- right settings


@pytest.mark.parametrize(
    ("name", "mechanism"),
    [
        ("tls", None),
        ("mtls", None),
        *(
            (name, mechanism)
            for name in ("sasl_plaintext", "sasl_ssl")
            for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        ),
    ],
)
async def test_check_connection_succeeds_with_the_right_settings(
    listener: Callable[[str], SecureBroker], name: str, mechanism: str | None
) -> None:
    broker = listener(name)
    kafka = broker.settings(**({"sasl_mechanism": mechanism} if mechanism else {}))
    await check_connection(kafka)


@pytest.mark.parametrize("name", ["tls", "mtls", "sasl_ssl", "sasl_plaintext"])
async def test_admin_producer_and_consumer_work_through_the_listener(
    listener: Callable[[str], SecureBroker], name: str
) -> None:
    broker = listener(name)
    kafka = broker.settings(topic_prefix=f"rt-{uuid.uuid4().hex[:6]}", partitions=1)
    topic = Topics.of(kafka).lifecycle
    await ensure_topics(kafka)
    producer = clients.producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over " + name.encode(), key=b"k")
    finally:
        await producer.stop()
    consumer = clients.consumer(kafka, topic, group_id=f"g-{name}")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k", b"over " + name.encode())


@pytest.mark.parametrize("name", ["tls", "mtls", "sasl_ssl", "sasl_plaintext"])
def test_faust_gets_the_same_protocol_tls_and_credentials(
    listener: Callable[[str], SecureBroker], name: str
) -> None:
    """What the Faust app passes to aiokafka for its consumer and producer."""
    kafka = listener(name).settings()
    options = faust_broker_options(kafka)
    auth = credentials_to_aiokafka_auth(options["broker_credentials"])
    assert auth["security_protocol"] == kafka.security_protocol
    assert (auth["ssl_context"] is not None) == kafka.uses_tls
    if kafka.uses_tls:
        assert auth["ssl_context"].check_hostname is kafka.ssl_check_hostname
    if kafka.uses_sasl:
        assert auth["sasl_mechanism"] == kafka.sasl_mechanism
        assert auth["sasl_plain_username"] == USER
        assert auth["sasl_plain_password"] == kafka.sasl_password.get_secret_value()
        assert kafka.sasl_password.get_secret_value() not in repr(options)
    assert options["broker"] == [f"kafka://{kafka.bootstrap}"]


# ---------------------------------------------------------------- wrong settings


async def test_an_untrusted_server_certificate_names_the_ca_setting(
    listener: Callable[[str], SecureBroker],
) -> None:
    message = await refused(listener("self_signed").settings())
    assert "SLUICE_KAFKA_SSL_CAFILE" in message and "self-signed" in message


async def test_a_ca_that_did_not_sign_the_server_certificate_names_the_ca_setting(
    listener: Callable[[str], SecureBroker], pki: Pki
) -> None:
    broker = listener("tls")
    assert "SLUICE_KAFKA_SSL_CAFILE" in await refused(broker.settings(ssl_cafile=str(pki.rogue_ca)))
    # Without a CA file the system's CAs are used: they did not sign the test CA either.
    assert "SLUICE_KAFKA_SSL_CAFILE" in await refused(broker.settings(ssl_cafile=""))


async def test_mutual_tls_without_a_client_certificate_names_the_certificate_setting(
    listener: Callable[[str], SecureBroker],
) -> None:
    broker = listener("mtls")
    message = await refused(broker.settings(ssl_certfile="", ssl_keyfile="", ssl_key_password=""))
    assert "SLUICE_KAFKA_SSL_CERTFILE" in message and "client certificate" in message


async def test_a_client_certificate_from_another_ca_is_refused(
    listener: Callable[[str], SecureBroker], pki: Pki
) -> None:
    broker = listener("mtls")
    message = await refused(
        broker.settings(
            ssl_certfile=str(pki.rogue_client_cert),
            ssl_keyfile=str(pki.rogue_client_key),
            ssl_key_password="",
        )
    )
    assert "SLUICE_KAFKA_SSL_CERTFILE" in message and "does not trust" in message


@pytest.mark.parametrize("password", ["", "a-wrong-pass-phrase"])
async def test_an_encrypted_key_without_its_pass_phrase_names_the_key_password(
    listener: Callable[[str], SecureBroker], password: str
) -> None:
    """Never OpenSSL's pass phrase prompt on the terminal: a clear error instead."""
    broker = listener("mtls")
    message = await refused(broker.settings(ssl_key_password=password))
    assert "SLUICE_KAFKA_SSL_KEY_PASSWORD" in message
    assert broker.pki.key_password not in message


async def test_a_missing_tls_file_names_its_setting(
    listener: Callable[[str], SecureBroker], tmp_path: Path
) -> None:
    broker = listener("mtls")
    missing = str(tmp_path / "nowhere.pem")
    for field, setting in (
        ("ssl_cafile", "SLUICE_KAFKA_SSL_CAFILE"),
        ("ssl_certfile", "SLUICE_KAFKA_SSL_CERTFILE"),
        ("ssl_keyfile", "SLUICE_KAFKA_SSL_KEYFILE"),
    ):
        message = await refused(broker.settings(**{field: missing}))
        assert message.startswith(f"{setting}={missing} is not a file"), message


@pytest.mark.parametrize("name", ["sasl_plaintext", "sasl_ssl"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_a_wrong_password_names_the_password_setting(
    listener: Callable[[str], SecureBroker], name: str, mechanism: str
) -> None:
    broker = listener(name)
    message = await refused(broker.settings(sasl_mechanism=mechanism, sasl_password=WRONG))
    assert "SLUICE_KAFKA_SASL_PASSWORD" in message and mechanism in message
    assert WRONG not in message and broker.password not in message


async def test_an_unknown_user_names_the_username_setting(
    listener: Callable[[str], SecureBroker],
) -> None:
    message = await refused(listener("sasl_ssl").settings(sasl_username="nobody"))
    assert "SLUICE_KAFKA_SASL_USERNAME" in message and "'nobody'" in message


async def test_a_mechanism_the_broker_does_not_offer_names_the_mechanism_setting(
    listener: Callable[[str], SecureBroker],
) -> None:
    broker = listener("scram512_only")
    await check_connection(broker.settings(sasl_mechanism="SCRAM-SHA-512"))
    message = await refused(broker.settings(sasl_mechanism="PLAIN"))
    assert "SLUICE_KAFKA_SASL_MECHANISM" in message and "PLAIN" in message


@pytest.mark.parametrize(
    ("name", "protocol"), [("sasl_plaintext", "PLAINTEXT"), ("sasl_ssl", "SSL")]
)
async def test_no_sasl_to_a_listener_that_wants_it_names_the_protocol_setting(
    listener: Callable[[str], SecureBroker], name: str, protocol: str
) -> None:
    """The listener answers ApiVersions before authentication, then closes: aiokafka would
    only say "Unable to bootstrap"."""
    message = await refused(listener(name).settings(security_protocol=protocol))
    assert "SLUICE_KAFKA_SECURITY_PROTOCOL" in message and "authentication" in message


async def test_an_unreachable_broker_is_unavailable_and_names_the_bootstrap_setting(
    listener: Callable[[str], SecureBroker],
) -> None:
    kafka = listener("sasl_ssl").settings(bootstrap=f"127.0.0.1:{free_port()}")
    message = await refused(kafka, KafkaUnavailable)
    assert "SLUICE_KAFKA_BOOTSTRAP" in message and kafka.bootstrap in message


async def test_tls_to_a_plaintext_port_says_to_check_the_protocol(
    listener: Callable[[str], SecureBroker],
) -> None:
    broker = listener("tls")
    kafka = broker.settings(bootstrap=f"127.0.0.1:{broker.tansu_port}")
    with pytest.raises(KafkaUnavailable) as caught:
        await check_connection(kafka, within=2)
    assert "SLUICE_KAFKA_SECURITY_PROTOCOL" in str(caught.value)


# ---------------------------------------------------------------- secrets and limits


def test_settings_and_their_errors_never_show_a_secret() -> None:
    password, passphrase = "Sup3r-secret-sasl", "Sup3r-secret-key"
    kafka = KafkaSettings(
        bootstrap="broker:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=SecretStr(password),
        ssl_key_password=SecretStr(passphrase),
    )
    for text in (str(kafka), repr(kafka), str(Settings(kafka=kafka).kafka)):
        assert password not in text and passphrase not in text
    # A validation error lists the values it was given, unless told not to.
    with pytest.raises(ValidationError) as caught:
        KafkaSettings(
            security_protocol="SASL_SSL", sasl_password=password, ssl_key_password=passphrase
        )
    assert "SLUICE_KAFKA_SASL_USERNAME" in str(caught.value)
    assert "input_value" not in str(caught.value)
    assert password not in str(caught.value) and passphrase not in str(caught.value)


def test_database_settings_errors_never_show_the_url() -> None:
    from sluice.config import DatabaseSettings

    with pytest.raises(ValidationError) as caught:
        DatabaseSettings(url="postgresql://app:Db-pa55word@db/app", core_schema="Not-A-Name")
    assert "SLUICE_DATABASE_SCHEMA" in str(caught.value)
    # pydantic abbreviates a long input in the middle: no echo of the input at all.
    assert "input_value" not in str(caught.value)
    assert "Db-pa55word" not in str(caught.value)


async def test_a_message_over_the_limit_fails_in_the_client(
    listener: Callable[[str], SecureBroker],
) -> None:
    """Tansu does not check message.max.bytes: the producer's own limit must."""
    broker = listener("tls")
    small = broker.settings(
        topic_prefix=f"big-{uuid.uuid4().hex[:6]}", partitions=1, max_message_bytes=20_000
    )
    topic = Topics.of(small).requests
    await ensure_topics(small)
    value = b"x" * 30_000
    producer = clients.producer(small)
    await producer.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(topic, value)
        await producer.send_and_wait(topic, b"x" * 15_000)  # under the limit: sent
    finally:
        await producer.stop()
    # The same message with a larger limit: the broker takes it.
    larger = clients.producer(small.model_copy(update={"max_message_bytes": 100_000}))
    await larger.start()
    try:
        sent = await larger.send_and_wait(topic, value)
    finally:
        await larger.stop()
    assert sent.offset == 1  # after the small one
