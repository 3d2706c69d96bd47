"""What a failed doctor step means, and how to fix it.

- :func:`setup_step`: a step of the README's "Microsoft-side setup", by number;
- :func:`connect_failure`, :func:`verify_fix`, :func:`host_hint`: the network path (a
  firewall, a TLS-inspecting proxy, a wrong host or cloud);
- :func:`token_failed`, :func:`judge_claims`: Entra ID's refusals, and tokens that
  Exchange Online would not take (audience, tenant, delegated, no SMTP.SendAsApp);
- :func:`login_fix`: a refused XOAUTH2 login (SMTP AUTH disabled, no service principal or
  mailbox permission in Exchange);
- :func:`mailbox_grant_commands`, :func:`smtp_auth_command`: steps 4 and 5 as the
  PowerShell to run, with the ids filled in (``init`` prints them too);
- :func:`explain`, :func:`plain`: the classifier's explanation of a reply, and the
  relay's own 451 text without its codes.

Explanations come from :func:`relay.deliver.classify.classify` and
:mod:`relay.oauth.advice`; the texts here add what those cannot know: the exact commands
with this profile's values filled in, and the step of the README's "Microsoft-side setup"
that they belong to. Nothing here contains a token or a secret.
"""

from __future__ import annotations

import ssl

from relay.config import CLOUDS, Config, Profile, Upstream
from relay.core.errors import find_cause
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.deliver.classify import classify
from relay.deliver.failures import UpstreamUnavailable
from relay.oauth.token import SEND_AS_APP, Token, TokenError
from relay.ops.doctorreport import Status, Step, skip, worst

# Office 365 Exchange Online's application id: a token requested for it carries it as aud.
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"

_SETUP = {1: "App registration", 2: "Credential", 3: "API permission",
          4: "Service principal in Exchange", 5: "SMTP AUTH enabled"}
# Entra error codes (see relay.oauth.advice) and the setup step that fixes them.
_TOKEN_SETUP_STEP = {7000215: 2, 7000222: 2, 7000218: 2, 700027: 2, 700016: 1, 90002: 1,
                     500011: 3}
# What the classifier says when it knows nothing more than the reply's class.
_GENERIC = frozenset(classify(Reply(code, "")).explanation for code in (250, 450, 550))


def setup_step(number: int) -> str:
    return f'README "Microsoft-side setup", step {number}: {_SETUP[number]}'


# --- the network path --------------------------------------------------------------------

def host_hint(config: Config, profile: Profile) -> str:
    """Where the host and port come from, and what they should be."""
    exchange = f"{exchange_host(config, profile)}:587"
    if profile.upstream is not None:
        return (f"check upstreams.{profile.upstream}.host and port (Exchange Online: "
                f"{exchange})")
    cred = profile.credential
    return (f"{exchange} is Exchange Online's endpoint for credentials.{cred}.cloud: "
            f"{config.credentials[cred].cloud}")


def exchange_host(config: Config, profile: Profile) -> str:
    """The SMTP host of the cloud of the profile's credential."""
    return CLOUDS[config.credentials[profile.credential].cloud].smtp_host


def connect_failure(config: Config, profile: Profile, up: Upstream, stage: str,
                    exc: UpstreamUnavailable) -> list[Step]:
    """The connect and tls steps for a connection that failed at ``stage``: which of them
    failed, and the likely cause (a firewall, a TLS-inspecting proxy, a wrong host)."""
    where = host_port(up.host, up.port)
    detail = plain(exc.reply)
    reached = Step("connect", Status.OK, f"{where} accepts connections")
    if (verify := find_cause(exc, ssl.SSLCertVerificationError)) is not None:
        return [reached, Step("tls", Status.FAIL, detail,
                              verify_fix(config, profile, up, verify))]
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
            f"({exchange_host(config, profile)}:587)"))]
    if find_cause(exc, ConnectionRefusedError) is not None:
        fix = (f"nothing accepts connections on {where}, or a firewall rejects them; "
               f"{host_hint(config, profile)}")
    elif find_cause(exc, TimeoutError) is not None:
        fix = (f"no answer from {where}: a firewall probably drops outbound connections "
               f"to port {up.port}; allow outbound TCP {up.port} to {up.host} (an HTTP "
               "proxy from HTTPS_PROXY does not carry SMTP)")
    else:
        fix = (f"the server at {where} did not complete the SMTP greeting and EHLO; "
               f"{host_hint(config, profile)}")
    return [Step("connect", Status.FAIL, detail, fix),
            skip("tls", "no connection")]


def verify_fix(config: Config, profile: Profile, up: Upstream,
               exc: ssl.SSLCertVerificationError) -> str:
    """What to do about an upstream certificate that did not verify."""
    problem = (exc.verify_message or exc.reason or "").lower()
    if "mismatch" in problem:
        return (f"the certificate is not valid for {up.host}: connect by the name "
                f"Microsoft publishes ({exchange_host(config, profile)}), not an IP address "
                "or an alias; if the name is right, something intercepts the connection")
    if "expired" in problem or "not yet valid" in problem:
        return ("the certificate is outside its validity period: check this machine's "
                "clock (date -u); if the clock is right, something on the path presents "
                "an old certificate")
    if up.ca_file is not None:
        return (f"the certificate is not signed by the CA in {ca_setting(profile)} "
                f"({problem or 'unknown'}): set it to the CA that issued the upstream's "
                "certificate (a TLS-inspecting proxy's own CA, if one is in between), or "
                "remove it to use the system's trust store")
    return ("the certificate is not signed by a CA this machine trusts "
            f"({problem or 'unknown'}). Usually a TLS-inspecting proxy or firewall is in "
            f"between: set {ca_setting(profile)} to its CA certificate (PEM); "
            "otherwise update the system's CA certificates (ca-certificates)")


