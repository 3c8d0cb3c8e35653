"""Certificates made by the test suite: a CA, a broker certificate, good and rogue clients.

Nothing is read from the machine's trust store or from files checked into the
repository: every run makes its own short-lived PKI with `cryptography` (a dependency of
moto, already in the dev extra), so an expired fixture can never fail the suite.

The client keys are RSA in the traditional `BEGIN RSA PRIVATE KEY` form, as AWS IoT hands
them out and as the connections API receives them; the CAs and the broker use P-256 keys,
which are fast to generate.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate and its key, as PEM text (what a connection's configuration holds)."""

    certificate: str
    private_key: str


@dataclass(frozen=True, slots=True)
class Pki:
    ca: str  # the CA that signed the broker and the good client (PEM)
    server: Identity  # for 127.0.0.1 and localhost
    client: Identity  # signed by `ca`: the broker accepts it
    rogue: Identity  # signed by another CA: the broker refuses it
    rogue_ca: str  # the other CA: a client that trusts only it refuses the broker

    def write_broker_files(self, directory: Path) -> tuple[Path, Path, Path]:
        """CA, certificate and key files for mosquitto, in `directory`."""
        ca = directory / "ca.pem"
        cert = directory / "server.pem"
        key = directory / "server.key"
        ca.write_text(self.ca)
        cert.write_text(self.server.certificate)
        key.write_text(self.server.private_key)
        key.chmod(0o600)
        return ca, cert, key

    def broker_listener_config(self, directory: Path, *, require_certificate: bool = True) -> str:
        """Mosquitto lines that turn the listener above them into TLS (files written here)."""
        ca, cert, key = self.write_broker_files(directory)
        return (
            f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
            f"require_certificate {'true' if require_certificate else 'false'}\n"
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotflow tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: PrivateKey) -> str:
    form = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(
        serialization.Encoding.PEM, form, serialization.NoEncryption()
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return _pem_cert(self.certificate)

    def issue(self, common_name: str, *, server: bool, key: PrivateKey) -> Identity:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        return Identity(_pem_cert(certificate), _pem_key(key))


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_pki(client_name: str = "iotflow-client") -> Pki:
    """A fresh CA with a broker and a client certificate, and a rogue client from another CA."""
    authority = _Authority("iotflow test CA")
    other = _Authority("some other CA")
    return Pki(
        ca=authority.pem,
        server=authority.issue(
            "127.0.0.1", server=True, key=ec.generate_private_key(ec.SECP256R1())
        ),
        client=authority.issue(client_name, server=False, key=_rsa()),
        rogue=other.issue(client_name, server=False, key=_rsa()),
        rogue_ca=other.pem,
    )
