"""``smtp-oauth-relay doctor``: which setup step is missing, and how to fix it.

Users' most common question is "why 535?", and Exchange's answer names none of the half
dozen setup steps in Entra ID and Exchange that may be missing. The doctor walks the path a
message takes - config, DNS, TCP, TLS, token, token claims, XOAUTH2 login, MAIL/RCPT - with
the relay's own code (the same TLS context, token provider and XOAUTH2 exchange as real
deliveries, see :mod:`relay.deliver.session` and :mod:`relay.oauth.provider`), so what
passes here passes for mail. A failure stops only the steps that depend on it: the token
does not need the network path to Exchange, so one run shows every independent problem, and
steps after a failure they depend on are listed as skipped rather than failing noisily.

Explanations come from :func:`relay.deliver.classify.classify` and
:mod:`relay.oauth.advice`; the texts here add what those cannot know: the exact commands
with this profile's values filled in, and the step of the README's "Microsoft-side setup"
that they belong to. Nothing printed contains a token or a secret; MAIL/RCPT is a dry run
(RSET instead of DATA), so nothing is
sent unless ``--send-to`` asks for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config import CLOUDS, Config, ConfigError, Credential, Profile, Upstream, load_config
from relay.core.errors import find_cause
from relay.core.message import Content, Outbound, new_message_id
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.deliver.classify import classify
from relay.deliver.failures import AuthenticationRejected, UpstreamUnavailable
from relay.deliver.session import UpstreamSession
from relay.deliver.upstream import UpstreamClient
from relay.oauth.certificates import CertificateError, app_certificate
from relay.oauth.provider import TokenProvider
from relay.oauth.token import SEND_AS_APP, Token, TokenError
from relay.ops.testmessage import build_test_message

DEFAULT_TIMEOUT = 10.0
TOKEN_TIMEOUT = 60.0   # msal may retry; its own HTTP timeouts bound each request
WARN_DAYS = 30
# Office 365 Exchange Online's application id: a token requested for it carries it as aud.
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
SUBJECT = "smtp-oauth-relay doctor test message"

_SETUP = {1: "App registration", 2: "Credential", 3: "API permission",
          4: "Service principal in Exchange", 5: "SMTP AUTH enabled"}
# Entra error codes (see relay.oauth.advice) and the setup step that fixes them.
_TOKEN_SETUP_STEP = {7000215: 2, 7000222: 2, 7000218: 2, 700027: 2, 700016: 1, 90002: 1,
                     500011: 3}
# What the classifier says when it knows nothing more than the reply's class.
_GENERIC = frozenset(classify(Reply(code, "")).explanation for code in (250, 450, 550))


def setup_step(number: int) -> str:
    return f'README "Microsoft-side setup", step {number}: {_SETUP[number]}'


class Status(enum.StrEnum):
    OK = "ok"
    INFO = "info"   # nothing wrong, but something could not be checked
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"   # not run: a step it depends on failed


_LABEL = {Status.OK: "[ OK ]", Status.INFO: "[INFO]", Status.WARN: "[WARN]",
          Status.FAIL: "[FAIL]", Status.SKIP: "[SKIP]"}
_SEVERITY = {Status.SKIP: 0, Status.OK: 0, Status.INFO: 1, Status.WARN: 2, Status.FAIL: 3}


@dataclass
class Step:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.INFO, Status.WARN)


def _skip(name: str, because: str) -> Step:
    return Step(name, Status.SKIP, f"not run: {because}")


@dataclass
class ProfileReport:
    profile: str | None
    mailbox: str | None = None
    credential: str | None = None
    upstream: str | None = None
    steps: list[Step] = field(default_factory=list)

    @property
    def status(self) -> Status:
        worst = max((s.status for s in self.steps), key=_SEVERITY.__getitem__,
                    default=Status.OK)
        return Status.OK if worst in (Status.INFO, Status.SKIP) else worst

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "mailbox": self.mailbox,
                "credential": self.credential, "upstream": self.upstream,
                "status": str(self.status),
                "steps": [{"name": s.name, "status": str(s.status), "detail": s.detail,
                           "fix": s.fix} for s in self.steps]}


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
    known = ", ".join(config.profiles) or "none"
    if profile is not None:
        if profile not in config.profiles:
            raise ConfigError(source, [("profiles", f"no profile named {profile!r} "
                                                    f"(known: {known})")])
        return [profile]
    if not config.profiles:
        raise ConfigError(source, [("profiles", "no profiles are defined: nothing to check")])
    return list(config.profiles)


def failed(reports: list[ProfileReport]) -> bool:
    return any(s.status is Status.FAIL for r in reports for s in r.steps)


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
        upstream = self.config.upstream_for(profile)
        upstream = upstream.model_copy(update={"timeout": min(upstream.timeout, self.timeout)})
        report = ProfileReport(name, profile.mailbox, profile.credential,
                               host_port(upstream.host, upstream.port))
        steps = report.steps
        steps.append(Step("config", Status.OK, f"{self.source} is valid"))
        # The token first (shown after the network steps): the session must not sit idle
        # before AUTH while Entra ID is slow to answer.
        token = await self._token(profile.credential)
        session: UpstreamSession | None = None
        try:
            dns = await self._dns(profile, upstream)
            steps.append(dns)
            if dns.ok:
                session, network = await self._connect(profile, upstream)
                steps += network
            else:
                steps += [_skip("connect", "DNS failed"), _skip("tls", "DNS failed")]

            if isinstance(token, TokenError):
                steps.append(self._token_failed(profile.credential, token))
                steps.append(_skip("claims", "no token"))
            else:
                steps.append(self._token_ok(token))
                steps.append(self._claims(profile, upstream, token))

            login = await self._login(session, profile, token, steps)
            steps.append(login)
            if login.status is Status.OK:
                assert session is not None
                steps.append(await self._envelope(session, name, profile))
            else:
                steps.append(_skip("envelope", "no login"))
            if self.send_to is not None:
                if session is not None and session.is_open and steps[-1].status is Status.OK:
                    steps.append(await self._send(session, name, profile, self.send_to))
                else:
                    steps.append(_skip("send", "the checks before it failed"))
        finally:
            if session is not None:
                await session.close()
        steps.append(self._expiry(profile.credential))
        return report

    # --- network ---------------------------------------------------------------------

    def _host_hint(self, profile: Profile) -> str:
        """Where the host and port come from, and what they should be."""
        exchange = f"{self._exchange_host(profile)}:587"
        if profile.upstream is not None:
            return (f"check upstreams.{profile.upstream}.host and port (Exchange Online: "
                    f"{exchange})")
        cred = profile.credential
        return (f"{exchange} is Exchange Online's endpoint for credentials.{cred}.cloud: "
                f"{self.config.credentials[cred].cloud}")

    def _exchange_host(self, profile: Profile) -> str:
        return CLOUDS[self.config.credentials[profile.credential].cloud].smtp_host

    async def _dns(self, profile: Profile, up: Upstream) -> Step:
        loop = asyncio.get_running_loop()
        fix = (f"{self._host_hint(profile)}; check this machine's DNS resolver "
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
            return None, [_skip("connect", "the TLS settings are unusable"), Step(
                "tls", Status.FAIL, str(exc),
                f"{_ca_setting(profile)} must be a PEM file with the CA certificate(s)")]
        session = client.session()
        try:
            await session.connect()
        except UpstreamUnavailable as exc:
            return None, self._connect_failed(profile, up, session.stage, exc)
        peer = session.transport_info("peername")
        at = (f"connected to {host_port(str(peer[0]), int(peer[1]))}"
              if isinstance(peer, tuple) and len(peer) >= 2 else f"connected to {where}")
        return session, [Step("connect", Status.OK, f"{at}; the SMTP greeting and EHLO "
                                                    "were accepted"),
                         Step("tls", Status.OK, _tls_summary(session, up))]

    def _connect_failed(self, profile: Profile, up: Upstream, stage: str,
                        exc: UpstreamUnavailable) -> list[Step]:
        where = host_port(up.host, up.port)
        detail = _plain(exc.reply)
        reached = Step("connect", Status.OK, f"{where} accepts connections")
        if (verify := find_cause(exc, ssl.SSLCertVerificationError)) is not None:
            return [reached, Step("tls", Status.FAIL, detail,
                                  self._verify_fix(profile, up, verify))]
        if (tls := find_cause(exc, ssl.SSLError)) is not None:
            return [reached, Step("tls", Status.FAIL, detail, (
                f"the TLS handshake failed ({tls.reason or tls}): Exchange Online needs TLS "
                "1.2 or newer; a proxy or firewall that intercepts the connection may be "
                f"interfering; check that {where} is an SMTP submission endpoint"
                + ("" if up.tls == "implicit" else " with STARTTLS")))]
        if stage == "STARTTLS":
            return [reached, Step("tls", Status.FAIL, detail, (
                f"{where} did not offer or complete STARTTLS, and the relay never sends its "
                "token without TLS. Usually a firewall's SMTP inspection strips STARTTLS "
                "(e.g. Cisco ASA/FTD 'inspect esmtp'): turn it off for this traffic; or the "
                f"host is not Exchange Online's submission endpoint "
                f"({self._exchange_host(profile)}:587)"))]
        if find_cause(exc, ConnectionRefusedError) is not None:
            fix = (f"nothing accepts connections on {where}, or a firewall rejects them; "
                   f"{self._host_hint(profile)}")
        elif find_cause(exc, TimeoutError) is not None:
            fix = (f"no answer from {where}: a firewall probably drops outbound connections "
                   f"to port {up.port}; allow outbound TCP {up.port} to {up.host} (an HTTP "
                   "proxy from HTTPS_PROXY does not carry SMTP)")
        else:
            fix = (f"the server at {where} did not complete the SMTP greeting and EHLO; "
                   f"{self._host_hint(profile)}")
        return [Step("connect", Status.FAIL, detail, fix),
                _skip("tls", "no connection")]

    def _verify_fix(self, profile: Profile, up: Upstream,
                    exc: ssl.SSLCertVerificationError) -> str:
        problem = (exc.verify_message or exc.reason or "").lower()
        if "mismatch" in problem:
            return (f"the certificate is not valid for {up.host}: connect by the name "
                    f"Microsoft publishes ({self._exchange_host(profile)}), not an IP address "
                    "or an alias; if the name is right, something intercepts the connection")
        if "expired" in problem or "not yet valid" in problem:
            return ("the certificate is outside its validity period: check this machine's "
                    "clock (date -u); if the clock is right, something on the path presents "
                    "an old certificate")
        if up.ca_file is not None:
            return (f"the certificate is not signed by the CA in {_ca_setting(profile)} "
                    f"({problem or 'unknown'}): set it to the CA that issued the upstream's "
                    "certificate (a TLS-inspecting proxy's own CA, if one is in between), or "
                    "remove it to use the system's trust store")
        return ("the certificate is not signed by a CA this machine trusts "
                f"({problem or 'unknown'}). Usually a TLS-inspecting proxy or firewall is in "
                f"between: set {_ca_setting(profile)} to its CA certificate (PEM); "
                "otherwise update the system's CA certificates (ca-certificates)")

    # --- token -----------------------------------------------------------------------

    async def _token(self, name: str) -> Token | TokenError:
        if name not in self._tokens:
            provider = self._providers[name] = TokenProvider(name,
                                                             self.config.credentials[name])
            try:
                self._tokens[name] = await asyncio.wait_for(provider.get(), TOKEN_TIMEOUT)
            except TokenError as exc:
                self._tokens[name] = exc
            except TimeoutError:
                self._tokens[name] = TokenError(
                    f"credential {name!r}: Entra ID did not answer within "
                    f"{TOKEN_TIMEOUT:g} s", transient=True)
        return self._tokens[name]

    def _token_ok(self, token: Token) -> Step:
        minutes = max(0, int(token.expires_in() // 60))
        return Step("token", Status.OK, f"acquired (app {token.app_id or '?'}, audience "
                                        f"{token.audience or '?'}, valid {minutes} min)")

    def _token_failed(self, name: str, exc: TokenError) -> Step:
        message = exc.message.removeprefix(f"credential {name!r}: ")
        advice, said, entra = message.partition(". Entra ID said: ")
        if said:
            detail, fix = f"Entra ID said: {entra}", advice
        else:
            detail = message
            fix = ("a network or temporary problem between this machine and Entra ID "
                   "(see the detail); run doctor again once it is solved" if exc.transient
                   else f"correct credentials.{name} as the detail says")
        number = _TOKEN_SETUP_STEP.get(exc.code or 0)
        if number is not None:
            fix += f" ({setup_step(number)})"
        return Step("token", Status.FAIL, detail, fix)

    def _claims(self, profile: Profile, up: Upstream, token: Token) -> Step:
        name = profile.credential
        cred = self.config.credentials[name]
        problems: list[tuple[Status, str, str]] = []
        facts: list[str] = []

        cloud = next((c for c, spec in CLOUDS.items() if spec.smtp_host == up.host.lower()),
                     cred.cloud)
        resource = CLOUDS[cloud].scope.removesuffix("/.default")
        accepted = {resource, resource + "/", EXCHANGE_APP_ID}
        if cloud == "global":
            accepted |= {"https://outlook.office.com", "https://outlook.office.com/"}
        audience = token.audience or ""
        if audience.lower() not in accepted:
            if cred.scope is not None:
                fix = (f"set credentials.{name}.scope to {resource}/.default, or remove it "
                       "(the cloud's default scope is the right one)")
            elif cred.cloud != cloud:
                fix = f"set credentials.{name}.cloud: {cloud} ({up.host} is in that cloud)"
            else:
                fix = f"request the token for the scope {resource}/.default"
            problems.append((Status.FAIL, f"the token is for {audience or 'no audience'}, "
                             f"but Exchange Online ({cloud} cloud) needs {resource}", fix))
        else:
            facts.append(f"audience {audience}")

        tid, configured = token.tenant or "", cred.tenant_id
        if "." in configured:  # a domain name: Entra puts the directory id into tid
            facts.append(f"tenant {tid or '?'}")
        elif tid.lower() != configured.lower():
            problems.append((Status.FAIL, f"the token's tenant (tid) is {tid or 'missing'}, "
                             f"not the configured tenant_id {configured}",
                             f"check credentials.{name}.tenant_id and authority: the token "
                             "must come from the mailbox's own tenant"))
        else:
            facts.append(f"tenant {tid}")

        if token.scopes:
            problems.append((Status.FAIL, "a delegated token (scp: "
                             f"{' '.join(token.scopes)}), issued for a user, not for the app",
                             "the relay uses the client-credentials flow and needs an "
                             "application token: in the app registration use Office 365 "
                             f"Exchange Online > *Application* permissions > {SEND_AS_APP} "
                             "(not the delegated SMTP.Send) and grant admin consent "
                             f"({setup_step(3)})"))
        if SEND_AS_APP in token.roles:
            facts.append(f"role {SEND_AS_APP}")
        else:
            roles = ", ".join(token.roles) or "none"
            problems.append((Status.WARN, f"no {SEND_AS_APP} role in the token (roles: "
                             f"{roles})",
                             f"add API permission Office 365 Exchange Online > Application "
                             f"permissions > {SEND_AS_APP} and grant admin consent "
                             f"({setup_step(3)}), unless the app is authorised through RBAC "
                             "for Applications in Exchange (New-ManagementRoleAssignment "
                             f"-Role 'Application {SEND_AS_APP}'): then this is expected"))

        if not problems:
            return Step("claims", Status.OK, "app-only token: " + ", ".join(facts))
        worst = max((p[0] for p in problems), key=_SEVERITY.__getitem__)
        return Step("claims", worst, "; ".join(p[1] for p in problems),
                    "\n".join(p[2] for p in problems))

    # --- Exchange --------------------------------------------------------------------

    async def _login(self, session: UpstreamSession | None, profile: Profile,
                     token: Token | TokenError, steps: list[Step]) -> Step:
        if session is None:
            return _skip("login", "no TLS connection to the upstream")
        if isinstance(token, TokenError):
            return _skip("login", "no token")
        if any(s.name == "claims" and s.status is Status.FAIL for s in steps):
            return _skip("login", "the token cannot work (see claims)")
        try:
            await session.login(profile.mailbox, token)
        except AuthenticationRejected as exc:
            return Step("login", Status.FAIL, str(exc.reply),
                        self._login_fix(exc.reply, profile, token))
        except UpstreamUnavailable as exc:
            return Step("login", Status.FAIL, str(exc.reply), _explain(exc.reply) or (
                "the upstream did not complete the login (see the detail); if it persists, "
                f"check that {session.where} is Exchange Online"))
        return Step("login", Status.OK, f"XOAUTH2 login accepted for {profile.mailbox}")

    def _login_fix(self, reply: Reply, profile: Profile, token: Token) -> str:
        verdict = classify(reply)
        mailbox = profile.mailbox
        if verdict == classify(Reply(535, "5.7.139")):
            return (f"{verdict.explanation}.\nExchange Online PowerShell ({setup_step(5)}):\n"
                    f"  Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled "
                    "$false\n"
                    "  Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled\n"
                    "  Set-TransportConfig -SmtpClientAuthenticationDisabled $false   # the "
                    "tenant-wide default\n"
                    "Security defaults (Entra admin center > Overview > Properties > Manage "
                    "security defaults) switch SMTP AUTH off for the whole tenant.")
        if verdict == classify(Reply(535, "5.7.3")):
            client_id = self.config.credentials[profile.credential].client_id
            oid = str(token.claims.get("oid") or "<object id of the app's Enterprise "
                                                 "application>")
            text = (f"{verdict.explanation}.\nExchange Online PowerShell ({setup_step(4)}; "
                    "the token's oid is the Enterprise application's object id):\n"
                    f"  New-ServicePrincipal -AppId {client_id} -ObjectId {oid}\n"
                    f"  Add-MailboxPermission -Identity {mailbox} -User {oid} "
                    "-AccessRights FullAccess\n"
                    "New permissions can take a while to apply in Exchange Online.")
            if SEND_AS_APP not in token.roles:
                text += (f"\nThe token also has no {SEND_AS_APP} role: grant it "
                         f"({setup_step(3)}) unless RBAC for Applications is used.")
            return text
        return _explain(reply) or verdict.explanation

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
        return Step("envelope", Status.FAIL, f"{command}: {reply}", _explain(reply) or (
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
                    _explain(reply) or "see the detail: this is the upstream's own verdict")

    # --- expiry ----------------------------------------------------------------------

    def _expiry(self, name: str) -> Step:
        cred = self._expiry_credentials.get(name) or self.config.credentials[name]
        base = f"credentials.{name}"
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
        worst = max((c[0] for c in checks), key=_SEVERITY.__getitem__)
        fixes = list(dict.fromkeys(c[2] for c in checks if c[2] and c[0] is not Status.OK))
        return Step("expiry", worst, "; ".join(c[1] for c in checks),
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


# --- helpers ---------------------------------------------------------------------------

def _ca_setting(profile: Profile) -> str:
    if profile.upstream is not None:
        return f"upstreams.{profile.upstream}.ca_file"
    return ("ca_file of an upstream (add upstreams: {o365: {host: smtp.office365.com, "
            "ca_file: /path/to/ca.pem} and profiles.<name>.upstream: o365)")


def _plain(reply: Reply) -> str:
    """The relay's own 451 text without its SMTP codes (they mean nothing to a reader)."""
    text = " ".join(reply.text.split())
    enhanced = reply.enhanced
    return text[len(enhanced):].strip() if enhanced else text


