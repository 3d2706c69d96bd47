"""Checking AUTH passwords of local accounts, off the event loop and cached.

- :class:`PasswordVerifier`: checks a login against the configured ``{user: hash}`` table.

The hashes (:mod:`relay.core.passhash`) are deliberately slow, and a legacy app that logs
in for every message must not pay that cost each time: after one successful verification
a keyed HMAC of the password is kept in memory, so the next logins compare in
microseconds. The HMAC key is random per process and never stored, and the cache entry is
bound to the hash string, so changing a user's hash in the config invalidates it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os

from relay.core.passhash import DEFAULT_LN, hash_password, verify_password

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
