"""App certificates: the one place the relay opens a PEM or PFX file and its passphrase.

- :func:`msal_credential`: what msal signs its client assertion with, from
  ``credentials.<name>.certificate`` (PEM key + thumbprint, PEM key + public certificate,
  or PFX), checking that key and certificate belong together;
- :func:`app_certificate`: that credential's public certificate (for its expiry), or None
  when only a thumbprint is configured;
- :func:`load_certificate` and :func:`load_pfx`: one certificate file (the first
  certificate of a PEM file, or a PFX opened with its passphrase), for the metrics too;
- :class:`CertificateError`: a file that cannot be used, with a message that names the
  setting and the file and is safe to show.

The token providers, ``doctor`` and the expiry metrics all read these files; reading them
in one place means one set of error messages, and a passphrase that is registered for
redaction (relay.core.log) before anything can fail with it in hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.config import CertificateCredential, SecretRef
from relay.core.errors import RelayError
from relay.core.log import redact
from relay.core.secrets import SecretSourceError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography (several MiB resident) is imported by the functions that need it: a relay
# with a client secret and no certificate never loads it.


class CertificateError(RelayError):
    """A certificate setting that cannot be used; the message names it and is safe to show."""


def load_pfx(path: Path, what: str, passphrase: SecretRef | None) -> tuple[Any, Any]:
    """The private key and certificate in the PFX at ``path`` (``what``: its setting);
    either may be None when the file lacks it."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = _read(path, what)
    secret = _passphrase(passphrase, what, path)
    try:
        key, leaf, _ = pkcs12.load_key_and_certificates(data, secret)
    except ValueError:
        raise CertificateError(f"cannot open {what} {path} (wrong passphrase, or not a "
                               "PKCS#12 file)") from None
    return key, leaf


def load_certificate(path: Path, what: str, *, pfx: bool = False,
                     passphrase: SecretRef | None = None) -> x509.Certificate:
    """The certificate in the PFX (``pfx``) or the first one of the PEM file at ``path``."""
    from cryptography import x509

    if pfx:
        _, leaf = load_pfx(path, what, passphrase)
        if leaf is None:
            raise CertificateError(f"{what} {path} holds no certificate")
        return leaf
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CertificateError(f"{what} {path} is not a PEM certificate") from None


def app_certificate(cert: CertificateCredential, where: str) -> x509.Certificate | None:
    """The public certificate of ``cert`` (``where``: its setting), None with a thumbprint."""
    if cert.pfx_file is not None:
        return load_certificate(cert.pfx_file, f"{where}.pfx_file", pfx=True,
                                passphrase=cert.passphrase)
    if cert.public_certificate_file is not None:
        return load_certificate(cert.public_certificate_file,
                                f"{where}.public_certificate_file")
    return None


def msal_credential(cert: CertificateCredential, where: str) -> dict[str, str]:
    """msal's ``client_credential`` for ``cert``: the private key (PEM, unencrypted, only in
    memory) with its public certificate or thumbprint."""
    from cryptography.hazmat.primitives import serialization

    if cert.pfx_file is not None:
        key, leaf = load_pfx(cert.pfx_file, f"{where}.pfx_file", cert.passphrase)
        if key is None or leaf is None:
            raise CertificateError(f"{where}.pfx_file {cert.pfx_file} must contain both the "
                                   "private key and its certificate")
        return {"private_key": _pem_key(key),
                "public_certificate": leaf.public_bytes(serialization.Encoding.PEM).decode()}
    assert cert.private_key_file is not None
    what = f"{where}.private_key_file"
    key_pem = _read(cert.private_key_file, what)
    secret = _passphrase(cert.passphrase, what, cert.private_key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, secret)
    except (ValueError, TypeError):
        raise CertificateError(f"{what} {cert.private_key_file}: cannot load the PEM private "
                               "key (wrong or missing passphrase?)") from None
    out = {"private_key": _pem_key(key)}
    if cert.public_certificate_file is not None:
        leaf = load_certificate(cert.public_certificate_file,
                                f"{where}.public_certificate_file")
        if _spki(leaf.public_key()) != _spki(key.public_key()):
            raise CertificateError(f"{where}: the private key does not belong to the "
                                   "public certificate")
        out["public_certificate"] = leaf.public_bytes(serialization.Encoding.PEM).decode()
    else:
        assert cert.thumbprint is not None
        out["thumbprint"] = cert.thumbprint.replace(":", "").upper()
    return out


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _passphrase(ref: SecretRef | None, what: str, path: Path) -> bytes | None:
    """The passphrase, registered for redaction before it is used."""
    if ref is None:
        return None
    try:
        secret = ref.resolve().reveal()
    except SecretSourceError as exc:
        raise CertificateError(f"cannot read the passphrase for {what} {path}: {exc}"
                               ) from None
    if secret:
        redact(secret)
    return secret.encode()


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem_key(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