def _explain(reply: Reply) -> str | None:
    """The classifier's explanation, unless it only knows the reply's class."""
    explanation = classify(reply).explanation
    return None if explanation in _GENERIC else explanation


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


# --- output ----------------------------------------------------------------------------

def render_json(reports: list[ProfileReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=2)


def render_text(reports: list[ProfileReport]) -> str:
    lines: list[str] = []
    for report in reports:
        if report.mailbox is None:  # the config could not be used
            lines.append("configuration" if report.profile is None
                         else f"profile {report.profile}")
        else:
            lines.append(f"profile {report.profile}: {report.mailbox} via {report.upstream} "
                         f"(credential {report.credential})")
        for step in report.steps:
            detail = step.detail.splitlines() or [""]
            lines.append(f"  {_LABEL[step.status]} {step.name:<9} {detail[0]}")
            lines += [f"  {'':6} {'':<9} {extra}" for extra in detail[1:]]
            if step.fix and step.status in (Status.FAIL, Status.WARN):
                fix = step.fix.splitlines()
                lines.append(f"{'':9}fix: {fix[0]}")
                lines += [f"{'':14}{extra}" for extra in fix[1:]]
        lines.append("")
    fails = sum(s.status is Status.FAIL for r in reports for s in r.steps)
    warns = sum(s.status is Status.WARN for r in reports for s in r.steps)
    checked = sum(r.mailbox is not None for r in reports)
    if not checked:
        lines.append("the configuration is not usable, so nothing else was checked")
    elif fails:
        lines.append(f"{fails} failure(s), {warns} warning(s) in {checked} profile(s); "
                     "fix the first FAIL of a profile first: later steps depend on it")
    elif warns:
        lines.append(f"no failures, {warns} warning(s) in {checked} profile(s)")
    else:
        lines.append(f"all checks passed for {checked} profile(s)")
    return "\n".join(lines)
