"""The msal object that fetches a credential's tokens, for each kind of credential.

- :func:`build_client`: an object with ``fetch(scopes)`` (msal's result dict) for a client
  secret, a certificate, a federated token file (workload identity federation), the
  platform's managed identity, or a user's delegated sign-in (relay.oauth.tokenstore);
- :func:`token_endpoint`: where its tokens come from, for messages;
- :func:`fingerprint`: what the credential's material is now (a digest of the secret and
  of the certificate files), so that the provider builds a new client when it changed:
  a secret or certificate rotated on disk is used from the next token on, without a
  restart and without waiting for the old one to fail.

msal keeps a token cache of its own, which must not decide when a token is renewed (the
provider does, see :mod:`relay.oauth.provider`): it is emptied before every fetch. The
federated token is read from its file for every request, since the platform (AKS,
Kubernetes' projected service account token) replaces it well before it expires.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import msal

from relay.config import Credential
from relay.core.log import redact
from relay.core.text import one_line
from relay.oauth.advice import entra_code
from relay.oauth.certificates import CertificateError, msal_credential
from relay.oauth.token import TokenError
from relay.oauth.tokenstore import TokenStore


class TokenClient(Protocol):
    def fetch(self, scopes: list[str]) -> dict[str, Any]: ...


class _Confidential:
    """An app registration's client-credentials flow (secret, certificate, assertion)."""

    def __init__(self, cred: Credential, credential: Any, session: Any) -> None:
        kwargs: dict[str, Any] = {}
        if cred.authority:  # a non-Microsoft host: don't ask login.microsoftonline.com
            kwargs["instance_discovery"] = False
        self._app = msal.ConfidentialClientApplication(
            cred.client_id, client_credential=credential, authority=cred.authority_url,
            http_client=session, token_cache=msal.TokenCache(), **kwargs)

    def fetch(self, scopes: list[str]) -> dict[str, Any]:
        self._app.remove_tokens_for_client()   # our cache decides when to refresh
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=scopes)
        return result


class _Managed:
    """The managed identity of the machine, App Service or pod the relay runs on."""

    def __init__(self, cred: Credential, session: Any) -> None:
        self._identity: Any = (msal.SystemAssignedManagedIdentity()
                               if cred.managed_identity == "system"
                               else msal.UserAssignedManagedIdentity(client_id=cred.client_id))
        self._session = session

    def fetch(self, scopes: list[str]) -> dict[str, Any]:
        # A client per fetch: its cache starts empty, so the endpoint is always asked.
        client = msal.ManagedIdentityClient(self._identity, http_client=self._session,
                                            token_cache=msal.TokenCache())
        resource = scopes[0].removesuffix("/.default")
        result: dict[str, Any] = client.acquire_token_for_client(resource=resource)
        return result


class _Delegated:
    """A user's sign-in: the stored refresh token redeemed, and its successor stored."""

    def __init__(self, name: str, cred: Credential, session: Any) -> None:
        assert cred.delegated is not None
        kwargs: dict[str, Any] = {"instance_discovery": False} if cred.authority else {}
        self._app = msal.PublicClientApplication(
            cred.client_id, authority=cred.authority_url, http_client=session,
            token_cache=msal.TokenCache(), **kwargs)
        self._store = TokenStore(name, cred.delegated)
        self._name = name

    def fetch(self, scopes: list[str]) -> dict[str, Any]:
        again = f"run `smtp-oauth-relay authorize --credential {self._name}`"
        with self._store.lock:
            saved = self._store.load()
            if saved is None:
                raise TokenError(f"credential {self._name!r} has no user sign-in yet: "
                                 f"{again}, signing in as the mailbox's user")
            result: dict[str, Any] = self._app.acquire_token_by_refresh_token(
                saved["refresh_token"], scopes=delegated_scopes(scopes))
            if result.get("refresh_token"):
                self._store.save(result["refresh_token"], str(saved.get("user", "")))
        if result.get("error") == "invalid_grant":
            # Revoked, expired or unused too long: only the user can sign in again.
            said = str(result.get("error_description") or "").split(" Trace ID:")[0]
            raise TokenError(
                f"credential {self._name!r}: the sign-in of {saved.get('user') or 'the user'}"
                f" is no longer valid (Entra ID said: {one_line(said)}): {again} and sign in "
                "as that user; the profile's mail waits in the queue until then",
                code=entra_code(result))
        return result


def delegated_scopes(scopes: list[str]) -> list[str]:
    """The delegated permission for each resource's app-only ``/.default`` scope: SMTP.Send
    for Exchange Online, Mail.Send for Graph."""
    out = []
    for scope in scopes:
        resource = scope.removesuffix("/.default")
        out.append(resource + ("/Mail.Send" if "graph" in resource else "/SMTP.Send")
                   if resource != scope else scope)
    return out


def token_endpoint(cred: Credential) -> str:
    """Where the credential's tokens come from, for messages: Entra ID's authority, or
    the platform's managed identity endpoint (as msal finds it)."""
    if cred.managed_identity is None:
        return cred.authority_url
    return (os.environ.get("IDENTITY_ENDPOINT") or os.environ.get("MSI_ENDPOINT")
            or os.environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
            or "http://169.254.169.254")


def build_client(name: str, cred: Credential, session: Any) -> TokenClient:
    """The client for ``cred``; raises :class:`TokenError` for material it cannot use."""
    if cred.managed_identity is not None:
        return _Managed(cred, session)
    if cred.delegated is not None:
        return _Delegated(name, cred, session)
    if cred.federated_token_file is not None:
        path = cred.federated_token_file
        return _Confidential(cred, {"client_assertion": lambda: _read_assertion(name, path)},
                             session)
    if cred.client_secret is not None:
        secret = cred.client_secret.resolve().reveal()
        redact(secret)
        return _Confidential(cred, secret, session)
    assert cred.certificate is not None
    try:
        material = msal_credential(cred.certificate, f"credentials.{name}.certificate")
    except CertificateError as exc:
        raise TokenError(str(exc)) from None
    return _Confidential(cred, material, session)


def fingerprint(cred: Credential) -> bytes:
    """A digest of what proves the credential now: the secret's value, the certificate
    files' bytes. Unreadable material digests as such; building the client says why."""
    digest = hashlib.sha256()
    if cred.client_secret is not None:
        try:
            digest.update(cred.client_secret.resolve().reveal().encode())
        except Exception:       # the build reports it, with the source named
            digest.update(b"\0unreadable")
    if (cert := cred.certificate) is not None:
        for path in (cert.private_key_file, cert.public_certificate_file, cert.pfx_file):
            digest.update(_file_digest(path))
    return digest.digest()


def _file_digest(path: Path | None) -> bytes:
    if path is None:
        return b"-"
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return b"\0unreadable"


def _read_assertion(name: str, path: Path) -> str:
    """The federated token, read now; msal sends it as the client assertion."""
    where = f"credentials.{name}.federated_token_file"
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"credential {name!r}: cannot read {where} {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}; the platform (AKS "
                         "workload identity, a projected service account token) writes "
                         "it", transient=True) from None
    if token.count(".") != 2:
        raise TokenError(f"credential {name!r}: {where} {path} does not hold a JWT",
                         transient=True)
    redact(token)
    return token
