"""OAuth access tokens for Exchange Online: one shared, proactively refreshed token per credential.

Every upstream session needs a token, and fetching one per session is slow and gets an app
throttled by Entra ID. So each credential has one :class:`TokenProvider` that every session
asks: it hands out the cached token, lets any number of concurrent callers share a single
in-flight fetch, refreshes in the background before expiry, and keeps mail flowing on the
current token while Entra ID is briefly unavailable.

msal does the protocol work (OIDC discovery, client secret or certificate assertion) but is
synchronous and does blocking network I/O, even in its constructor, so it only ever runs in
the provider's worker thread, never on the event loop. Our cache is authoritative: msal's
own cache would keep returning a token until 5 minutes before expiry and cannot be told to
refresh early (or after Exchange rejected it), so it is cleared before every fetch.

Errors become :class:`TokenError` with a message that says what to fix (which secret value,
which setting) and never contains a secret or a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from relay.config import Config, Credential
from relay.core.errors import RelayError
from relay.core.events import NO_HOOKS, Hooks
from relay.core.log import redact
from relay.core.secrets import Secret, SecretSourceError

log = logging.getLogger(__name__)

# msal's DEBUG output describes every token response (token masked, but its shape and
# type are logged); keep it at WARNING unless someone configured the logger explicitly.
if logging.getLogger("msal").level == logging.NOTSET:
    logging.getLogger("msal").setLevel(logging.WARNING)

HTTP_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds for every request to Entra ID
MIN_USABLE = 30.0  # a cached token with less left than this is not handed out on failure
BACKOFF_MIN = 5.0
BACKOFF_MAX = 60.0
_MAX_SLEEP = 30.0  # the refresher re-checks at least this often (clock jumps, suspend)

# Entra "error" values that mean "try again later", not "fix your configuration".
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})

_ADVICE: dict[int, str] = {
    7000215: "the client secret is wrong: use the secret's *Value* from Entra ID "
             "(Certificates & secrets), not its Secret ID, and check that it belongs to this "
             "app registration",
    7000222: "the client secret has expired: create a new client secret for the app "
             "registration in Entra ID (Certificates & secrets) and update the configuration",
    700016: "the application (client) id was not found in this tenant: check client_id, "
            "tenant_id and cloud (an app registered in another tenant or cloud is not "
            "found here)",
    90002: "the tenant was not found: check tenant_id (directory id or a verified domain) "
           "and cloud",
    500011: "the resource was not found in the tenant: Exchange Online is not available in "
            "this tenant, or the scope names the wrong resource (for Exchange it is "
            "https://outlook.office365.com/.default in the global cloud)",
    1002012: "the scope is not valid for the client-credentials flow: it must end in "
             "/.default, e.g. https://outlook.office365.com/.default",
    700027: "the certificate is not registered on the app registration or the signature "
            "does not match: upload the public certificate in Entra ID (Certificates & "
            "secrets) and check that private key, certificate and thumbprint belong together",
    700024: "the client assertion was rejected as expired or not yet valid: check that this "
            "machine's clock is correct",
    7000218: "no client credential was sent: configure client_secret or certificate",
}


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


# --- tokens --------------------------------------------------------------------------------

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


# --- explaining failures -----------------------------------------------------------------

_AADSTS_RE = re.compile(r"AADSTS(\d+)")


def _entra_code(result: dict[str, Any]) -> int | None:
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    m = _AADSTS_RE.search(str(result.get("error_description") or ""))
    return int(m.group(1)) if m else None


def _first_sentence(description: str) -> str:
    """Entra's description without the trace/correlation/timestamp tail (given separately)."""
    text = " ".join(description.split())
    return re.split(r"\s+Trace ID:", text, maxsplit=1)[0]


