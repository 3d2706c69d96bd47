"""The Microsoft side of the configuration: clouds, secrets and app credentials.

- :class:`Cloud`, :data:`CLOUDS`, :data:`CloudName`: the login host, token scope and SMTP
  host of each Microsoft cloud (``global``, ``gcc-high``, ``china``);
- :class:`SecretRef`: where a secret is read from (``{env: ...}``, ``{file: ...}``,
  ``{credential: ...}`` or ``{value: ...}``), never a plain string in the YAML;
- :class:`CertificateCredential`, :class:`Credential`: an Entra ID app registration for
  the client-credentials flow (``credentials.<name>``);
- :func:`is_guid`, :func:`secret_id_problem`: what Entra ID's identifiers look like, so that
  a tenant or a secret copied from the wrong field is refused before Entra ID is asked.

A value that cannot be right (a login URL as tenant, a GUID missing a digit, a secret's
Secret ID instead of its Value) is caught at load with the fix, rather than turning into
an AADSTS error at the first message, or an hour of retries.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from relay.config.values import Duration, HttpsUrl, Section
from relay.core import secrets as secrets
from relay.core.secrets import Secret

# --- clouds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cloud:
    """Endpoints of one Microsoft cloud (global, US GCC High, China operated by 21Vianet)."""

    authority_host: str
    scope: str
    smtp_host: str
    graph_url: str          # Microsoft Graph, whose token scope is graph_url + "/.default"


CLOUDS: dict[str, Cloud] = {
    "global": Cloud("https://login.microsoftonline.com",
                    "https://outlook.office365.com/.default", "smtp.office365.com",
                    "https://graph.microsoft.com"),
    "gcc-high": Cloud("https://login.microsoftonline.us",
                      "https://outlook.office365.us/.default", "smtp.office365.us",
                      "https://graph.microsoft.us"),
    "china": Cloud("https://login.partner.microsoftonline.cn",
                   "https://partner.outlook.cn/.default", "smtp.partner.outlook.cn",
                   "https://microsoftgraph.chinacloudapi.cn"),
    # Personal Microsoft accounts (outlook.com, hotmail.com): delegated sign-ins only.
    "consumer": Cloud("https://login.microsoftonline.com", "https://outlook.office.com/.default",
                      "smtp-mail.outlook.com", "https://graph.microsoft.com"),
}
CloudName = Literal["global", "gcc-high", "china", "consumer"]


# --- identifiers -----------------------------------------------------------------------

_GUID_RE = re.compile(r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# Labels of letters, digits and hyphens; the last (the top-level domain) begins with a letter.
_DOMAIN_RE = re.compile(rf"(?=.{{1,253}}$)(?:{_LABEL}\.)+(?=[A-Za-z]){_LABEL}")
_OVERVIEW = "from the app registration's Overview page in Entra ID"


def is_guid(value: str) -> bool:
    """Exactly 8-4-4-4-12 hex digits, as Entra ID shows its ids."""
    return _GUID_RE.fullmatch(value) is not None


def _check_tenant(value: str) -> str:
    """A tenant id (GUID) or one of the tenant's domain names (contoso.onmicrosoft.com),
    or ``consumers`` (personal Microsoft accounts, cloud: consumer)."""
    if is_guid(value) or value == "consumers":
        return value
    if "/" in value or _login_host(value):
        parts = [p for p in value.split("/") if is_guid(p)
                 or (_DOMAIN_RE.fullmatch(p) and not _login_host(p))]
        here = f" (here: {parts[0]})" if parts else ""
        raise ValueError(f"{value!r} is the login URL: use only the tenant id or "
                         f"domain{here}")
    if _DOMAIN_RE.fullmatch(value):
        return value
    if re.fullmatch(r"[0-9A-Fa-f-]+", value) and ("-" in value or len(value) >= 16):
        shape = (f"it has {len(value)} characters, a GUID has 36" if len(value) != 36
                 else "its dashes are not where a GUID has them")
        raise ValueError(f"{value!r} is not a GUID: {shape} (8-4-4-4-12 hex digits); "
                         f"copy the Directory (tenant) ID again {_OVERVIEW}")
    if value.lower() in ("common", "organizations", "consumers"):
        raise ValueError(f"{value!r} is not a tenant: the client-credentials flow needs your "
                         f"own, its domain or the Directory (tenant) ID {_OVERVIEW}")
    if "@" in value:
        domain = value.rpartition("@")[2]
        raise ValueError(f"{value!r} is an e-mail address: use its domain ({domain}) or "
                         "the tenant id")
    raise ValueError(f"{value!r} is neither a tenant id (a GUID, 8-4-4-4-12 hex digits) nor "
                     f"a domain name (contoso.onmicrosoft.com): use the Directory (tenant) ID "
                     f"{_OVERVIEW}")


def _login_host(value: str) -> bool:
    """login.microsoftonline.com and its sovereign clouds' hosts (.us, .cn)."""
    return "microsoftonline." in value.lower()


TenantId = Annotated[str, AfterValidator(_check_tenant)]


def secret_id_problem(secret: Secret, source: str) -> str | None:
    """Why ``secret`` is surely not a client secret, or None.

    Entra ID shows two columns for a client secret: Value (about 40 characters, with
    ``~``) and Secret ID (a GUID). The GUID is the one that stays visible, so it is the
    one copied by mistake, and Entra ID answers it with AADSTS7000215 at every message.
    """
    if not is_guid(secret.reveal()):
        return None
    return (f"{source} holds a GUID, which is a secret's Secret ID: use the Value column "
            "instead (Entra ID > App registrations > Certificates & secrets); Entra ID "
            "shows the value only right after the secret is created, so create a new "
            "secret if it is hidden")


