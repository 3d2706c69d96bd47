"""The doctor's checks for a profile with ``transport: graph`` (Microsoft Graph sendMail).

- :func:`graph_steps`: the token for Graph and its claims, a probe of sendMail as the
  profile's mailbox that sends nothing, and with ``--send-to`` a real test message.

Graph has no dry run: the probe is a sendMail whose body is not base64, which Graph must
refuse. A 400 for the body shows the token was taken and the request got as far as the
message; a 401, 403 or 404 names the setup step that is missing. Whether the app may send
*as* the mailbox shows only in a real send (``--send-to``): the probe says so.
"""

from __future__ import annotations

from relay.config import CLOUDS, Config, Profile
from relay.core.message import Content, Outbound, new_message_id
from relay.deliver.graph import GraphClient, Prepared
from relay.oauth.token import Token, TokenError
from relay.ops.doctoradvice import delegated_claims, explain, token_failed
from relay.ops.doctorreport import Status, Step, skip
from relay.ops.testmessage import build_test_message

MAIL_SEND = "Mail.Send"


def graph_claims(config: Config, profile: Profile, token: Token) -> Step:
    """Whether the token is one Graph takes for sendMail: its audience, an application
    token, and Mail.Send (or else RBAC for Applications in Exchange)."""
    cloud = CLOUDS[config.credentials[profile.credential].cloud]
    audience = (token.audience or "").rstrip("/")
    if audience.lower() not in (cloud.graph_url.lower(), "00000003-0000-0000-c000-000000000000"):
        return Step("graph-claims", Status.FAIL,
                    f"the token is for {audience or 'no audience'}, not {cloud.graph_url}",
                    "the relay asks for the Graph scope itself; a proxy or a credential "
                    "setting in between changed it")
    if config.credentials[profile.credential].delegated is not None:
        step = delegated_claims(profile, token, MAIL_SEND, None, 0.0)
        return Step("graph-claims", step.status, step.detail, step.fix)
    if token.scopes:
        return Step("graph-claims", Status.FAIL,
                    f"a delegated token (scp: {' '.join(token.scopes)}), issued for a user",
                    f"use Microsoft Graph > *Application* permissions > {MAIL_SEND} (not the "
                    "delegated one), or RBAC for Applications, and grant admin consent")
    if MAIL_SEND in token.roles:
        return Step("graph-claims", Status.OK,
                    f"app-only token for {audience}, role {MAIL_SEND} (every mailbox of "
                    "the tenant: RBAC for Applications would narrow it)")
    return Step("graph-claims", Status.INFO,
                f"app-only token for {audience} without the {MAIL_SEND} role: sending relies "
                "on RBAC for Applications in Exchange (New-ManagementRoleAssignment -Role "
                f"'Application {MAIL_SEND}'), which the next step tests")


async def graph_steps(config: Config, name: str, token: Token | TokenError,
                      send_to: str | None) -> list[Step]:
    profile = config.profiles[name]
    if isinstance(token, TokenError):
        failed = token_failed(profile.credential, token)
        return [Step("graph-token", failed.status, failed.detail, failed.fix),
                skip("graph-claims", "no token"), skip("graph", "no token")]
    minutes = max(0, int(token.expires_in() // 60))
    steps = [Step("graph-token", Status.OK, f"acquired (app {token.app_id or '?'}, audience "
                                            f"{token.audience or '?'}, valid {minutes} min)"),
             graph_claims(config, profile, token)]
    if steps[-1].status is Status.FAIL:
        return [*steps, skip("graph", "the token cannot work (see graph-claims)")]
    client = GraphClient(config.graph_url_for(profile), config.graph)
    try:
        steps.append(await _probe(client, profile, token))
        if send_to is not None:
            if steps[-1].ok:
                steps.append(await _send(client, config, name, profile, token, send_to))
            else:
                steps.append(skip("send", "the checks before it failed"))
    finally:
        client.close()
    return steps


async def _probe(client: GraphClient, profile: Profile, token: Token) -> Step:
    status, reply = await client.probe(profile.mailbox, token)
    if status == 400:
        return Step("graph", Status.OK,
                    f"{client.base_url} took the token for {profile.mailbox} and refused the "
                    "probe's deliberately invalid body, so nothing was sent; whether the app "
                    "may send as the mailbox shows with --send-to")
    return Step("graph", Status.FAIL, f"sendMail as {profile.mailbox}: {reply}",
                explain(reply) or "see the detail: Graph's own words name the problem")


async def _send(client: GraphClient, config: Config, name: str, profile: Profile,
                token: Token, to: str) -> Step:
    mailbox = profile.mailbox
    text = build_test_message(mailbox, to, "smtp-oauth-relay doctor test message",
                              config.server.hostname, command="doctor")
    msg = Outbound(id=new_message_id(), profile=name, mail_from=mailbox, rcpt_tos=[to],
                   mailbox=mailbox, content=Content.from_bytes(text))
    prepared = await client.prepare(msg)
    if not isinstance(prepared, Prepared):
        return Step("send", Status.FAIL, f"test message to {to}: {prepared}")
    try:
        result = await client.send(prepared, mailbox, token)
    except Exception as exc:        # AuthenticationRejected: a 401 after a good probe
        return Step("send", Status.FAIL, f"test message to {to}: {exc}")
    if result.reply.ok:
        return Step("send", Status.OK, f"test message {msg.id} to {to} accepted: "
                                       f"{result.reply}")
    return Step("send", Status.FAIL, f"test message to {to}: {result.reply}",
                explain(result.reply) or "see the detail: this is Graph's own verdict")
