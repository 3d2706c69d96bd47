"""A throw-away certificate authority for the sandbox and the tests.

The stand-ins for Entra ID and Exchange Online serve TLS with a certificate from this CA,
and the relay is configured to trust exactly this CA, as it would a corporate CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class LocalPKI:
    """Files of a CA and of one server certificate valid for localhost, 127.0.0.1,
    127.0.0.2 and ::1 (127.0.0.2: a server there sees loopback clients as remote ones)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


_SERVER_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_pki(directory: Path, days: int = 30) -> LocalPKI:
    """Create (or reuse, when still valid for a day and for the same names) a CA and a
    loopback server cert."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = LocalPKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if all(p.exists() for p in (pki.ca_file, pki.cert_file, pki.key_file)):
        cert = x509.load_pem_x509_certificate(pki.cert_file.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if (cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
                and set(_SERVER_NAMES) <= set(names)):
            return pki

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("smtp-oauth-relay sandbox CA"))
        .issuer_name(_name("smtp-oauth-relay sandbox CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_SERVER_NAMES), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.touch(mode=0o600)
    pki.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return pki
