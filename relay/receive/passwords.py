"""Local account passwords: salted scrypt hashes, verified off the event loop and cached.

scrypt (RFC 7914, in the standard library) is deliberately slow and memory-hard, so a
stolen config does not give passwords away. A legacy app that logs in for every message
must not pay that cost each time, though: after one successful verification a keyed
HMAC of the password is kept in memory, so the next logins compare in microseconds.
The HMAC key is random per process and never stored, and the cache entry is bound to the
hash string, so changing a user's hash in the config invalidates it.

Hash format: ``$scrypt$ln=14,r=8,p=1$<salt b64>$<hash b64>``.
"""

from __future__ import annotations

import asyncio
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


# A valid hash of a random password, used for unknown users so that "no such user" and
# "wrong password" take the same time and cannot be told apart.
_DUMMY_HASH = hash_password(os.urandom(16).hex(), ln=DEFAULT_LN)


class PasswordVerifier:
    """Checks logins against a ``{user: hash}`` table; see the module docstring.

    The cache holds at most one entry per configured user, so it is bounded by the config.
    Slow verifications run in worker threads, at most ``concurrency`` at a time, so that a
    burst of logins (or a brute-force attempt) cannot exhaust memory or stall the loop.
    """

    def __init__(self, hashes: dict[str, str], concurrency: int = 2) -> None:
        self._hashes = dict(hashes)
        self._key = os.urandom(32)
        self._cache: dict[str, bytes] = {}
        self._slots = asyncio.Semaphore(concurrency)

    def _fingerprint(self, stored: str, password: bytes) -> bytes:
        return hmac.new(self._key, stored.encode() + b"\0" + password, hashlib.sha256).digest()

    def update(self, hashes: dict[str, str]) -> None:
        """Swap in a new user table (config reload); cached logins of changed users drop."""
        self._hashes = dict(hashes)
        self._cache = {u: f for u, f in self._cache.items() if u in self._hashes}

    async def verify(self, user: str, password: bytes) -> bool:
        stored = self._hashes.get(user)
        if stored is not None:
            cached = self._cache.get(user)
            if cached is not None and hmac.compare_digest(
                    cached, self._fingerprint(stored, password)):
                return True
        async with self._slots:
            ok = await asyncio.to_thread(verify_password, password, stored or _DUMMY_HASH)
        if ok and stored is not None:
            self._cache[user] = self._fingerprint(stored, password)
            return True
        return False
