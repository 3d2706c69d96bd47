"""An access token, what it says about itself, and the failure to get one.

- :class:`Token`: an access token for Exchange Online with its expiry and its (unverified)
  claims: audience, tenant, application permissions (``roles``), delegated scopes;
- :func:`decode_claims`: the payload of a JWT, for display and expiry only;
- :data:`SEND_AS_APP`: the application permission Exchange Online requires for SMTP AUTH
  with app-only tokens;
- :class:`TokenError`: no token could be obtained, with a message that says what to fix
  and whether retrying later may help.

Exchange verifies the token; the relay only reads it, to know when to renew it and to
tell an operator (``token``, ``doctor``) what Entra ID put in it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from typing import Any

from relay.core.errors import RelayError
from relay.core.secrets import Secret

# The application permission Exchange Online requires for SMTP AUTH with app-only tokens.
SEND_AS_APP = "SMTP.SendAsApp"


class TokenError(RelayError):
    """No token could be obtained; ``message`` is safe to log and says what to do.

    ``transient`` is True when retrying later may succeed without a configuration change
    (Entra ID unavailable, network trouble); False when someone has to fix something.
    """

    def __init__(self, message: str, *, code: int | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.transient = transient

    def __repr__(self) -> str:
        return (f"TokenError({self.message!r}, code={self.code!r}, "
                f"transient={self.transient!r})")


def decode_claims(access_token: str) -> dict[str, Any]:
    """The payload of a JWT, NOT verified (for display and expiry only); {} if not a JWT."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return payload if isinstance(payload, dict) else {}


@dataclass(frozen=True)
class Token:
    """An access token and what it says about itself (unverified: Exchange verifies it)."""

    access_token: Secret
    expires_at: float
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    obtained_at: float = field(default=0.0, compare=False)  # when it was asked for

    @property
    def audience(self) -> str | None:
        aud = self.claims.get("aud")
        return aud if isinstance(aud, str) else None

    @property
    def tenant(self) -> str | None:
        return self.claims.get("tid")

    @property
    def roles(self) -> tuple[str, ...]:
        """Application permissions (app-only tokens carry ``roles``, e.g. SMTP.SendAsApp)."""
        return tuple(self.claims.get("roles") or ())

    @property
    def scopes(self) -> tuple[str, ...]:
        """Delegated permissions: a token with ``scp`` was issued for a user, not the app."""
        return tuple(str(self.claims.get("scp") or "").split())

    @property
    def app_id(self) -> str | None:
        return self.claims.get("appid") or self.claims.get("azp")

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)
