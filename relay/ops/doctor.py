"""``smtp-oauth-relay doctor``: which setup step is missing, and how to fix it.

- :func:`diagnose`: check one profile or every profile of a config file, and return a
  :class:`relay.ops.doctorreport.ProfileReport` for each;
- :class:`Doctor`: the checks themselves, for profiles of a loaded config.

Users' most common question is "why 535?", and Exchange's answer names none of the half
dozen setup steps in Entra ID and Exchange that may be missing. The doctor walks the path a
message takes - config, DNS, TCP, TLS, token, token claims, XOAUTH2 login, MAIL/RCPT - with
the relay's own code (the same TLS context, token provider and XOAUTH2 exchange as real
deliveries, see :mod:`relay.deliver.session` and :mod:`relay.oauth.provider`), so what
passes here passes for mail. A failure stops only the steps that depend on it: the token
does not need the network path to Exchange, so one run shows every independent problem, and
steps after a failure they depend on are listed as skipped rather than failing noisily.
A profile with ``transport: graph`` gets Graph's own steps (:mod:`relay.ops.doctorgraph`).

What a failure means and how to fix it is in :mod:`relay.ops.doctoradvice`. Nothing
reported contains a token or a secret; MAIL/RCPT is a dry run (RSET instead of DATA), so
nothing is sent unless ``--send-to`` asks for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from relay.config import Config, ConfigError, Credential, Profile, Upstream, load_config
from relay.config.errors import known
from relay.core.message import Content, Outbound, new_message_id
from relay.core.net import host_port
from relay.deliver.failures import AuthenticationRejected, UpstreamUnavailable
from relay.deliver.session import UpstreamSession
from relay.deliver.upstream import UpstreamClient
from relay.oauth.password import Password, SecretSource
from relay.oauth.provider import TokenProvider
from relay.oauth.token import Token, TokenError
from relay.oauth.tokenstore import TokenStore
from relay.ops.doctoradvice import (
    ca_setting,
    connect_failure,
    delegated_claims,
    explain,
    host_hint,
    judge_claims,
    login_fix,
    token_failed,
)
from relay.ops.doctorexpiry import expiry_step
from relay.ops.doctorgraph import graph_steps
from relay.ops.doctorreport import ProfileReport, Status, Step, skip
from relay.ops.testmessage import build_test_message

DEFAULT_TIMEOUT = 10.0
TOKEN_TIMEOUT = 60.0   # msal may retry; its own HTTP timeouts bound each request
SUBJECT = "smtp-oauth-relay doctor test message"


# --- entry point -------------------------------------------------------------------------

async def diagnose(config_path: Path, *, profile: str | None = None,
                   send_to: str | None = None, step_timeout: float = DEFAULT_TIMEOUT,
                   sandbox_dir: Path | None = None) -> list[ProfileReport]:
    """Check ``profile`` (default: every profile) of the config at ``config_path``.

    With ``sandbox_dir`` the checks run against the local stand-ins (``--sandbox``), while
    the expiry dates still come from the real credentials, which the sandbox replaces.
    """
    source = str(config_path)
    try:
        config = load_config(config_path, check_secrets=sandbox_dir is None)
        names = _select(config, profile, source)
    except ConfigError as exc:
        return [ProfileReport(profile, steps=[Step(
            "config", Status.FAIL, exc.render(),
            "correct the setting(s) named above (config.example.yaml documents every key); "
            "`smtp-oauth-relay check` re-validates without connecting anywhere")])]
    if sandbox_dir is None:
        return await Doctor(config, source=source, timeout=step_timeout,
                            send_to=send_to).run(names)
    from relay.sandbox.service import Sandbox

    async with Sandbox(sandbox_dir) as sandbox:
        doctor = Doctor(sandbox.apply(config), source=source, timeout=step_timeout,
                        send_to=send_to, expiry_credentials=config.credentials)
        return await doctor.run(names)


def _select(config: Config, profile: str | None, source: str) -> list[str]:
    if profile is not None:
        if profile not in config.profiles:
            raise ConfigError(source, [("profiles", f"no profile named {profile!r}"
                                                    + known(config.profiles))])
        return [profile]
    if not config.profiles:
        raise ConfigError(source, [("profiles", "no profiles are defined: nothing to check")])
    return list(config.profiles)


# --- the checks --------------------------------------------------------------------------

class Doctor:
    """Runs the checks for profiles of one config; one token fetch per credential."""

    def __init__(self, config: Config, *, source: str = "config",
                 timeout: float = DEFAULT_TIMEOUT, send_to: str | None = None,
                 expiry_credentials: dict[str, Credential] | None = None) -> None:
        self.config = config
        self.source = source
        self.timeout = timeout
        self.send_to = send_to
        self._expiry_credentials = expiry_credentials or config.credentials
        self._providers: dict[str, TokenProvider] = {}
        self._tokens: dict[str, Token | TokenError] = {}

    async def run(self, names: list[str]) -> list[ProfileReport]:
        try:
            return [await self.check_profile(name) for name in names]
        finally:
            await asyncio.gather(*(p.aclose() for p in self._providers.values()))

    async def check_profile(self, name: str) -> ProfileReport:
        profile = self.config.profiles[name]
        if profile.transport != "graph":
            return await self._check_smtp(name, self.send_to)
        # Graph, then (with fallback_to_smtp) the SMTP path its larger messages take,
        # whose test message is not sent twice.
        report = ProfileReport(name, profile.mailbox, profile.credential,
                               self.config.graph_url_for(profile))
        report.steps.append(Step("config", Status.OK, f"{self.source} is valid"))
        token = await self._token(profile.credential, graph=True)
        report.steps += await graph_steps(self.config, name, token, self.send_to)
        if profile.fallback_to_smtp:
            smtp = await self._check_smtp(name, None)
            report.steps += smtp.steps[1:-1]
        report.steps.append(self._expiry(profile.credential))
        return report

    async def _check_smtp(self, name: str, send_to: str | None) -> ProfileReport:
        profile = self.config.profiles[name]
        upstream = self.config.upstream_for(profile)
        upstream = upstream.model_copy(update={"timeout": min(upstream.timeout, self.timeout)})
        report = ProfileReport(name, profile.mailbox, profile.credential,
                               host_port(upstream.host, upstream.port))
        steps = report.steps
        steps.append(Step("config", Status.OK, f"{self.source} is valid"))
        # The token first (shown after the network steps): the session must not sit idle
        # before AUTH while Entra ID is slow to answer. ACS takes the client secret.
        acs = upstream.service == "acs"
        token: Any = (await self._password(profile.credential) if acs
                      else await self._token(profile.credential))
        session: UpstreamSession | None = None
        try:
            dns = await self._dns(profile, upstream)
            steps.append(dns)
            if dns.ok:
                session, network = await self._connect(profile, upstream)
                steps += network
            else:
                steps += [skip("connect", "DNS failed"), skip("tls", "DNS failed")]

            if isinstance(token, TokenError):
                steps.append(token_failed(profile.credential, token))
                steps.append(skip("claims", "no token"))
            elif acs:
                steps.append(Step("token", Status.INFO, "Azure Communication Services: no "
                                  "token, the login is the client secret as the password "
                                  f"of {upstream.username}"))
                steps.append(skip("claims", "no token"))
            else:
                steps.append(self._token_ok(token))
                report.app_object_id = str(token.claims.get("oid") or "") or None
                steps.append(self._claims(profile, upstream, token))

            login = await self._login(session, profile, token, steps)
            steps.append(login)
            if login.status is Status.OK:
                assert session is not None
                steps.append(await self._envelope(session, name, profile))
            else:
                steps.append(skip("envelope", "no login"))
            if send_to is not None:
                if session is not None and session.is_open and steps[-1].status is Status.OK:
                    steps.append(await self._send(session, name, profile, send_to))
                else:
                    steps.append(skip("send", "the checks before it failed"))
        finally:
            if session is not None:
                await session.close()
        steps.append(self._expiry(profile.credential))
        return report

    # --- network ---------------------------------------------------------------------

    async def _dns(self, profile: Profile, up: Upstream) -> Step:
        loop = asyncio.get_running_loop()
        fix = (f"{host_hint(self.config, profile)}; check this machine's DNS resolver "
               "(/etc/resolv.conf; in a container, the container's DNS settings)")
        try:
            ipaddress.ip_address(up.host)
        except ValueError:
            pass
        else:
            return Step("dns", Status.OK, f"{up.host} is an IP address: nothing to look up")
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM), self.timeout)
        except TimeoutError:
            return Step("dns", Status.FAIL,
                        f"no DNS answer for {up.host} within {self.timeout:g} s", fix)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            return Step("dns", Status.FAIL, f"cannot resolve {up.host}: {reason}", fix)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        shown = ", ".join(addresses[:4]) + (", ..." if len(addresses) > 4 else "")
        return Step("dns", Status.OK, f"{up.host} resolves to {shown}")

    async def _connect(self, profile: Profile,
                       up: Upstream) -> tuple[UpstreamSession | None, list[Step]]:
        where = host_port(up.host, up.port)
        try:
            client = UpstreamClient(up, up.helo_name or self.config.server.hostname)
        except ValueError as exc:  # the CA file cannot be loaded
            return None, [skip("connect", "the TLS settings are unusable"), Step(
                "tls", Status.FAIL, str(exc),
                f"{ca_setting(profile)} must be a PEM file with the CA certificate(s)")]
        session = client.session()
        try:
            await session.connect()
        except UpstreamUnavailable as exc:
            return None, connect_failure(self.config, profile, up, session.stage, exc)
        peer = session.transport_info("peername")
        at = (f"connected to {host_port(str(peer[0]), int(peer[1]))}"
              if isinstance(peer, tuple) and len(peer) >= 2 else f"connected to {where}")
        return session, [Step("connect", Status.OK, f"{at}; the SMTP greeting and EHLO "
                                                    "were accepted"),
                         Step("tls", Status.OK, _tls_summary(session, up))]

    # --- token -----------------------------------------------------------------------

    async def _token(self, name: str, *, graph: bool = False) -> Token | TokenError:
        key = f"{name} graph" if graph else name
        if key not in self._tokens:
            cred = self.config.credentials[name]
            provider = self._providers[key] = TokenProvider(
                name, cred, scopes=cred.graph_scopes if graph else None)
            try:
                self._tokens[key] = await asyncio.wait_for(provider.get(), TOKEN_TIMEOUT)
            except TokenError as exc:
                self._tokens[key] = exc
            except TimeoutError:
                self._tokens[key] = TokenError(
                    f"credential {name!r}: Entra ID did not answer within "
                    f"{TOKEN_TIMEOUT:g} s", transient=True)
        return self._tokens[key]

    def _claims(self, profile: Profile, upstream: Upstream, token: Token) -> Step:
        cred = self.config.credentials[profile.credential]
        if cred.delegated is None:
            return judge_claims(self.config, profile, upstream, token)
        try:
            saved = TokenStore(profile.credential, cred.delegated).load() or {}
        except TokenError:
            saved = {}
        return delegated_claims(profile, token, "SMTP.Send", saved.get("saved_at"),
                                time.time())

    async def _password(self, name: str) -> Password | TokenError:
        try:
            return await SecretSource(name, self.config.credentials[name]).get()
        except TokenError as exc:
            return exc

    def _token_ok(self, token: Token) -> Step:
        minutes = max(0, int(token.expires_in() // 60))
        return Step("token", Status.OK, f"acquired (app {token.app_id or '?'}, audience "
                                        f"{token.audience or '?'}, valid {minutes} min)")

    # --- Exchange --------------------------------------------------------------------

    async def _login(self, session: UpstreamSession | None, profile: Profile,
                     token: Any, steps: list[Step]) -> Step:
        if session is None:
            return skip("login", "no TLS connection to the upstream")
        if isinstance(token, TokenError):
            return skip("login", "no token")
        if any(s.name == "claims" and s.status is Status.FAIL for s in steps):
            return skip("login", "the token cannot work (see claims)")
        try:
            await session.login(profile.mailbox, token)
        except AuthenticationRejected as exc:
            if isinstance(token, Password):     # ACS: the table knows its refusal
                return Step("login", Status.FAIL, str(exc.reply), explain(exc.reply))
            return Step("login", Status.FAIL, str(exc.reply),
                        login_fix(self.config, exc.reply, profile, token))
        except UpstreamUnavailable as exc:
            return Step("login", Status.FAIL, str(exc.reply), explain(exc.reply) or (
                "the upstream did not complete the login (see the detail); if it persists, "
                f"check that {session.where} is Exchange Online"))
        if isinstance(token, Password):
            return Step("login", Status.OK, f"AUTH LOGIN as {session.upstream.username} "
                                            "accepted")
        return Step("login", Status.OK, f"XOAUTH2 login accepted for {profile.mailbox}")

    async def _envelope(self, session: UpstreamSession, name: str, profile: Profile) -> Step:
        mailbox = profile.mailbox
        text = build_test_message(mailbox, mailbox, SUBJECT, self.config.server.hostname,
                                  command="doctor")
        msg = Outbound(id=new_message_id(), profile=name, mail_from=mailbox,
                       rcpt_tos=[mailbox], mailbox=mailbox, content=Content.from_bytes(text))
        result = await session.send_one(msg, dry_run=True)
        if result.reply.ok:
            return Step("envelope", Status.OK, f"MAIL FROM:<{mailbox}> and RCPT TO:<{mailbox}> "
                                               "accepted; RSET, nothing was sent")
        reply = next(iter(result.refused.values()), result.reply)
        command = "RCPT TO" if result.refused else "MAIL FROM"
        return Step("envelope", Status.FAIL, f"{command}: {reply}", explain(reply) or (
            f"Exchange refused {command} for the profile's own mailbox {mailbox}: check that "
            "the mailbox exists, is licensed and may send, and the detail's status code"))

    async def _send(self, session: UpstreamSession, name: str, profile: Profile,
                    to: str) -> Step:
        mailbox = profile.mailbox
        text = build_test_message(mailbox, to, SUBJECT, self.config.server.hostname,
                                  command="doctor")
        msg = Outbound(id=new_message_id(), profile=name, mail_from=mailbox, rcpt_tos=[to],
                       mailbox=mailbox, content=Content.from_bytes(text))
        result = await session.send_one(msg)
        if result.reply.ok:
            return Step("send", Status.OK, f"test message {msg.id} to {to} accepted: "
                                           f"{result.reply}")
        reply = next(iter(result.refused.values()), result.reply)
        return Step("send", Status.FAIL, f"test message to {to}: {reply}",
                    explain(reply) or "see the detail: this is the upstream's own verdict")

    # --- expiry ----------------------------------------------------------------------

    def _expiry(self, name: str) -> Step:
        cred = self._expiry_credentials.get(name) or self.config.credentials[name]
        return expiry_step(name, cred)


# --- helpers ---------------------------------------------------------------------------

def _tls_summary(session: UpstreamSession, up: Upstream) -> str:
    how = "implicit TLS" if up.tls == "implicit" else "STARTTLS offered"
    tls = session.transport_info("ssl_object")
    if not isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
        return f"{how}; TLS established and the certificate verified"
    cert: Any = tls.getpeercert() or {}

    def name_of(key: str) -> str:
        for rdn in cert.get(key, ()):
            for attr, value in rdn:
                if attr in ("commonName", "organizationName"):
                    return str(value)
        return "?"

    return (f"{how}; {tls.version()}; certificate for {up.host} verified (issued by "
            f"{name_of('issuer')}, valid until {cert.get('notAfter', '?')})")
