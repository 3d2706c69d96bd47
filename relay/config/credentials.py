"""The Microsoft side of the configuration: clouds, secrets and app credentials.

- :class:`Cloud`, :data:`CLOUDS`, :data:`CloudName`: the login host, token scope and SMTP
  host of each Microsoft cloud (``global``, ``gcc-high``, ``china``);
- :class:`SecretRef`: where a secret is read from (``{env: ...}``, ``{file: ...}``,
  ``{credential: ...}`` or ``{value: ...}``), never a plain string in the YAML;
- :class:`CertificateCredential`, :class:`Credential`: an Entra ID app registration for
  the client-credentials flow (``credentials.<name>``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

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


CLOUDS: dict[str, Cloud] = {
    "global": Cloud("https://login.microsoftonline.com",
                    "https://outlook.office365.com/.default", "smtp.office365.com"),
    "gcc-high": Cloud("https://login.microsoftonline.us",
                      "https://outlook.office365.us/.default", "smtp.office365.us"),
    "china": Cloud("https://login.partner.microsoftonline.cn",
                   "https://partner.outlook.cn/.default", "smtp.partner.outlook.cn"),
}
CloudName = Literal["global", "gcc-high", "china"]


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


class Credential(Section):
    """An Entra ID app registration used with the client-credentials flow."""

    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    cloud: CloudName = "global"
    authority: HttpsUrl | None = None
    scope: str | None = None
    client_secret: SecretRef | None = None
    certificate: CertificateCredential | None = None
    ca_file: Path | None = None
    refresh_before: Duration = 600.0
    secret_expires: dt.date | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credential:
        if (self.client_secret is None) == (self.certificate is None):
            raise ValueError("set exactly one of client_secret or certificate")
        return self

    @property
    def authority_url(self) -> str:
        base = self.authority or CLOUDS[self.cloud].authority_host
        return f"{base}/{self.tenant_id}"

    @property
    def scopes(self) -> list[str]:
        return [self.scope or CLOUDS[self.cloud].scope]

