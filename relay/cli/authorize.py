"""``smtp-oauth-relay authorize (PROFILE | --credential C)``: a user signs in once, so
that the relay can send as them with delegated permissions.

:func:`command` runs Entra ID's device-code flow, which works on a server without a
browser: it prints a web address and a code, the user opens the address anywhere, enters
the code and signs in. With ``--browser`` it runs the authorization-code flow with PKCE
instead, back to a loopback address of this machine. Either way the relay then keeps the
refresh token, encrypted
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
from relay.ops.loopback import LoopbackRedirect

_BROWSER_TIMEOUT = 600.0


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile_name", nargs="?", metavar="PROFILE",
                   help="the profile whose (delegated) credential to sign in")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", help="the same, as an option")
    which.add_argument("--credential", help="the delegated credential to sign in")
    p.add_argument("--browser", action="store_true",
                   help="sign in in a browser on this machine (authorization code with "
                        "PKCE, back to http://localhost) instead of with a device code")
    p.add_argument("--port", type=int, default=0, metavar="PORT",
                   help="with --browser: the local port the sign-in comes back to "
                        "(default: any free one; fix it to forward it over SSH)")


def command(args: argparse.Namespace) -> int:
    config = load(args)
    profile = args.profile or args.profile_name
    if (profile is None) == (args.credential is None):
        raise UsageError("name one profile (PROFILE or --profile) or one --credential")
    name = _credential(config, profile, args.credential)
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
    result = (_in_browser(app, scopes, args.port) if args.browser
              else _with_device_code(app, scopes))
    if "access_token" not in result:
        error = str(result.get("error", ""))
        print(f"not signed in: {error}: {result.get('error_description', '')}")
        if error == "authorization_declined":
            return EX_NOPERM
        # Nobody signed in before the code expired: run it again.
        waited = error in ("expired_token", "authorization_pending", "slow_down")
        return EX_TEMPFAIL if waited else EX_UNAVAILABLE
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


def _with_device_code(app: Any, scopes: list[str]) -> dict[str, Any]:
    flow = app.initiate_device_flow(scopes=scopes)
    if "user_code" not in flow:
        return {"error": flow.get("error", "no_device_code"),
                "error_description": flow.get("error_description", "")}
    print(flow["message"], flush=True)
    result: dict[str, Any] = app.acquire_token_by_device_flow(flow)
    return result


def _in_browser(app: Any, scopes: list[str], port: int) -> dict[str, Any]:
    """The authorization-code flow with PKCE: the browser comes back to a one-shot HTTP
    server on this machine's loopback with the code, which msal redeems with the
    verifier only it knows."""
    with LoopbackRedirect(port) as back:
        flow = app.initiate_auth_code_flow(scopes, redirect_uri=back.uri,
                                           response_mode="form_post")
        print("Open this address in a browser on this machine and sign in as the "
              "mailbox's user (from elsewhere: ssh -L "
              f"{back.port}:localhost:{back.port} to this machine first):", flush=True)
        print(flow["auth_uri"], flush=True)
        response = back.wait(_BROWSER_TIMEOUT)
    if response is None:
        return {"error": "expired_token",
                "error_description": f"no sign-in came back within {_BROWSER_TIMEOUT:g} s"}
    try:
        result: dict[str, Any] = app.acquire_token_by_auth_code_flow(flow, response)
    except ValueError as exc:       # the state did not match: not our sign-in
        return {"error": "invalid_request", "error_description": str(exc)}
    return result


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
