"""The reply classifier against the replies Exchange Online actually gives."""

from __future__ import annotations

import pytest

from relay.core.reply import Reply
from relay.deliver.classify import TABLE, Action, Verdict, classify

A = Action
# (code, text, action, alert, words the explanation must contain)
CASES: list[tuple[int, str, Action, bool, tuple[str, ...]]] = [
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded "
          "[Hostname=AM0PR01MB1234.eurprd01.prod.exchangelabs.com]", A.THROTTLE, False, ()),
    (432, "4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending "
          "for more information.", A.THROTTLE, False, ("concurrent",)),
    (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
          "process message due to a permanent exception with message Cannot submit message.",
     A.PAUSE_MAILBOX, True, ("24 hours",)),
    (550, "5.1.90 Your message can't be sent because you've reached your daily limit for "
          "message recipients", A.PAUSE_MAILBOX, True, ()),
    (554, "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException."
          "MapiExceptionQuotaExceeded; Failed to process message due to a permanent exception",
     A.RETRY, True, ("Sent Items",)),
    (535, "5.7.3 Authentication unsuccessful [SN4PR0501CA0054.namprd05.prod.outlook.com]",
     A.AUTH, True, ("New-ServicePrincipal", "Add-MailboxPermission", "tenant")),
    (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
          "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
     A.AUTH, True, ("Set-CASMailbox", "-SmtpClientAuthenticationDisabled $false")),
    (535, "5.7.139 Authentication unsuccessful, the user credentials were incorrect.",
     A.AUTH, True, ("Set-CASMailbox",)),
    (530, "5.7.57 Client not authenticated to send mail. [MW4PR04CA0001.namprd04.prod.outlook.com]",
     A.AUTH, True, ("AUTH",)),
    (430, "4.2.0 STOREDRV; mailbox logon failure; Failed to process message due to a transient "
          "exception with message [BeginDiagnosticData]", A.AUTH, True, ("FullAccess",)),
    (550, "5.7.30 Basic authentication is not supported for Client Submission.",
     A.AUTH, True, ("XOAUTH2",)),
    (501, "5.5.127 Token will expire soon", A.AUTH, False, ("fresh",)),
    (554, "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
          "Failed to process message due to a permanent exception with message Cannot submit "
          "message.", A.BOUNCE, True, ("Send As", "Add-RecipientPermission", "the sender address")),
    (554, "5.2.252 SendAsDenied; app@contoso.com not allowed to send as printer@contoso.com; "
          "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
     A.BOUNCE, True, ("app@contoso.com lacks Send As permission for printer@contoso.com",
                      "Add-RecipientPermission -Identity printer@contoso.com",
                      "sender_policy: rewrite")),
    (550, "5.7.60 SMTP; Client does not have permissions to send as this sender",
     A.BOUNCE, True, ("Send As",)),
    (550, "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
     A.BOUNCE, True, ("IP",)),
    (550, "5.7.705 Access denied, tenant has exceeded threshold", A.BOUNCE, True, ("tenant",)),
    (451, "4.7.500 Server busy. Please try again later from [203.0.113.7]. (S77719)",
     A.RETRY, False, ("temporarily",)),
    (450, "4.7.650 The mail server [203.0.113.7] has been temporarily rate limited",
     A.RETRY, False, ()),
    (421, "4.3.2 Service not available, closing transmission channel", A.RETRY, False, ()),
    (550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found", A.BOUNCE, False, ("does not exist",)),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     A.BOUNCE, False, ("does not exist",)),
    (552, "5.3.4 Message size exceeds fixed maximum message size", A.BOUNCE, False,
     ("MaxSendSize",)),
    (552, "Message size exceeds fixed maximum message size", A.BOUNCE, False, ("MaxSendSize",)),
    # Azure Communication Services refuses the client secret as a password.
    (535, "5.7.3 Authentication unsuccessful (Azure Communication Services refused the "
          "login as acs.app.tenant)", A.AUTH, True, ("ACS SMTP Username",)),
    # The tenant external recipient rate limit: never a bounce.
    (550, "5.7.233 Recipient address rejected: Tenant has exceeded its external recipient "
          "rate limit", A.TENANT_LIMIT, True, ("Azure Communication Services",)),
    # The per-mailbox daily recipient limit comes as 554 5.2.0 with this exception.
    (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
          "process message due to a permanent exception", A.PAUSE_MAILBOX, True, ()),
    # Microsoft Graph (transport: graph), as relay.deliver.graph words its answers.
    (550, "5.7.1 Microsoft Graph denied the app access to m@contoso.com (Graph: 403 "
          "ErrorAccessDenied: Access is denied.)", A.BOUNCE, True, ("RBAC",)),
    (550, "5.7.1 The mailbox m@contoso.com cannot send through Microsoft Graph (Graph: 404 "
          "MailboxNotEnabledForRESTAPI: ...)", A.BOUNCE, True, ("Exchange Online",)),
    # Unknown logins: still never a bounce.
    (535, "5.7.8 Authentication credentials invalid", A.AUTH, True, ()),
    (534, "5.7.9 Authentication mechanism is too weak", A.AUTH, True, ()),
    # The delivery step wraps a twice-rejected login in its own 451.
    (451, "4.7.0 Upstream refused the relay's login for app@contoso.com: 535 5.7.3 "
          "Authentication unsuccessful; message not sent, try again later",
     A.AUTH, True, ("New-ServicePrincipal",)),
    # Not in the table: the SMTP class decides.
    (250, "2.0.0 OK <abc@contoso.com> [Hostname=AM0PR01MB1234]", A.DELIVERED, False, ()),
    (451, "4.4.0 Message failed to be made redundant", A.RETRY, False, ()),
    (550, "5.6.0 Corrupt message content", A.BOUNCE, False, ()),
    (0, "connection lost", A.RETRY, False, ()),
]