def explain_entra_error(result: dict[str, Any]) -> str:
    """An actionable sentence for an error reply of Entra ID's token or discovery endpoint."""
    error = str(result.get("error") or "unknown_error")
    description = _first_sentence(str(result.get("error_description") or ""))
    code = _entra_code(result)
    advice = _ADVICE.get(code) if code is not None else None
    if advice is None and error == "invalid_scope":
        advice = _ADVICE[1002012]
    if advice is None and error in _TRANSIENT_ERRORS:
        advice = "Entra ID is temporarily unavailable; the relay keeps retrying"
    ids = ", ".join(f"{k}={result[k]}" for k in ("trace_id", "correlation_id") if result.get(k))
    detail = f"Entra ID said: {error}: {description}" if description else f"Entra ID said: {error}"
    if ids:
        detail += f" ({ids})"
    return f"{advice}. {detail}" if advice else detail


def _proxy_hint(url: str) -> str:
    proxies = requests.utils.get_environ_proxies(url)
    if proxies.get("https") or proxies.get("all"):
        return ("requests to Entra ID go through the proxy from HTTPS_PROXY; check that it is "
                "reachable, or exempt the host with NO_PROXY")
    return ("if outbound traffic must go through a proxy, set HTTPS_PROXY (and NO_PROXY "
            "for exceptions) in the relay's environment")


def explain_exception(exc: BaseException, name: str, authority: str) -> TokenError:
    """Turn whatever msal/requests/cryptography raised into a safe, actionable TokenError."""
    prefix = f"credential {name!r}: "
    host = urlsplit(authority).netloc or authority
    if isinstance(exc, TokenError):
        if exc.message.startswith(prefix):
            return exc
        return TokenError(prefix + exc.message, code=exc.code, transient=exc.transient)
    if isinstance(exc, requests.exceptions.SSLError):
        reason = _short(exc)
        # A certificate or protocol mismatch needs a fix; a reset mid-handshake does not.
        config_problem = any(s in reason for s in ("CERTIFICATE_VERIFY_FAILED",
                                                   "WRONG_VERSION_NUMBER", "hostname"))
        return TokenError(
            prefix + f"TLS connection to {host} failed ({reason}). If a TLS-inspecting "
            f"proxy or firewall is in between, set credentials.{name}.ca_file to its CA "
            f"bundle; {_proxy_hint(authority)}", transient=not config_problem)
    if isinstance(exc, requests.exceptions.ProxyError):
        return TokenError(prefix + f"the proxy refused or failed the connection to {host} "
                          f"({_short(exc)}); check HTTPS_PROXY / NO_PROXY", transient=True)
    if isinstance(exc, requests.exceptions.Timeout):
        return TokenError(prefix + f"Entra ID at {host} did not answer in time; "
                          + _proxy_hint(authority), transient=True)
    if isinstance(exc, requests.exceptions.RequestException):
        return TokenError(prefix + f"cannot reach Entra ID at {host} ({_short(exc)}); check "
                          "DNS and firewall; " + _proxy_hint(authority), transient=True)
    if isinstance(exc, msal.exceptions.MsalServiceError):
        m = re.search(r"HTTP Error: (\d+)", str(exc))
        status = f"HTTP {m.group(1)}" if m else "a server error"
        return TokenError(prefix + f"Entra ID at {host} answered with {status}; this is "
                          "usually temporary and the relay keeps retrying", transient=True)
    if isinstance(exc, SecretSourceError):
        return TokenError(prefix + f"cannot read the client secret: {exc}", transient=False)
    if isinstance(exc, ValueError):
        return _explain_value_error(exc, prefix, authority)
    if isinstance(exc, OSError):  # e.g. requests cannot open ca_file
        return TokenError(prefix + f"{_short(exc)} (check credentials.{name}.ca_file)",
                          transient=False)
    return TokenError(prefix + f"unexpected error while fetching a token "
                      f"({exc.__class__.__name__}); see the debug log", transient=True)