# --- token -----------------------------------------------------------------------------

def token_failed(name: str, exc: TokenError) -> Step:
    """The token step for a fetch that failed: what Entra ID said, and the setup step."""
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


def delegated_claims(profile: Profile, token: Token, permission: str,
                     saved_at: float | None, now: float) -> Step:
    """The claims step for a user's delegated token: the permission, and that the user is
    the profile's mailbox (Exchange and Graph let a user send only as themselves)."""
    user = str(token.claims.get("upn") or token.claims.get("preferred_username") or "")
    again = f"run `smtp-oauth-relay authorize --credential {profile.credential}`"
    age = (f"; signed in {int((now - saved_at) // 86400)} day(s) ago" if saved_at else "")
    if permission not in token.scopes:
        return Step("claims", Status.FAIL,
                    f"the delegated token of {user or '?'} lacks {permission} (scp: "
                    f"{' '.join(token.scopes) or 'none'})",
                    f"add the delegated permission {permission} to the app registration, "
                    f"consent to it, and {again}")
    if user.lower() != profile.mailbox.lower():
        return Step("claims", Status.FAIL,
                    f"the token is {user or 'nobody'}'s, but the profile sends as "
                    f"{profile.mailbox}",
                    f"{again} and sign in as {profile.mailbox}, or set the profile's mailbox "
                    f"to {user}")
    return Step("claims", Status.OK, f"delegated token of {user} with {permission}{age}")


def judge_claims(config: Config, profile: Profile, up: Upstream, token: Token) -> Step:
    """The claims step: whether the token is one Exchange Online takes for this upstream
    (audience, tenant, an application token, the SMTP.SendAsApp role)."""
    name = profile.credential
    cred = config.credentials[name]
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
    return Step("claims", worst(p[0] for p in problems), "; ".join(p[1] for p in problems),
                "\n".join(p[2] for p in problems))


# --- Exchange ----------------------------------------------------------------------------

def login_fix(config: Config, reply: Reply, profile: Profile, token: Token) -> str:
    """What to do about a refused XOAUTH2 login, with this profile's values filled in."""
    verdict = classify(reply)
    mailbox = profile.mailbox
    if verdict == classify(Reply(535, "5.7.139")):
        return (f"{verdict.explanation}.\nExchange Online PowerShell ({setup_step(5)}):\n"
                f"  {smtp_auth_command(mailbox)}\n"
                "  Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled\n"
                "  Set-TransportConfig -SmtpClientAuthenticationDisabled $false   # the "
                "tenant-wide default\n"
                "Security defaults (Entra admin center > Overview > Properties > Manage "
                "security defaults) switch SMTP AUTH off for the whole tenant.")
    if verdict == classify(Reply(535, "5.7.3")):
        client_id = config.credentials[profile.credential].client_id
        oid = str(token.claims.get("oid") or OBJECT_ID_UNKNOWN)
        lines = "".join(f"  {c}\n" for c in mailbox_grant_commands(client_id, oid, mailbox))
        text = (f"{verdict.explanation}.\nExchange Online PowerShell ({setup_step(4)}; "
                f"the token's oid is the Enterprise application's object id):\n{lines}"
                "New permissions can take a while to apply in Exchange Online.")
        if SEND_AS_APP not in token.roles:
            text += (f"\nThe token also has no {SEND_AS_APP} role: grant it "
                     f"({setup_step(3)}) unless RBAC for Applications is used.")
        return text
    return explain(reply) or verdict.explanation


def mailbox_grant_commands(client_id: str, object_id: str, mailbox: str) -> list[str]:
    """Step 4 in Exchange Online PowerShell: the app's service principal, and its right to
    the mailbox. ``object_id`` is the Enterprise application's, not the app registration's."""
    return [f"New-ServicePrincipal -AppId {client_id} -ObjectId {object_id}",
            f"Add-MailboxPermission -Identity {mailbox} -User {object_id} "
            "-AccessRights FullAccess"]


def smtp_auth_command(mailbox: str) -> str:
    """Step 5: SMTP AUTH on for the mailbox (the mailbox's setting wins over the tenant's)."""
    return f"Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false"


OBJECT_ID_UNKNOWN = "<object id of the app's Enterprise application>"


# --- helpers ---------------------------------------------------------------------------------

def ca_setting(profile: Profile) -> str:
    if profile.upstream is not None:
        return f"upstreams.{profile.upstream}.ca_file"
    return ("ca_file of an upstream (add upstreams: {o365: {host: smtp.office365.com, "
            "ca_file: /path/to/ca.pem} and profiles.<name>.upstream: o365)")


def plain(reply: Reply) -> str:
    """The relay's own 451 text without its SMTP codes (they mean nothing to a reader)."""
    text = " ".join(reply.text.split())
    enhanced = reply.enhanced
    return text[len(enhanced):].strip() if enhanced else text


def explain(reply: Reply) -> str | None:
    """The classifier's explanation, unless it only knows the reply's class."""
    explanation = classify(reply).explanation
    return None if explanation in _GENERIC else explanation
