"""Test certificates made with `cryptography`: a CA, a server and clients it signed, and bad ones.

`make_certs(directory)` writes PEM files and returns their paths; nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "CertSet", "KeyPair", "make_authority", "make_certs", "issue"]

_DAY = datetime.timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as files and as PEM bytes."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


@dataclasses.dataclass(frozen=True)
class Authority:
    """A self-signed CA that can issue certificates."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path

    @property
    def pem_bytes(self) -> bytes:
        return self.pem.read_bytes()


@dataclasses.dataclass(frozen=True)
class CertSet:
    """Everything a TLS test needs, in one directory.

    ca: signs `server`, `client` and `expired_client`; other_ca: signs `foreign_client` only.
    The server certificate is valid for 127.0.0.1, ::1 and localhost. The client certificates'
    subjects are CN=<name>, O=cosserve-tests.
    """

    directory: Path
    ca: Authority
    other_ca: Authority
    server: KeyPair
    client: KeyPair
    expired_client: KeyPair
    foreign_client: KeyPair


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cosserve-tests"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_authority(directory: Path, name: str) -> Authority:
    """A self-signed CA, written to directory/<name>.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = directory / f"{name}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, cert, key, pem)


def issue(
    authority: Authority,
    directory: Path,
    name: str,
    *,
    server: bool = False,
    not_after: datetime.datetime | None = None,
) -> KeyPair:
    """A certificate signed by `authority`, written to directory/<name>.crt and .key.

    server=True: for 127.0.0.1, ::1 and localhost (serverAuth); otherwise a client (clientAuth).
    not_after in the past makes an expired certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    end = not_after if not_after is not None else now + 30 * _DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - _DAY, end - _DAY))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(authority.key, hashes.SHA256())
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_certs(directory: Path) -> CertSet:
    """A CA, a server and a client it signed, an expired client, and a client of another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_authority(directory, "ca")
    other_ca = make_authority(directory, "other-ca")
    yesterday = datetime.datetime.now(datetime.timezone.utc) - _DAY
    return CertSet(
        directory=directory,
        ca=ca,
        other_ca=other_ca,
        server=issue(ca, directory, "server", server=True),
        client=issue(ca, directory, "client"),
        expired_client=issue(ca, directory, "expired-client", not_after=yesterday),
        foreign_client=issue(other_ca, directory, "foreign-client"),
    )
