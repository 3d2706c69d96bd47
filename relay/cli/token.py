"""``smtp-oauth-relay token [--profile P | --credential C] [--json]``: get a token, show it.

- :func:`command`: the command (with ``--sandbox``, against the local stand-ins);
- :func:`show`: fetch a token for the chosen credential and print its audience, tenant,
  app, roles, scopes and expiry, as text or JSON.

The token itself is never printed. Warnings on stderr say what Exchange Online will refuse:
a delegated token, or no SMTP.SendAsApp role (expected with RBAC for Applications, so the
exit status stays 0). A refusal by Entra ID exits 69, a temporary failure 75.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from typing import Any

from relay.cli.common import (
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    UsageError,
    chosen_profile,
    err,
    print_json,
    token_failures_told_elsewhere,
    with_sandbox,
)
from relay.config import Config
from relay.config.errors import known
from relay.core.log import setup_logging
from relay.oauth.token import SEND_AS_APP, Token


def command(args: argparse.Namespace) -> int:
    setup_logging("warning")
    token_failures_told_elsewhere()
    return asyncio.run(with_sandbox(args, lambda c: show(args, c))())


def credential_name(config: Config, args: argparse.Namespace) -> str:
    """``--credential``, else the credential of ``--profile``, of the system profile, or of
    the only profile there is."""
    if args.credential:
        if args.credential not in config.credentials:
            raise UsageError(f"no credential named {args.credential!r}"
                             + known(config.credentials))
        return str(args.credential)
    return config.profiles[chosen_profile(config, args.profile)].credential


async def show(args: argparse.Namespace, config: Config) -> int:
    from relay.oauth.provider import TokenProvider
    from relay.oauth.token import TokenError

    name = credential_name(config, args)
    provider = TokenProvider(name, config.credentials[name])
    try:
        token = await provider.get()
    except TokenError as exc:
        err(f"error: {exc.message}")
        return EX_TEMPFAIL if exc.transient else EX_UNAVAILABLE
    finally:
        await provider.aclose()
    info = _facts(name, token)
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':12} {shown if shown not in ('', None) else '-'}")
    if token.scopes:
        err("warning: this is a delegated token (it has 'scp'); the relay needs an "
            "application token: use Application permissions, not Delegated")
    if SEND_AS_APP not in token.roles:
        err(f"warning: the token has no {SEND_AS_APP} role. Add API permission "
            f"'Office 365 Exchange Online > Application permissions > {SEND_AS_APP}' and "
            "grant admin consent — unless the app is authorised through RBAC for "
            "Applications in Exchange, where this role is not in the token")
    return EX_OK


def _facts(name: str, token: Token) -> dict[str, Any]:
    """What is shown of a token (the ``--json`` shape): its claims, never the token."""
    expires = dt.datetime.fromtimestamp(token.expires_at, dt.UTC)
    return {
        "credential": name,
        "audience": token.audience,
        "tenant": token.tenant,
        "app_id": token.app_id,
        "roles": list(token.roles),
        "scopes": list(token.scopes),
        "expires_at": expires.isoformat(timespec="seconds"),
        "expires_in": int(token.expires_in()),
    }