# --- credentials -----------------------------------------------------------------------

class SecretRef(Section):
    """Where a secret comes from: exactly one of env, file, credential or value."""

    env: str | None = None
    file: Path | None = None
    credential: str | None = None
    value: str | None = Field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(
                "give the secret as {env: VARIABLE}, {file: PATH}, {credential: NAME} "
                "(systemd LoadCredential=) or {value: ...}; plain strings are not accepted "
                "so that secrets do not end up in the YAML by accident")
        given = [k for k in ("env", "file", "credential", "value") if data.get(k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of env, file, credential, value")
        return data

    def describe(self) -> str:
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        if self.credential:
            return f"systemd credential {self.credential}"
        return "inline value"

    def resolve(self) -> Secret:
        """Read the secret now; raises :class:`relay.core.secrets.SecretSourceError`."""
        if self.env:
            return Secret(secrets.read_env(self.env))
        if self.file:
            return Secret(secrets.read_file(self.file))
        if self.credential:
            return Secret(secrets.read_credential(self.credential))
        assert self.value is not None
        return Secret(self.value)


class CertificateCredential(Section):
    """An app certificate: PEM key + thumbprint, PEM key + public certificate, or PFX."""

    private_key_file: Path | None = None
    thumbprint: str | None = None
    public_certificate_file: Path | None = None
    pfx_file: Path | None = None
    passphrase: SecretRef | None = None

    @model_validator(mode="after")
    def _combination(self) -> CertificateCredential:
        if self.pfx_file:
            if self.private_key_file or self.thumbprint or self.public_certificate_file:
                raise ValueError("pfx_file cannot be combined with private_key_file, "
                                 "thumbprint or public_certificate_file")
        elif not self.private_key_file:
            raise ValueError("set private_key_file (with thumbprint or "
                             "public_certificate_file), or pfx_file")
        elif not (self.thumbprint or self.public_certificate_file):
            raise ValueError("private_key_file needs thumbprint or public_certificate_file")
        if self.thumbprint and not re.fullmatch(r"[0-9A-Fa-f]{40}",
                                                self.thumbprint.replace(":", "")):
            raise ValueError("thumbprint must be the certificate's SHA-1 hex digest "
                             "(40 hex digits, as shown in Entra ID)")
        return self


class DelegatedAuth(Section):
    """A user's own sign-in (delegated permissions: SMTP.Send, Mail.Send), made once with
    ``smtp-oauth-relay authorize``; its refresh token is kept encrypted in ``token_file``
    with ``key``, which comes from a file or a systemd credential, never from the config."""

    token_file: Path
    key: SecretRef

    @model_validator(mode="after")
    def _key_outside(self) -> DelegatedAuth:
        if self.key.value is not None or self.key.env is not None:
            raise ValueError("key must be {file: PATH} or {credential: NAME}: the key that "
                             "encrypts the refresh token is not kept in the config or the "
                             "environment")
        return self


class Credential(Section):
    """An Entra ID app registration used with the client-credentials flow, or with a
    user's delegated sign-in (``delegated``)."""

    tenant_id: TenantId
    client_id: str = Field(min_length=1)
    cloud: CloudName = "global"
    authority: HttpsUrl | None = None
    scope: str | None = None
    client_secret: SecretRef | None = None
    certificate: CertificateCredential | None = None
    # No long-lived secret: a token the platform writes to a file and renews (workload
    # identity federation: AKS, any OIDC issuer), or the platform's managed identity
    # ("system", or "user": the user-assigned identity whose client ID is client_id).
    federated_token_file: Path | None = None
    managed_identity: Literal["system", "user"] | None = None
    delegated: DelegatedAuth | None = None
    ca_file: Path | None = None
    refresh_before: Duration = 600.0
    secret_expires: dt.date | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credential:
        kinds = [self.client_secret, self.certificate, self.federated_token_file,
                 self.managed_identity, self.delegated]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError("set exactly one of client_secret, certificate, "
                             "federated_token_file, managed_identity or delegated")
        return self

    @model_validator(mode="after")
    def _consumer(self) -> Credential:
        if (self.cloud == "consumer") != (self.tenant_id == "consumers"):
            raise ValueError("personal Microsoft accounts go together: cloud: consumer and "
                             "tenant_id: consumers")
        if self.cloud == "consumer" and self.delegated is None:
            raise ValueError("cloud: consumer (personal accounts) works only with delegated: "
                             "a personal account has no application permissions")
        return self

    @property
    def kind_key(self) -> str:
        """The setting that proves the app's identity, as a metric label."""
        for key in ("client_secret", "certificate", "federated_token_file",
                    "managed_identity", "delegated"):
            if getattr(self, key) is not None:
                return key.removesuffix("_file")
        raise AssertionError("a credential has one kind")

    @property
    def kind(self) -> str:
        """What proves the app's identity, in words (logs, doctor, metrics)."""
        if self.client_secret is not None:
            return "client secret"
        if self.certificate is not None:
            return "certificate"
        if self.federated_token_file is not None:
            return "federated token"
        if self.delegated is not None:
            return "a user's delegated sign-in"
        return f"managed identity ({self.managed_identity}-assigned)"

    @property
    def authority_url(self) -> str:
        base = self.authority or CLOUDS[self.cloud].authority_host
        return f"{base}/{self.tenant_id}"

    @property
    def scopes(self) -> list[str]:
        """For the SMTP upstream's XOAUTH2 login."""
        return [self.scope or CLOUDS[self.cloud].scope]

    @property
    def graph_scopes(self) -> list[str]:
        """For Microsoft Graph (profiles with ``transport: graph``)."""
        return [CLOUDS[self.cloud].graph_url + "/.default"]

