"""Entra ID's errors explained: what went wrong on the way to a token, and what to fix.

- :func:`explain_entra_error`: an actionable sentence for an error reply of Entra ID's
  token or discovery endpoint (AADSTS code -> which secret value, which setting);
- :func:`explain_exception`: whatever msal, requests or cryptography raised, as a
  :class:`~relay.oauth.token.TokenError` that says what to do and whether retrying helps;
- :func:`entra_code` and :data:`TRANSIENT_ERRORS`: the AADSTS number of an error reply, and
  the ``error`` values that mean "try again later" rather than "fix your configuration".

"AADSTS7000215" or "HTTPSConnectionPool(...): Max retries exceeded" tell an operator
little; the messages here name the setting or the step in Entra ID that fixes it, and
never contain a secret or a token (see :mod:`relay.core.log` for the last line of
defence).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

import msal
import requests

from relay.core.errors import causes
from relay.core.secrets import SecretSourceError
from relay.core.text import one_line
from relay.oauth.token import TokenError

# Entra "error" values that mean "try again later", not "fix your configuration".
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


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

_AADSTS_RE = re.compile(r"AADSTS(\d+)")


def entra_code(result: dict[str, Any]) -> int | None:
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    m = _AADSTS_RE.search(str(result.get("error_description") or ""))
    return int(m.group(1)) if m else None


def _first_sentence(description: str) -> str:
    """Entra's description without the trace/correlation/timestamp tail (given separately)."""
    text = one_line(description)
    return re.split(r"\s+Trace ID:", text, maxsplit=1)[0]


def explain_entra_error(result: dict[str, Any]) -> str:
    """An actionable sentence for an error reply of Entra ID's token or discovery endpoint."""
    error = str(result.get("error") or "unknown_error")
    description = _first_sentence(str(result.get("error_description") or ""))
    code = entra_code(result)
    advice = _ADVICE.get(code) if code is not None else None
    if advice is None and error == "invalid_scope":
        advice = _ADVICE[1002012]
    if advice is None and error in TRANSIENT_ERRORS:
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
    for e in causes(exc):
        text = str(e)
        if "OIDC Discovery failed" in text and "Error: " in text:
            with contextlib.suppress(ValueError):
                body = json.loads(text.split("Error: ", 1)[1])
                if isinstance(body, dict) and body.get("error"):
                    return TokenError(prefix + explain_entra_error(body),
                                      code=entra_code(body), transient=False)
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
    text = one_line(str(exc)) or exc.__class__.__name__
    if m := re.search(r"\[SSL[^\]]*\][^()']*", text):
        return m.group(0).strip()[:limit]
    if "NameResolution" in text or "Name or service not known" in text:
        return "DNS lookup failed"
    if m := re.search(r"\[Errno -?\d+\] [^'\"()]+", text):
        return m.group(0).strip()[:limit]
    if "timed out" in text.lower():
        return "timed out"
    return text[:limit]