def _explain_value_error(exc: ValueError, prefix: str, authority: str) -> TokenError:
    """msal raises ValueError for discovery failures: unknown tenant, malformed authority."""
    for e in (exc, exc.__context__, exc.__cause__):
        text = str(e) if e is not None else ""
        if "OIDC Discovery failed" in text and "Error: " in text:
            with contextlib.suppress(ValueError):
                body = json.loads(text.split("Error: ", 1)[1])
                if isinstance(body, dict) and body.get("error"):
                    return TokenError(prefix + explain_entra_error(body),
                                      code=_entra_code(body), transient=False)
    text = str(exc)
    if "Unable to get authority configuration" in text or "OIDC Discovery" in text:
        return TokenError(prefix + f"Entra ID has no tenant at {authority}: check tenant_id "
                          "and cloud (or authority, if set)", transient=False)
    if "invalid_instance" in text:
        return TokenError(prefix + f"the authority host in {authority} is not known to "
                          "Microsoft: check cloud / authority", transient=False)
    if "should consist of an https url" in text:
        return TokenError(prefix + f"the authority {authority} is not a valid https URL "
                          "with a tenant", transient=False)
    return TokenError(prefix + f"msal rejected the configuration ({_short(exc)})",
                      transient=False)


def _short(exc: BaseException, limit: int = 200) -> str:
    """A one-line, bounded description of a library exception (URLs only, no bodies)."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if m := re.search(r"\[SSL[^\]]*\][^()']*", text):
        return m.group(0).strip()[:limit]
    if "NameResolution" in text or "Name or service not known" in text:
        return "DNS lookup failed"
    if m := re.search(r"\[Errno -?\d+\] [^'\"()]+", text):
        return m.group(0).strip()[:limit]
    if "timed out" in text.lower():
        return "timed out"
    return text[:limit]


# --- HTTP --------------------------------------------------------------------------------

class _EntraSession(requests.Session):
    """A requests session that trusts exactly ``ca_file`` (when set) and honours proxies.

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override ``verify``, so the CA is
    pinned after the environment has been merged; ``trust_env`` stays on for HTTPS_PROXY.
    """

    def __init__(self, ca_file: str | None, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._ca_file = ca_file
        self._timeout = timeout
        adapter = requests.adapters.HTTPAdapter(max_retries=1)  # as msal's own default
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._ca_file:
            settings["verify"] = self._ca_file
        return settings

    def request(self, method: str | bytes, url: str | bytes,
                *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)


# --- the provider ------------------------------------------------------------------------

def _read(path: os.PathLike[str] | str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TokenError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class TokenProvider:
    """The token of one credential, shared by every upstream session that uses it."""

    def __init__(self, name: str, credential: Credential, *,
                 clock: Callable[[], float] = time.time, hooks: Hooks = NO_HOOKS) -> None:
        self.name = name
        self.credential = credential
        self._clock = clock
        self._hooks = hooks
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"token-{name}")
        # Worker-thread state: only touched from the executor's single thread.
        self._app: Any = None
        self._session: _EntraSession | None = None
        self._certificate: dict[str, str] | None = None
        # Event-loop state.
        self._token: Token | None = None
        self._refresh_at = 0.0  # when the background refresher replaces the token
        self._retry_after = 0.0
        self._inflight: asyncio.Task[Token] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._warned_lifetime = False

    def __repr__(self) -> str:
        return f"TokenProvider({self.name!r})"

    @property
    def current(self) -> Token | None:
        """The cached token, if any (for status pages; may be near expiry)."""
        return self._token

    # --- public API ------------------------------------------------------------------------

    async def get(self) -> Token:
        """A valid token, from the cache while it is fresh, else freshly fetched."""
        token = self._token
        now = self._clock()
        if token is not None and token.expires_in(now) > self.credential.refresh_before:
            return token
        if self._usable(token, now):
            # Due for renewal but still good: renew in the background (unless a fetch just
            # failed: the refresher retries with backoff). Mail must not wait on a slow or
            # hanging Entra ID while the token it has works.
            if now >= self._retry_after:
                self._start_fetch()
            return token
        try:
            return await self._shared_fetch()
        except TokenError:
            token = self._token
            if self._usable(token, self._clock()):
                return token  # the fetch already logged a warning
            raise

    async def refresh(self, stale: Token | None = None) -> Token:
        """A token other than ``stale`` (rejected upstream); one fetch for many callers."""
        current = self._token
        if (current is not None and stale is not None
                and current.access_token != stale.access_token):
            return current
        return await self._shared_fetch()

    def start(self) -> None:
        """Launch the background refresher (call from the running event loop)."""
        if self._closed:
            raise RuntimeError(f"token provider {self.name!r} is closed")
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"token-refresh-{self.name}")

    def close(self) -> None:
        """Stop refreshing and release the worker; safe to call without a running loop.

        A fetch in flight is left to finish, so a delivery still holding this provider
        (during a config reload) gets its token instead of a surprise cancellation.
        """
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None and not self._refresher.done():
            self._refresher.cancel()
        self._executor.submit(self._close_blocking)
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        """Close at shutdown: also cancel a fetch in flight (its thread finishes alone)."""
        self.close()
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TokenError):
                await task

    # --- fetching --------------------------------------------------------------------------

    @staticmethod
    def _usable(token: Token | None, now: float) -> TypeGuard[Token]:
        return token is not None and token.expires_in(now) > MIN_USABLE

    def _shared_fetch(self) -> asyncio.Future[Token]:
        """Join the fetch in flight or start one; a caller's cancellation does not stop it."""
        return asyncio.shield(self._start_fetch())

    def _start_fetch(self) -> asyncio.Task[Token]:
        """The fetch in flight, or a new one; nobody needs to await it."""
        if self._inflight is None or self._inflight.done():
            task = asyncio.get_running_loop().create_task(self._fetch(),
                                                          name=f"token-fetch-{self.name}")
            task.add_done_callback(_consume_exception)
            self._inflight = task
        return self._inflight

    async def _fetch(self) -> Token:
        if self._closed:
            raise TokenError(f"credential {self.name!r} was removed or changed by a "
                             "configuration reload; retry", transient=True)
        started = self._clock()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._acquire_blocking)
        except TokenError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            if self._closed:  # the executor was shut down by close() meanwhile
                raise TokenError(f"credential {self.name!r} was removed or changed by a "
                                 "configuration reload; retry", transient=True) from None
            log.debug("token fetch for credential %s failed", self.name, exc_info=True)
            error = explain_exception(exc, self.name, self.credential.authority_url)
            self._failed(error)
            raise error from None
        if not isinstance(result, dict):
            result = {"error": "invalid_response",
                      "error_description": "the token endpoint returned no JSON object"}
        access_token = result.get("access_token")
        if not access_token:
            refused = TokenError(f"credential {self.name!r}: " + explain_entra_error(result),
                                 code=_entra_code(result),
                                 transient=str(result.get("error")) in _TRANSIENT_ERRORS)
            self._failed(refused)
            raise refused
        redact(access_token)
        try:
            lifetime = float(result.get("expires_in", 0))
        except (TypeError, ValueError):
            lifetime = 0.0
        token = Token(Secret(access_token), started + lifetime, decode_claims(access_token),
                      obtained_at=started)
        # The refresher renews refresh_before ahead of expiry, but not before half-way
        # through a token's life: tokens shorter than refresh_before must not make it spin.
        self._refresh_at = token.expires_at - min(self.credential.refresh_before, lifetime / 2)
        if lifetime <= self.credential.refresh_before and not self._warned_lifetime:
            self._warned_lifetime = True
            log.warning("credential %s: tokens live %d s, not longer than refresh_before "
                        "(%d s): every message will fetch a new token; lower refresh_before",
                        self.name, lifetime, self.credential.refresh_before)
        self._token = token
        self._retry_after = 0.0
        log.info("token for credential %s acquired, expires in %d s", self.name, lifetime,
                 extra={"credential": self.name, "expires_in": int(lifetime)})
        return token

    def _failed(self, exc: TokenError) -> None:
        now = self._clock()
        self._retry_after = now + BACKOFF_MIN
        self._hooks.token_error(self.name)
        token = self._token
        fields = {"credential": self.name, "code": exc.code, "transient": exc.transient}
        if self._usable(token, now):
            assert token is not None
            log.warning("token refresh failed, still using the current token (valid %d s "
                        "more): %s", token.expires_in(now), exc.message, extra=fields)
        else:
            log.error("no token: %s", exc.message, extra=fields)

    def _acquire_blocking(self) -> dict[str, Any]:
        """Runs in the worker thread: build msal's app if needed, then fetch a fresh token."""
        authority = self.credential.authority_url
        try:
            if self._closed:
                raise TokenError(f"credential {self.name!r} is closed", transient=True)
            app = self._app
            if app is None:
                app = self._app = self._build_app()
            app.remove_tokens_for_client()  # our cache decides when to refresh, not msal's
            result = app.acquire_token_for_client(scopes=self.credential.scopes)
        except Exception as exc:
            log.debug("token fetch for credential %s failed", self.name, exc_info=True)
            error = explain_exception(exc, self.name, authority)
            if not error.transient:
                self._app = None  # re-read secret / rebuild on the next attempt
            raise error from None
        if (isinstance(result, dict) and "access_token" not in result
                and str(result.get("error")) not in _TRANSIENT_ERRORS):
            self._app = None  # e.g. a rotated secret file is picked up on the next attempt
        return result

    def _build_app(self) -> Any:
        cred = self.credential
        if self._session is None:
            self._session = _EntraSession(str(cred.ca_file) if cred.ca_file else None,
                                          HTTP_TIMEOUT)
        kwargs: dict[str, Any] = {}
        if cred.authority:  # a non-Microsoft host: don't ask login.microsoftonline.com
            kwargs["instance_discovery"] = False
        return msal.ConfidentialClientApplication(
            cred.client_id, client_credential=self._client_credential(),
            authority=cred.authority_url, http_client=self._session,
            token_cache=msal.TokenCache(), **kwargs)

    def _client_credential(self) -> str | dict[str, str]:
        cred = self.credential
        if cred.client_secret is not None:
            secret = cred.client_secret.resolve().reveal()
            redact(secret)
            return secret
        if self._certificate is None:
            self._certificate = self._load_certificate()
        return self._certificate

    def _load_certificate(self) -> dict[str, str]:
        """Read the app certificate once, checking key and certificate belong together."""
        cert = self.credential.certificate
        assert cert is not None
        where = f"credentials.{self.name}.certificate"
        passphrase = cert.passphrase.resolve().reveal().encode() if cert.passphrase else None
        if passphrase:
            redact(passphrase.decode())
        if cert.pfx_file is not None:
            data = _read(cert.pfx_file, f"{where}.pfx_file")
            try:
                key, leaf, _ = pkcs12.load_key_and_certificates(data, passphrase)
            except ValueError:
                raise TokenError(f"{where}.pfx_file {cert.pfx_file}: cannot open the PFX "
                                 "(wrong passphrase, or not a PKCS#12 file)") from None
            if key is None or leaf is None:
                raise TokenError(f"{where}.pfx_file {cert.pfx_file} must contain both the "
                                 "private key and its certificate")
            return {"private_key": _pem_key(key),
                    "public_certificate": leaf.public_bytes(
                        serialization.Encoding.PEM).decode()}
        assert cert.private_key_file is not None
        key_pem = _read(cert.private_key_file, f"{where}.private_key_file")
        try:
            key = serialization.load_pem_private_key(key_pem, passphrase)
        except (ValueError, TypeError):
            raise TokenError(f"{where}.private_key_file {cert.private_key_file}: cannot load "
                             "the PEM private key (wrong or missing passphrase?)") from None
        out = {"private_key": _pem_key(key)}
        if cert.public_certificate_file is not None:
            cert_pem = _read(cert.public_certificate_file, f"{where}.public_certificate_file")
            try:
                leaf = x509.load_pem_x509_certificate(cert_pem)
            except ValueError:
                raise TokenError(f"{where}.public_certificate_file "
                                 f"{cert.public_certificate_file} is not a PEM certificate"
                                 ) from None
            if _spki(leaf.public_key()) != _spki(key.public_key()):
                raise TokenError(f"{where}: the private key does not belong to the "
                                 "public certificate")
            out["public_certificate"] = leaf.public_bytes(serialization.Encoding.PEM).decode()
        else:
            assert cert.thumbprint is not None
            out["thumbprint"] = cert.thumbprint.replace(":", "").upper()
        return out

    def _close_blocking(self) -> None:
        self._app = None
        if self._session is not None:
            self._session.close()

    # --- background refresh ------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        """Keep a fresh token ready; never dies, backs off (with jitter) on failures."""
        delay = BACKOFF_MIN
        while True:
            try:
                if self._token is None or self._clock() >= self._refresh_at:
                    await self._shared_fetch()
                    delay = BACKOFF_MIN
                # At least a second between fetches, even if Entra ID hands out tokens
                # that are due for refresh at once (tiny or missing expires_in).
                wait = self._refresh_at - self._clock()
                await asyncio.sleep(min(max(wait, 1.0), _MAX_SLEEP))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                pause = delay * random.uniform(0.8, 1.2)
                if not isinstance(exc, TokenError):
                    log.exception("token refresher for credential %s: unexpected error",
                                  self.name)
                log.debug("token refresher for credential %s: retrying in %.0f s",
                          self.name, pause)
                self._retry_after = self._clock() + pause
                delay = min(delay * 2, BACKOFF_MAX)
                await asyncio.sleep(pause)


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem_key(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _consume_exception(task: asyncio.Task[Token]) -> None:
    """Mark a failed fetch's exception as retrieved when every caller went away."""
    if not task.cancelled():
        task.exception()


# --- the registry ------------------------------------------------------------------------

class Tokens:
    """One :class:`TokenProvider` per configured credential, kept across config reloads."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 hooks: Hooks = NO_HOOKS) -> None:
        self._clock = clock
        self._hooks = hooks
        self._started = False
        self._providers = {name: TokenProvider(name, cred, clock=clock, hooks=hooks)
                           for name, cred in config.credentials.items()}

    def provider(self, credential_name: str) -> TokenProvider:
        try:
            return self._providers[credential_name]
        except KeyError:
            raise KeyError(f"no credential named {credential_name!r}") from None

    def __iter__(self) -> Any:
        return iter(self._providers.items())

    def start(self) -> None:
        self._started = True
        for provider in self._providers.values():
            provider.start()

    async def aclose(self) -> None:
        providers = list(self._providers.values())
        self._started = False
        await asyncio.gather(*(p.aclose() for p in providers))

    def update(self, config: Config) -> None:
        """Adopt a reloaded config: unchanged credentials keep their provider and token."""
        old = self._providers
        new: dict[str, TokenProvider] = {}
        for name, cred in config.credentials.items():
            existing = old.get(name)
            if existing is not None and existing.credential == cred:
                new[name] = existing
                continue
            provider = TokenProvider(name, cred, clock=self._clock, hooks=self._hooks)
            if self._started:
                provider.start()
            new[name] = provider
            log.info("credential %s %s", name, "changed" if existing else "added")
        self._providers = new
        for name, provider in old.items():
            if new.get(name) is not provider:
                if name not in new:
                    log.info("credential %s removed", name)
                provider.close()
