"""Password hashes for local accounts: salted scrypt, in one text format.

- :func:`hash_password`: a new hash (``smtp-oauth-relay hash-password``);
- :func:`verify_password`: the slow, constant-time check of a password against one;
- :func:`check_hash_format`: whether a configured value is such a hash (config validation).

scrypt (RFC 7914, in the standard library) is deliberately slow and memory-hard, so a
stolen config does not give passwords away. Format:
``$scrypt$ln=14,r=8,p=1$<salt b64>$<hash b64>``. The config, the command line and the
receiving side all need the format, so it is defined once, here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

_FORMAT = re.compile(
    r"^\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)$"
)
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 14, 8, 1
_DKLEN = 32
_MAXMEM = 256 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def check_hash_format(value: str) -> None:
    """Raise ValueError when ``value`` is not a hash this module produced."""
    m = _FORMAT.match(value)
    if not m:
        raise ValueError("password_hash must come from `smtp-oauth-relay hash-password` "
                         "(it starts with $scrypt$)")
    if not 10 <= int(m["ln"]) <= 20:
        raise ValueError("password_hash: scrypt cost ln must be between 10 and 20")


def hash_password(password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**ln, r=r, p=p,
                            maxmem=_MAXMEM, dklen=_DKLEN)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Slow, constant-time check of ``password`` against one hash."""
    m = _FORMAT.match(encoded)
    if not m:
        return False
    expected = _unb64(m["hash"])
    digest = hashlib.scrypt(password, salt=_unb64(m["salt"]), n=2 ** int(m["ln"]),
                            r=int(m["r"]), p=int(m["p"]), maxmem=_MAXMEM,
                            dklen=len(expected))
    return hmac.compare_digest(digest, expected)
