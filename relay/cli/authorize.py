"""``smtp-oauth-relay authorize (--profile P | --credential C)``: a user signs in once, so
that the relay can send as them with delegated permissions.

:func:`command` runs Entra ID's device-code flow, which works on a server without a
browser: it prints a web address and a code, the user opens the address anywhere, enters
the code and signs in; the relay then keeps the refresh token, encrypted
(relay.oauth.tokenstore), and renews it on every use. The key is created if its file does
not exist yet. Exit 0 signed in, 77 the user declined, 75 the code expired (run it
again), 69 Entra ID refused, 2 a credential that is not ``delegated``.
"""

from __future__ import annotations

import argparse
from typing import Any

import msal

from relay.cli.common import EX_NOPERM, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, UsageError, load
from relay.config import Config
from relay.oauth.clients import delegated_scopes
from relay.oauth.http import HTTP_TIMEOUT, EntraSession
from relay.oauth.token import decode_claims
from relay.oauth.tokenstore import TokenStore, write_key


def arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", help="the profile whose (delegated) credential to sign in")
    which.add_argument("--credential", help="the delegated credential to sign in")


def command(args: argparse.Namespace) -> int:
    config = load(args)
    name = _credential(config, args.profile, args.credential)
    cred = config.credentials[name]
    assert cred.delegated is not None
    key_file = cred.delegated.key.file
    if key_file is not None and not key_file.exists():
        write_key(key_file)
        print(f"created the key {key_file} (keep it: without it the sign-in is lost)")
    graph_only = all(p.transport == "graph" for p in config.profiles.values()
                     if p.credential == name)
    scopes = delegated_scopes(cred.graph_scopes if graph_only else cred.scopes)
    kwargs: dict[str, Any] = {"instance_discovery": False} if cred.authority else {}
    app = msal.PublicClientApplication(
        cred.client_id, authority=cred.authority_url, token_cache=msal.TokenCache(),
        http_client=EntraSession(str(cred.ca_file) if cred.ca_file else None, HTTP_TIMEOUT),
        **kwargs)
    flow = app.initiate_device_flow(scopes=scopes)
    if "user_code" not in flow:
        print(f"Entra ID did not start the sign-in: {flow.get('error_description') or flow}")
        return EX_UNAVAILABLE
    print(flow["message"], flush=True)
    result = app.acquire_token_by_device_flow(flow)
    if "access_token" not in result:
        error = str(result.get("error", ""))
        print(f"not signed in: {error}: {result.get('error_description', '')}")
        if error == "authorization_declined":
            return EX_NOPERM
        return EX_TEMPFAIL if error == "expired_token" else EX_UNAVAILABLE
    claims = decode_claims(result["access_token"])
    user = str(claims.get("upn") or claims.get("preferred_username") or "")
    TokenStore(name, cred.delegated).save(result["refresh_token"], user)
    print(f"signed in as {user or 'the user'}; the refresh token is kept encrypted in "
          f"{cred.delegated.token_file}")
    mailboxes = {p.mailbox.lower() for p in config.profiles.values() if p.credential == name}
    if user and user.lower() not in mailboxes:
        print(f"warning: {user} is not the mailbox of the profiles using credential {name} "
              f"({', '.join(sorted(mailboxes))}): Exchange lets a user send only as "
              "themselves")
    return EX_OK


def _credential(config: Config, profile: str | None, credential: str | None) -> str:
    if profile is not None:
        if profile not in config.profiles:
            raise UsageError(f"no profile named {profile!r}")
        credential = config.profiles[profile].credential
    assert credential is not None
    cred = config.credentials.get(credential)
    if cred is None:
        raise UsageError(f"no credential named {credential!r}")
    if cred.delegated is None:
        raise UsageError(f"credential {credential!r} is not delegated: authorize is for "
                         "credentials with `delegated:` (a user's own sign-in)")
    return credential