@pytest.mark.parametrize(("code", "text", "action", "alert", "words"), CASES,
                         ids=[f"{c[0]}-{c[1][:24]}" for c in CASES])
def test_reply_is_classified(code: int, text: str, action: Action, alert: bool,
                             words: tuple[str, ...]) -> None:
    verdict = classify(Reply(code, text))
    assert isinstance(verdict, Verdict)
    assert (verdict.action, verdict.alert) == (action, alert)
    for word in words:
        assert word in verdict.explanation
    assert "{" not in verdict.explanation


def test_every_table_row_is_exercised_by_a_real_reply() -> None:
    """A row no case reaches is either dead or shadowed by an earlier row."""
    hit = set()
    for code, text, *_ in CASES:
        line = f"{code} {text}"
        hit.add(next((i for i, r in enumerate(TABLE) if r.pattern.search(line)), None))
    assert set(range(len(TABLE))) <= hit


@pytest.mark.parametrize("code", [530, 534, 535])
@pytest.mark.parametrize("text", ["5.7.3 Authentication unsuccessful", "5.7.139 x",
                                  "5.0.0 whatever", "Authentication failed", ""])
def test_a_rejected_login_never_bounces(code: int, text: str) -> None:
    assert classify(Reply(code, text)).action is Action.AUTH


def test_enhanced_codes_do_not_match_longer_codes() -> None:
    # 5.7.30 must not be read as 5.7.3, nor 5.1.100 as 5.1.10.
    assert "New-ServicePrincipal" not in classify(Reply(550, "5.7.30 Basic auth")).explanation
    assert classify(Reply(550, "5.1.100 something else")).explanation == "permanent failure"


def test_multiline_replies_are_matched_as_one_line() -> None:
    reply = Reply(432, "4.3.2 STOREDRV.ClientSubmit;\nsender thread\r\n limit exceeded")
    assert classify(reply).action is Action.THROTTLE


def test_submission_quota_wins_over_the_sent_items_quota() -> None:
    both = Reply(554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    assert classify(both).action is Action.PAUSE_MAILBOX


@pytest.mark.parametrize(("text", "words"), [
    ("5.2.252 SendAsDenied; app@contoso.com not allowed to send as printer@contoso.com; "
     "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
     ("app@contoso.com lacks Send As permission for printer@contoso.com",)),
    ("5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
     ("lacks Send As permission for the sender address",)),
    ("5.7.60 SMTP; Client does not have permissions to send as this sender", ()),
])
def test_send_as_denied_has_a_hint_for_the_sender(text: str, words: tuple[str, ...]) -> None:
    hint = classify(Reply(554, text)).hint
    for word in (*words, "Add-RecipientPermission", "send_as", "administrator"):
        assert word in hint
    # One line, and nothing of the relay's own set-up (those details are for the log).
    assert "\n" not in hint and "{" not in hint
    assert "Trustee" not in hint and "service principal" not in hint


def test_only_replies_the_relay_can_explain_to_a_sender_have_a_hint() -> None:
    with_hint = {text for code, text, *_ in CASES if classify(Reply(code, text)).hint}
    assert with_hint and all("SendAs" in t or "5.7.60" in t for t in with_hint)
    # A login problem is the operator's, never the sender's, business.
    assert classify(Reply(535, "5.7.3 Authentication unsuccessful")).hint == ""
