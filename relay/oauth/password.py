"""A client secret used as a password, for the one upstream that logs in that way.

- :class:`SecretSource`: hands out the credential's client secret in the shape of a token
  (``access_token``), read from its source each time it is asked for a fresh one.

Azure Communication Services Email takes an Entra application's client secret as the
SMTP password (AUTH LOGIN, the username naming the resource, app and tenant), not an
OAuth token. Giving the secret the token's shape lets the delivery step treat both
alike: a refused login asks for a fresh one once (which re-reads a secret rotated on
disk), then defers the message and marks the profile not ready.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from relay.config import Credential
from relay.core.log import redact
from relay.core.secrets import Secret, SecretSourceError
from relay.oauth.token import TokenError


@dataclass(frozen=True)
class Password:
    """The secret as the delivery step's sessions expect a token."""

    access_token: Secret


class SecretSource:
    """The client secret of credential ``name``, for an upstream that wants it as is."""

    def __init__(self, name: str, credential: Credential) -> None:
        self.name = name
        self.credential = credential
        self._current: Password | None = None

    async def get(self) -> Password:
        if self._current is None:
            self._current = await self._read()
        return self._current

    async def refresh(self, stale: Password | None = None) -> Password:
        """The secret read again (it may have been rotated in its file)."""
        self._current = await self._read()
        return self._current

    async def _read(self) -> Password:
        ref = self.credential.client_secret
        if ref is None:
            raise TokenError(f"credential {self.name!r} has no client_secret, which an ACS "
                             "upstream uses as its SMTP password")
        try:
            secret = await asyncio.to_thread(ref.resolve)
        except SecretSourceError as exc:
            raise TokenError(f"credential {self.name!r}: {exc}", transient=True) from None
        redact(secret.reveal())
        return Password(secret)
