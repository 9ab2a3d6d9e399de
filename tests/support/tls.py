"""A throw-away PKI for the TLS tests, made with ``cryptography`` (a dependency of asyncssh).

:func:`make_pki` writes PEM files into a folder:

- a test CA, the one the clients and the mutual-TLS listener trust;
- a server certificate for ``127.0.0.1`` and ``localhost`` signed by it;
- a client certificate signed by it, its key encrypted with :attr:`Pki.key_password`;
- the bad ones: an unrelated ("rogue") CA and a client certificate it signed, which a
  mutual-TLS listener must refuse, and a self-signed server certificate, which a client must
  refuse.

EC P-256 keys: as good as RSA for these tests and made in milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_PASSWORD = "client-key-passphrase"
"""Encrypts the client certificate's key (``SLUICE_KAFKA_SSL_KEY_PASSWORD``)."""

_SERVER_NAMES: list[x509.GeneralName] = [
    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    x509.DNSName("localhost"),
]


@dataclass(frozen=True)
class Pki:
    """The files :func:`make_pki` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    """Encrypted with :attr:`key_password`."""
    rogue_ca: Path
    """A CA that signed nothing the servers show (a wrong ``SLUICE_KAFKA_SSL_CAFILE``)."""
    rogue_client_cert: Path
    """Signed by the rogue CA, which no listener trusts."""
    rogue_client_key: Path
    self_signed_cert: Path
    """A server certificate for 127.0.0.1 that no CA signed."""
    self_signed_key: Path
    key_password: str = KEY_PASSWORD


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (
        (issuer[0].subject, issuer[1]) if issuer is not None else (_name(subject), key)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(_SERVER_NAMES), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, server, client and bad certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _certificate("sluice-test-ca", ca_key, None, ca=True)
    server_key = _key()
    server = _certificate("localhost", server_key, (ca, ca_key), server=True)
    client_key = _key()
    client = _certificate("sluice-test-client", client_key, (ca, ca_key), client=True)
    rogue_ca_key = _key()
    rogue_ca = _certificate("rogue-ca", rogue_ca_key, None, ca=True)
    rogue_key = _key()
    rogue = _certificate("rogue-client", rogue_key, (rogue_ca, rogue_ca_key), client=True)
    lone_key = _key()
    lone = _certificate("localhost", lone_key, None, server=True)
    return Pki(
        ca=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client.key", client_key, KEY_PASSWORD),
        rogue_ca=_write_cert(directory / "rogue-ca.pem", rogue_ca),
        rogue_client_cert=_write_cert(directory / "rogue-client.pem", rogue),
        rogue_client_key=_write_key(directory / "rogue-client.key", rogue_key),
        self_signed_cert=_write_cert(directory / "self-signed.pem", lone),
        self_signed_key=_write_key(directory / "self-signed.key", lone_key),
    )
