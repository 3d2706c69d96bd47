"""The server-side TLS context for the SMTP listeners (STARTTLS and implicit TLS).

The certificate and key are read and checked with ``cryptography`` before OpenSSL sees
them, because OpenSSL's own errors ("[SSL] PEM lib", "KEY_VALUES_MISMATCH") do not say
which file is wrong or why. An encrypted key is refused rather than letting OpenSSL ask
for a passphrase on the terminal of a service that has none.

Implicit-TLS sockets are bound once, but certificates are renewed while the relay runs;
:class:`SwitchableContext` lets a bound listener pick up the context of a reloaded
configuration at each new handshake.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from relay.config import ConfigError, ServerTLS

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

# A certificate that expires within this many days gets a warning at every (re)load.
EXPIRY_WARNING_DAYS = 14


def _problem(key: str, message: str) -> ConfigError:
    return ConfigError("configuration", [(key, message)])


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _problem(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _no_passphrase() -> bytes:
    # Called by OpenSSL only for an encrypted key; refuse instead of prompting on a tty.
    raise ValueError("encrypted private keys are not supported")


def _check_pair(tls: ServerTLS) -> list[x509.Certificate]:
    """Load both files and check that the key belongs to the first certificate."""
    # Imported here: a relay without TLS listeners never loads cryptography (several MiB).
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_key, key_key = "server.tls.certificate_file", "server.tls.key_file"
    try:
        chain = x509.load_pem_x509_certificates(_read(tls.certificate_file, cert_key))
    except ValueError:
        raise _problem(cert_key, f"{tls.certificate_file} holds no PEM certificate "
                                 "(expected -----BEGIN CERTIFICATE-----)") from None
    try:
        key = serialization.load_pem_private_key(_read(tls.key_file, key_key), password=None)
    except TypeError:
        raise _problem(key_key, f"{tls.key_file} is encrypted; give an unencrypted key "
                                "(e.g. openssl pkey -in enc.key -out plain.key) and "
                                "protect it with file permissions") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _problem(key_key, f"{tls.key_file} holds no usable PEM private key "
                                "(expected -----BEGIN PRIVATE KEY-----)") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, spki) != chain[0].public_key().public_bytes(pem, spki):
        raise _problem(key_key, f"{tls.key_file} does not match the certificate in "
                                f"{tls.certificate_file} (the first certificate in the file "
                                "must be the server's own)")
    return chain


def _warn_expiry(cert: x509.Certificate, path: Path) -> None:
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left <= dt.timedelta(0):
        log.error("server certificate %s expired on %s; TLS clients will refuse it",
                  path, cert.not_valid_after_utc.date())
    elif left <= dt.timedelta(days=EXPIRY_WARNING_DAYS):
        log.warning("server certificate %s expires on %s (in %d days)",
                    path, cert.not_valid_after_utc.date(), left.days)


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """A TLS 1.2+ server context for ``tls``; raises :class:`ConfigError` naming the file."""
    chain = _check_pair(tls)
    _warn_expiry(chain[0], tls.certificate_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(tls.certificate_file, tls.key_file, password=_no_passphrase)
    except (ssl.SSLError, ValueError) as exc:
        raise _problem("server.tls", f"OpenSSL refused {tls.certificate_file} / "
                                     f"{tls.key_file}: {exc}") from None
    return ctx


class SwitchableContext:
    """A context for a bound listener that hands each handshake the current context.

    The SNI callback runs for every ClientHello (with ``None`` as the name when the
    client sent none, as is usual when connecting by IP address) and may replace the
    context of that one connection; so assigning :attr:`current` takes effect for new
    handshakes without closing the listening socket.
    """

    def __init__(self, tls: ServerTLS, initial: ssl.SSLContext) -> None:
        self.current = initial
        self.front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.front.minimum_version = ssl.TLSVersion.TLSv1_2
        # The front context carries the same certificate, so that a handshake still
        # succeeds should the callback ever not run.
        self.front.load_cert_chain(tls.certificate_file, tls.key_file,
                                   password=_no_passphrase)
        self.front.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current
