"""The fake Entra ID's delegated flows: a user signs in once, the app keeps a refresh token.

- :class:`UserFlows`: the authorization-code flow with PKCE (:meth:`~UserFlows.sign_in`
  plays the user at the browser; the code is redeemed with its verifier), the
  device-code flow (``/devicecode``, then the
  ``device_code`` grant answering ``authorization_pending``, ``slow_down``,
  ``expired_token`` or ``authorization_declined`` until the user acts, through
  :meth:`~UserFlows.approve` and :meth:`~UserFlows.decline`), and the ``refresh_token``
  grant, which rotates the token on every use and answers ``invalid_grant`` with Entra's
  AADSTS codes for one that is unknown, already used, revoked (:meth:`~UserFlows.revoke`)
  or unused for too long.

Delegated tokens carry ``scp`` (the delegated permissions, e.g. ``SMTP.Send``) and the
user's ``upn`` instead of the app's ``roles``. The apps are public clients (no secret),
as a device-code app registration is ("Allow public client flows").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_RESERVED = {"openid", "profile", "offline_access", "email"}


@dataclass
class _Device:
    client_id: str
    scopes: list[str]
    expires_at: float
    user: str | None = None
    declined: bool = False
    last_poll: float = 0.0


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scopes: list[str]
    user: str
    expires_at: float


@dataclass
class _Grant:
    client_id: str
    user: str
    scopes: list[str]
    last_used: float = field(default_factory=time.time)


class FlowError(Exception):
    def __init__(self, error: str, code: int, text: str) -> None:
        super().__init__(text)
        self.error, self.code, self.text = error, code, text


class UserFlows:
    """Device codes handed out and refresh tokens alive, by value."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}      # by device code
        self._by_user_code: dict[str, str] = {}
        self._grants: dict[str, _Grant] = {}        # refresh token -> grant
        self._codes: dict[str, _Code] = {}          # authorization codes
        self.poll_interval = 1
        self.device_lifetime = 900                 # seconds a device code stays valid
        self.slow_down_once = False                # answer the next poll with slow_down
        self.inactivity_limit = 90 * 86400.0       # Entra's: 90 days unused

    # --- the user's side (tests act as the user) -----------------------------------------

    def approve(self, user_code: str, user: str) -> None:
        with self._lock:
            self._devices[self._by_user_code[user_code]].user = user

    def decline(self, user_code: str) -> None:
        with self._lock:
            self._devices[self._by_user_code[user_code]].declined = True

    def pending(self) -> list[str]:
        """The user codes of device flows still waiting for the user."""
        with self._lock:
            return [code for code, device in self._by_user_code.items()
                    if device in self._devices and self._devices[device].user is None
                    and not self._devices[device].declined]

    def sign_in(self, auth_uri: str, user: str) -> str:
        """``user`` signs in at ``auth_uri`` (the authorization-code flow): the address the
        browser is sent back to, with the code and the state."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(auth_uri).query).items()}
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            raise ValueError("no PKCE code challenge (S256) in the authorization request")
        code = secrets.token_urlsafe(32)
        scopes = [s for s in query.get("scope", "").split() if s.lower() not in _RESERVED]
        with self._lock:
            self._codes[code] = _Code(query["client_id"], query["redirect_uri"],
                                      query["code_challenge"], scopes, user,
                                      time.time() + 600)
        return (f"{query['redirect_uri']}?"
                f"{urlencode({'code': code, 'state': query.get('state', '')})}")

    def redeem_code(self, client_id: str, code: str, verifier: str,
                    redirect_uri: str) -> tuple[str, list[str], str]:
        """(user, scopes, a new refresh token) for an authorization code; else FlowError."""
        with self._lock:
            grant = self._codes.pop(code, None)
            if grant is None or grant.client_id.lower() != client_id.lower() \
                    or time.time() > grant.expires_at:
                raise FlowError("invalid_grant", 70008, "The provided authorization code or "
                                "refresh token has expired due to inactivity. Send a new "
                                "interactive authorization request for this user and "
                                "resource.")
            if grant.redirect_uri != redirect_uri:
                raise FlowError("invalid_grant", 50011, "The redirect URI specified in the "
                                "request does not match the redirect URIs configured.")
            challenge = base64.urlsafe_b64encode(
                hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not hmac.compare_digest(challenge, grant.challenge):
                raise FlowError("invalid_grant", 501481, "The Code_Verifier does not match "
                                "the code_challenge supplied in the authorization request.")
            return grant.user, grant.scopes, self._new_grant(client_id, grant.user,
                                                             grant.scopes)

    def revoke(self, user: str) -> None:
        """The user's sessions are revoked (password change, admin action)."""
        with self._lock:
            for token in [t for t, g in self._grants.items() if g.user == user.lower()]:
                del self._grants[token]

    def age(self, seconds: float) -> None:
        """Let every refresh token go unused for ``seconds`` more."""
        with self._lock:
            for grant in self._grants.values():
                grant.last_used -= seconds

    # --- the app's side ------------------------------------------------------------------

    def start_device_flow(self, client_id: str, scope: str, verification: str) -> dict[str, Any]:
        scopes = [s for s in scope.split() if s.lower() not in _RESERVED]
        device_code, user_code = secrets.token_urlsafe(32), secrets.token_hex(4).upper()
        with self._lock:
            self._devices[device_code] = _Device(client_id, scopes,
                                                 time.time() + self.device_lifetime)
            self._by_user_code[user_code] = device_code
        return {"device_code": device_code, "user_code": user_code,
                "verification_uri": verification, "expires_in": self.device_lifetime,
                "interval": self.poll_interval,
                "message": f"To sign in, use a web browser to open the page {verification} "
                           f"and enter the code {user_code} to authenticate."}

    def redeem_device_code(self, client_id: str, device_code: str) -> tuple[str, list[str],
                                                                              str]:
        """(user, scopes, new refresh token) once the user approved; else FlowError."""
        now = time.time()
        with self._lock:
            device = self._devices.get(device_code)
            if device is None or device.client_id.lower() != client_id.lower():
                raise FlowError("invalid_grant", 70000, "The provided value for the input "
                                "parameter 'device_code' is not valid.")
            if now > device.expires_at:
                raise FlowError("expired_token", 70020, "The provided value for the input "
                                "parameter 'device_code' is not valid. This device code has "
                                "expired.")
            if device.declined:
                raise FlowError("authorization_declined", 70019,
                                "The end user denied the authorization request.")
            if device.user is None or self.slow_down_once:
                too_soon = (now - device.last_poll < self.poll_interval * 0.5
                            or self.slow_down_once)
                self.slow_down_once = False
                device.last_poll = now
                if too_soon:
                    raise FlowError("slow_down", 70019, "Polling too fast.")
                raise FlowError("authorization_pending", 70016, "OAuth 2.0 device flow "
                                "error. Authorization is pending. Continue polling.")
            del self._devices[device_code]
            return device.user, device.scopes, self._new_grant(client_id, device.user,
                                                               device.scopes)

    def redeem_refresh_token(self, client_id: str, token: str,
                             scope: str = "") -> tuple[str, list[str], str]:
        """(user, scopes, the refresh token that replaces ``token``); else FlowError. A
        refresh token serves any resource the user consented to: ``scope`` picks it."""
        with self._lock:
            grant = self._grants.pop(token, None)
            if grant is None or grant.client_id.lower() != client_id.lower():
                raise FlowError("invalid_grant", 50173, "The provided grant has expired due "
                                "to it being revoked, a fresh auth token is needed. The user "
                                "might have changed or reset their password.")
            if time.time() - grant.last_used > self.inactivity_limit:
                raise FlowError("invalid_grant", 700082, "The refresh token has expired due "
                                "to inactivity. The token was issued on ... and was inactive "
                                "for 90.00:00:00.")
            wanted = [s for s in scope.split() if s.lower() not in _RESERVED]
            return grant.user, wanted or grant.scopes, self._new_grant(
                client_id, grant.user, grant.scopes)

    def _new_grant(self, client_id: str, user: str, scopes: list[str]) -> str:
        token = "0.rt." + secrets.token_urlsafe(48)
        self._grants[token] = _Grant(client_id, user.lower(), scopes)
        return token
