"""What an upstream reply means for the queue: deliver, wait, slow down, pause, alert, bounce.

- :func:`classify`: the :class:`Verdict` on a :class:`~relay.core.reply.Reply`: an
  :class:`Action` for the queue, an explanation for the operator's log, a hint for the
  sender, whether to alert, and the setup :class:`Problem` it shows, if any;
- :data:`TABLE`: the :class:`Rule` objects (first match wins) that know Exchange Online's
  replies.

The SMTP class of a reply is not enough to act on. Exchange answers a missing permission
and a bad login with 5xx, yet neither is the message's fault: bouncing them would throw
away mail that goes through once the operator fixes the setup. A used-up daily quota is
5xx too but frees itself within 24 hours. So the decision is a table of the replies
Exchange Online is known to give (Microsoft's SMTP AUTH and NDR documentation), first match wins,
and only replies the table does not know fall back to their SMTP class.

Patterns run over ``f"{code} {text}"`` and mostly look for the enhanced status code
anywhere in it, so a reply the delivery step wrapped in its own words (for example
``451 4.7.0 Upstream refused the relay's login ...: 535 5.7.3 ...``) is still recognised.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from relay.core.reply import Reply
from relay.core.text import one_line


class Action(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"                  # back off and try again later
    THROTTLE = "throttle"            # lower this mailbox's concurrency, then retry
    PAUSE_MAILBOX = "pause_mailbox"  # 24 h submission quota used: hold all its mail
    TENANT_LIMIT = "tenant_limit"    # the tenant's external recipients for the day are used:
                                     # those recipients wait (an hour at least), never bounce
    AUTH = "auth"                    # token or permission problem: refresh, defer, alert
    BOUNCE = "bounce"                # permanent for this recipient or message


class Problem(enum.StrEnum):
    """What a reply says about the profile's setup rather than about one message: the
    evidence behind a profile's readiness (relay.ops.profilehealth). Only replies that an
    operator must act on carry one; a token about to expire, say, is handled by a refresh."""

    LOGIN = "login"                  # the upstream refuses the relay's login for the mailbox
    SEND_AS = "send_as"              # the mailbox may not send as the message's sender


@dataclass(frozen=True)
class Verdict:
    action: Action
    explanation: str      # for the operator's log: the full diagnosis and fix
    alert: bool
    # For the sender (a synchronous client's 5xx, the DSN): what went wrong and who can fix
    # it, in a line. It may only repeat what the upstream's reply already says (addresses),
    # never the relay's own settings, so it is safe to show to anyone who submits mail.
    hint: str = ""
    problem: Problem | None = None


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    action: Action
    explanation: str  # may name the pattern's groups: {address}, {mailbox}
    alert: bool = False
    hint: str = ""    # the same groups; see Verdict.hint
    problem: Problem | None = None


def _status(code: str) -> str:
    """A regex for an enhanced status code that does not also match 5.7.30 for 5.7.3."""
    return r"(?<![\d.])" + re.escape(code) + r"(?!\.?\d)"


def _rule(pattern: str, action: Action, explanation: str, alert: bool = False,
          hint: str = "", problem: Problem | None = None) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), action, explanation, alert, hint,
                problem)


_SP = "the app's service principal"

TABLE: tuple[Rule, ...] = (
    _rule(r"^4\d\d .*(?:sender thread limit|concurrent connections limit) exceeded"
          r"|^432 " + _status("4.3.2"),
          Action.THROTTLE,
          "Exchange allows only a few concurrent sessions per mailbox (3); other senders may "
          "share this mailbox: lowering the relay's concurrency for it for a while"),
    # Before the Sent Items rule: this exception's name contains "QuotaExceededException".
    _rule(r"SubmissionQuotaExceededException|" + _status("5.1.90"),
          Action.PAUSE_MAILBOX,
          "the mailbox has used its 10,000 recipients per rolling 24 hours: holding its mail "
          "until the window frees (other programs sending as this mailbox count too)",
          alert=True),
    _rule(_status("5.7.233"),
          Action.TENANT_LIMIT,
          "the tenant has sent to as many external recipients as it may in 24 hours (the "
          "tenant external recipient rate limit, which every sender in the tenant counts "
          "against): the external recipients wait and are retried hourly until the window "
          "frees; bulk external mail belongs on Azure Communication Services Email, which "
          "does not count",
          alert=True),
    _rule(r"^5\d\d " + _status("5.2.2") + r"|QuotaExceededException",
          Action.RETRY,
          "the sending mailbox is full (Exchange saves every sent message to Sent Items): "
          "empty Sent Items, add a retention policy for it, or raise the mailbox quota",
          alert=True),
    # Before 5.7.3: ACS words its refusal like Exchange, and the fix is another.
    _rule(r"Azure Communication Services refused the login",
          Action.AUTH,
          "Azure Communication Services refused the SMTP login: check the upstream's "
          "username (the ACS SMTP Username resource, or <ACS resource>.<app client "
          "id>.<tenant id>), that the credential's client secret is current, and that the "
          "app has a role on the ACS resource that allows sending (e.g. Communication and "
          "Email Service Owner)",
          alert=True, problem=Problem.LOGIN),
    _rule(_status("5.7.139"),
          Action.AUTH,
          "SMTP AUTH is disabled for the mailbox or the tenant: run Set-CASMailbox -Identity "
          "<mailbox> -SmtpClientAuthenticationDisabled $false (and check Set-TransportConfig "
          "-SmtpClientAuthenticationDisabled and security defaults, which also disable it)",
          alert=True, problem=Problem.LOGIN),
    _rule(_status("5.7.3"),
          Action.AUTH,
          "Exchange rejected the app's token for this mailbox: check that New-ServicePrincipal "
          f"was run for the app, that {_SP} has FullAccess on the mailbox "
          "(Add-MailboxPermission), that the app has SMTP.SendAsApp with admin consent, and "
          "that the tenant is the mailbox's tenant",
          alert=True, problem=Problem.LOGIN),
    _rule(_status("5.7.57"),
          Action.AUTH,
          "Exchange saw no successful login in the session (the relay skipped AUTH or "
          "something between the relay and Exchange interfered): this is a relay bug or a "
          "proxy problem, not a problem of the message",
          alert=True, problem=Problem.LOGIN),
    _rule(r"mailbox logon failure|^430 " + _status("4.2.0"),
          Action.AUTH,
          f"Exchange could not open the mailbox for {_SP}: check New-ServicePrincipal and "
          "Add-MailboxPermission -AccessRights FullAccess for the mailbox",
          alert=True, problem=Problem.LOGIN),
    _rule(_status("5.7.30"),
          Action.AUTH,
          "Exchange refused basic authentication: the upstream must use XOAUTH2",
          alert=True, problem=Problem.LOGIN),
    _rule(_status("5.5.127") + r"|token will expire soon",
          Action.AUTH,
          "the token is about to expire: fetch a fresh one and retry"),
    _rule(r"SendAsDenied(?:; (?P<mailbox>[^\s;]+) not allowed to send as (?P<address>[^\s;]+))?"
          r"|" + _status("5.7.60"),
          Action.BOUNCE,
          "the mailbox {mailbox} lacks Send As permission for {address}: run "
          "Add-RecipientPermission -Identity {address} -Trustee <mailbox or service principal> "
          "-AccessRights SendAs and list it in the profile's send_as, or use "
          "sender_policy: rewrite",
          alert=True, problem=Problem.SEND_AS,
          # The sender cannot fix this; it must know that resending will not help and
          # what to ask the relay's administrator for.
          hint="the mailbox {mailbox} lacks Send As permission for {address}; the relay's "
               "administrator must grant it (Add-RecipientPermission) or add the address "
               "to the profile's send_as"),
    # Graph (transport: graph): the app may not use the mailbox at all. Permanent, as
    # Graph means it, but the profile's setup is what is wrong: alert, and not ready.
    _rule(r"Microsoft Graph denied the app access|MailboxNotEnabledForRESTAPI",
          Action.BOUNCE,
          "Microsoft Graph refuses the app for this mailbox: the reply names the fix (the "
          "app's RBAC for Applications scope or Mail.Send permission, or a mailbox that is "
          "not in Exchange Online)",
          alert=True, problem=Problem.LOGIN),
    # Any other 530/534/535 is a login problem too, never the message's fault.
    _rule(r"^53[045] ",
          Action.AUTH,
          "Exchange rejected the relay's login: see README 'Troubleshooting'; "
          "`smtp-oauth-relay token` shows the token's claims",
          alert=True, problem=Problem.LOGIN),
    _rule(r"^5\d\d (?:" + _status("5.7.705") + "|" + _status("5.7.708") + ")",
          Action.BOUNCE,
          "Microsoft is blocking outbound mail from the tenant or its IP address (reputation, "
          "5.7.705 tenant over threshold / 5.7.708 IP not accepted): check the Restricted "
          "entities page in the Defender portal or open a support case",
          alert=True),
    _rule(r"^4\d\d 4\.7\.[56]\d\d(?!\d)",
          Action.RETRY,
          "Exchange temporarily restricts mail from the tenant or its IP address; retrying"),
    _rule(r"^421 ",
          Action.RETRY,
          "Exchange closed the session (busy, or shutting down the connection); retrying"),
    _rule(r"^5\d\d (?:" + _status("5.1.1") + "|" + _status("5.1.10") + ")",
          Action.BOUNCE,
          "the recipient address does not exist"),
    _rule(r"^552 |^5\d\d (?:" + _status("5.3.4") + "|" + _status("5.2.3") + ")",
          Action.BOUNCE,
          "the message is larger than the mailbox may send (Set-Mailbox -MaxSendSize) or "
          "the upstream accepts"),
)

_BY_CLASS = {
    2: Verdict(Action.DELIVERED, "accepted by the upstream", alert=False),
    4: Verdict(Action.RETRY, "temporary failure; retrying", alert=False),
    5: Verdict(Action.BOUNCE, "permanent failure", alert=False),
}


class _Fill(dict[str, str]):
    """Template values: a group the reply did not contain reads as something generic."""

    def __missing__(self, key: str) -> str:
        return {"address": "the sender address", "mailbox": "used"}.get(key, f"<{key}>")


def classify(reply: Reply) -> Verdict:
    """The queue's decision for ``reply``; replies of other classes than 2/4/5 are retried.

    Cached: every attempt asks several times (the pool, the deliverer, the settlement),
    and an upstream answers with few distinct replies; the table's regexes run once each.
    """
    if reply.code // 100 == 2:
        # Accepted is accepted, whatever the text says; and each 250 of Exchange's names
        # its own message, so the cache below never holds them: no table run for them.
        return _BY_CLASS[2]
    return _classify(reply)


@functools.lru_cache(maxsize=512)
def _classify(reply: Reply) -> Verdict:
    line = f"{reply.code} {one_line(reply.text)}"
    for rule in TABLE:
        m = rule.pattern.search(line)
        if m is not None:
            groups = _Fill({k: v for k, v in m.groupdict().items() if v})
            return Verdict(rule.action, rule.explanation.format_map(groups), rule.alert,
                           rule.hint.format_map(groups), rule.problem)
    return _BY_CLASS.get(reply.code // 100, _BY_CLASS[4])
