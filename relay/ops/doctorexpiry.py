"""The doctor's ``expiry`` step: how long the credential's secret or certificate lasts.

- :func:`expiry_step`: a client secret's configured expiry date, a certificate's notAfter,
  or a platform credential (federated token, managed identity) with nothing to expire,
  judged against :data:`WARN_DAYS`.
"""

from __future__ import annotations

import datetime as dt

from relay.config import Credential
from relay.oauth.certificates import CertificateError, app_certificate
from relay.ops.doctoradvice import setup_step
from relay.ops.doctorreport import Status, Step, worst

WARN_DAYS = 30


def expiry_step(name: str, cred: Credential) -> Step:
    """The ``expiry`` step for credential ``name``."""
    base = f"credentials.{name}"
    if cred.federated_token_file is not None or cred.managed_identity is not None:
        return Step("expiry", Status.OK, f"{cred.kind}: no long-lived secret to expire "
                                         "(the platform renews what it hands out)")
    checks: list[tuple[Status, str, str | None]] = []
    kind = "client secret" if cred.client_secret is not None else "certificate"
    renew = (f"create a new client secret ({setup_step(2)}), update {base}.client_secret's "
             f"source and {base}.secret_expires" if cred.client_secret is not None else
             f"create a new certificate, upload it to the app registration "
             f"({setup_step(2)}) and update {base}.certificate")
    now = dt.datetime.now(dt.UTC)
    if cred.secret_expires is not None:
        days = (cred.secret_expires - dt.date.today()).days
        checks.append(_judge(kind, cred.secret_expires.isoformat(), days, renew))
    if cred.certificate is not None:
        try:
            not_after = _certificate_expiry(cred, base)
        except CertificateError as exc:
            checks.append((Status.FAIL, str(exc), f"check {base}.certificate"))
        else:
            if not_after is not None:
                days = (not_after - now).days if not_after > now else -1
                checks.append(_judge("certificate", not_after.strftime("%Y-%m-%d %H:%M UTC"),
                                     days, renew))
    if not checks:
        where = (f"set {base}.secret_expires: YYYY-MM-DD" if cred.client_secret is not None
                 else f"only a thumbprint is configured; set {base}.secret_expires: "
                      "YYYY-MM-DD")
        return Step("expiry", Status.INFO, f"{kind} expiry unknown; {where} (Entra ID > "
                                           "Certificates & secrets shows the date) to "
                                           f"get a warning {WARN_DAYS} days ahead")
    fixes = list(dict.fromkeys(c[2] for c in checks if c[2] and c[0] is not Status.OK))
    return Step("expiry", worst(c[0] for c in checks), "; ".join(c[1] for c in checks),
                "\n".join(fixes) or None)


def _judge(what: str, when: str, days: int, renew: str) -> tuple[Status, str, str | None]:
    if days < 0:
        return Status.FAIL, f"the {what} expired ({when})", renew
    if days < WARN_DAYS:
        left = "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
        return Status.WARN, f"the {what} expires {left} ({when})", renew + " now"
    return Status.OK, f"the {what} is valid until {when} ({days} days)", None


def _certificate_expiry(cred: Credential, base: str) -> dt.datetime | None:
    """The app certificate's notAfter (UTC), None if only a thumbprint is configured;
    CertificateError (safe to show) when the file cannot be read."""
    assert cred.certificate is not None
    leaf = app_certificate(cred.certificate, f"{base}.certificate")
    return leaf.not_valid_after_utc if leaf is not None else None
