"""Sender policies keep / rewrite / reject, and byte-identity of everything they do not touch."""

from __future__ import annotations

import email
import email.policy
import random

import pytest

from relay.accept.headers import RawMessage
from relay.accept.policy import (
    PolicyRejected,
    PolicyResult,
    apply_sender_policy,
    check_envelope_sender,
    is_permitted,
)
from relay.config import Profile, parse_config

MAILBOX = "relay@contoso.com"
_CONFIG = parse_config({
    "credentials": {"main": {"tenant_id": "contoso.com", "client_id": "c",
                             "client_secret": {"value": "x"}}},
    "profiles": {
        name: {"mailbox": MAILBOX, "credential": "main", "sender_policy": name,
               "send_as": ["*@alerts.contoso.com", "noreply@contoso.com"]}
        for name in ("keep", "rewrite", "reject")},
}, check_secrets=False, check_files=False)
PROFILES: dict[str, Profile] = dict(_CONFIG.profiles)

BODY = ("Grüße \u2013 €100 \u2014 日本語, an 8-bit body\r\n".encode()
        + b"<p>" + b"x" * 5000 + b"</p>\r\n"
        + b"From: looks-like-a-header@example.com\r\n.\r\n")
OTHERS = (b"Received: from app ([10.0.0.1])\r\n\tby mta; Sun, 1 Jan 2026 00:00:00 +0000\r\n"
          b"To: \"Customer, Ltd\" <customer@example.com>\r\n"
          b"Subject: =?utf-8?q?Rechnung_f=C3=BCr_M=C3=A4rz?=\r\n"
          b"Message-ID: <abc@app.example.com>\r\n"
          b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=x;\r\n"
          b"\th=from:to:subject; bh=AAAA; b=BBBB\r\n")


def message(from_field: bytes | None, extra: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    head = (from_field + b"\r\n" if from_field is not None else b"") + OTHERS + extra
    data = head + b"\r\n" + BODY
    return data.replace(b"\r\n", eol)


def run(policy: str, mail_from: str, data: bytes) -> PolicyResult:
    return apply_sender_policy(policy, PROFILES[policy], mail_from, data)


TRACE = ("X-Original-Sender", "X-Original-From")


def without(data: bytes, *names: str) -> bytes:
    """The message with the named fields and the rewrite's trace fields (tested on their
    own) taken out, so the rest can be compared byte-wise."""
    msg = RawMessage(data)
    msg.remove(*names, *TRACE)
    return msg.to_bytes()


def header(data: bytes, name: str) -> list[tuple[str, str]]:
    """Addresses of a field as an independent reader (the email package) sees them."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [(a.display_name, a.addr_spec) for h in parsed.get_all(name) or [] for a in h.addresses]


# --- permitted ---------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "expected"), [
    (MAILBOX, True), ("Relay@Contoso.COM", True), (f"<{MAILBOX}>", True),
    ("cron@alerts.contoso.com", True), ("CRON@ALERTS.contoso.com", True),
    ("noreply@contoso.com", True), ("other@contoso.com", False),
    ("x@evil.alerts.contoso.com", False), ("", False)])
def test_is_permitted(address: str, expected: bool) -> None:
    assert is_permitted(PROFILES["rewrite"], address) is expected


# --- MAIL FROM ---------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "mail_from", "refused"), [
    ("reject", MAILBOX, False), ("reject", "cron@alerts.contoso.com", False),
    ("reject", "billing@contoso.com", True), ("reject", "", True),
    ("rewrite", "billing@contoso.com", False), ("rewrite", "", False),
    ("keep", "billing@contoso.com", False), ("keep", "", False)])
def test_check_envelope_sender(policy: str, mail_from: str, refused: bool) -> None:
    if not refused:
        check_envelope_sender(policy, PROFILES[policy], mail_from)
        return
    with pytest.raises(PolicyRejected) as err:
        check_envelope_sender(policy, PROFILES[policy], mail_from)
    assert err.value.reply.code == 550
    assert err.value.reply.text.startswith("5.7.1 ")
    assert MAILBOX in err.value.reply.text and "profile reject" in err.value.reply.text


def test_reject_reply_names_sender_mailbox_and_fix() -> None:
    with pytest.raises(PolicyRejected) as err:
        check_envelope_sender("reject", PROFILES["reject"], "billing@contoso.com")
    assert err.value.reply.text == (
        "5.7.1 Sender billing@contoso.com is not permitted for mailbox relay@contoso.com "
        "(profile reject); add it to profiles.reject.send_as or use sender_policy: rewrite")


# --- keep --------------------------------------------------------------------------------

@pytest.mark.parametrize("from_field", [
    b"From: Billing <billing@contoso.com>", b"From: x@", None, b"From: a@b.c, d@e.f"])
def test_keep_changes_nothing(from_field: bytes | None) -> None:
    data = message(from_field)
    result = run("keep", "billing@contoso.com", data)
    assert result == PolicyResult("billing@contoso.com", data, rewritten=False)
    assert result.data is data


def test_keep_null_sender_goes_as_mailbox() -> None:
    data = message(b"From: MAILER-DAEMON@app.example.com")
    result = run("keep", "", data)
    assert result.mail_from == MAILBOX and result.data is data and result.rewritten


# --- rewrite -----------------------------------------------------------------------------

@pytest.mark.parametrize(("mail_from", "from_field"), [
    (MAILBOX, b"From: Relay <relay@contoso.com>"),
    ("cron@alerts.contoso.com", b"From: Cron <cron@alerts.contoso.com>"),
    ("noreply@contoso.com", b"From: \"No Reply @ Contoso\" <NoReply@Contoso.com>"),
    ("noreply@contoso.com", b"From: noreply@contoso.com, relay@contoso.com\r\nSender: "
                            b"relay@contoso.com"),
])
def test_rewrite_leaves_permitted_senders_alone(mail_from: str, from_field: bytes) -> None:
    data = message(from_field)
    result = run("rewrite", mail_from, data)
    assert result == PolicyResult(mail_from, data, rewritten=False)


def test_rewrite_envelope_only() -> None:
    data = message(b"From: Relay <relay@contoso.com>")
    for sender, trace in (("bounce-123@app.example.com", b"bounce-123@app.example.com"),
                          ("", b"<>")):
        result = run("rewrite", sender, data)
        assert result.mail_from == MAILBOX
        assert result.data == b"X-Original-Sender: " + trace + b"\r\n" + data
        assert result.rewritten and result.original_from is None


@pytest.mark.parametrize(("from_field", "name", "reply_to"), [
    (b"From: Billing <billing@contoso.com>", "Billing", ["billing@contoso.com"]),
    (b"From: billing@contoso.com", "", ["billing@contoso.com"]),
    # folded
    (b"From: \"Scanner 3rd\r\n floor\"\r\n\t<scanner@printers.example.com>", "Scanner 3rd floor",
     ["scanner@printers.example.com"]),
    # "@" in the display name, quoted (valid) and unquoted (devices do it)
    (b"From: \"Sales @ HQ\" <sales@example.com>", "Sales @ HQ", ["sales@example.com"]),
    (b"From: Sales @ HQ <sales@example.com>", "Sales @ HQ", ["sales@example.com"]),
    # encoded-word and raw UTF-8 names, and a raw Windows-1252 one
    (b"From: =?utf-8?q?Zo=C3=AB_=C3=85ngstr=C3=B6m?= <zoe@example.com>", "Zoë Ångström",
     ["zoe@example.com"]),
    ("From: Zoë Ångström <zoe@example.com>".encode(), "Zoë Ångström", ["zoe@example.com"]),
    (b"From: Zo\xeb <zoe@example.com>", "Zoë", ["zoe@example.com"]),
    # several authors, one permitted: all go to Reply-To except the mailbox itself
    (b"From: Ann <ann@example.com>, Relay <relay@contoso.com>", "Ann", ["ann@example.com"]),
    (b"From: ann@example.com, Bob <bob@example.com>", "Bob",
     ["ann@example.com", "bob@example.com"]),
    # two From fields
    (b"From: ann@example.com\r\nFrom: Bob <bob@example.com>", "Bob",
     ["ann@example.com", "bob@example.com"]),
])
def test_rewrite_from(from_field: bytes, name: str, reply_to: list[str]) -> None:
    data = message(from_field)
    result = run("rewrite", "app@example.com", data)
    assert result.mail_from == MAILBOX and result.rewritten
    assert result.original_from is not None
    assert header(result.data, "From") == [(name, MAILBOX)]
    assert [a for _, a in header(result.data, "Reply-To")] == reply_to
    assert without(result.data, "From", "Reply-To") == without(data, "From")
    assert result.data.endswith(b"\r\n\r\n" + BODY)
    rendered = RawMessage(result.data).raw_fields("From")
    assert len(rendered) == 1 and rendered[0].isascii()
    assert all(len(line) <= 78 for line in rendered[0].split(b"\r\n"))


def test_rewrite_reports_original_from() -> None:
    result = run("rewrite", "billing@contoso.com",
                 message(b"From: Billing <billing@contoso.com>, x@example.com"))
    assert result.original_from == "billing@contoso.com, x@example.com"


def test_rewrite_keeps_existing_reply_to() -> None:
    reply_to = b"Reply-To: Helpdesk <helpdesk@example.com>\r\n"
    data = message(b"From: Billing <billing@contoso.com>", extra=reply_to)
    result = run("rewrite", "billing@contoso.com", data)
    assert header(result.data, "From") == [("Billing", MAILBOX)]
    assert RawMessage(result.data).raw_fields("Reply-To") == [reply_to]
    assert without(result.data, "From") == without(data, "From")


@pytest.mark.parametrize(("from_field", "original"), [
    (None, None), (b"From: x@", "x@"), (b"From: root (Cron Daemon)", "root (Cron Daemon)"),
    (b"From: undisclosed:;", "undisclosed:;"), (b"From:", None),
    (b"From: \"unterminated <a@example.com>", '"unterminated <a@example.com>'),
    (b"From: \xff\xfe\x00garbage", "\xff\xfe garbage")])
def test_rewrite_missing_or_unparsable_from(from_field: bytes | None,
                                            original: str | None) -> None:
    data = message(from_field)
    result = run("rewrite", "app@example.com", data)
    # What the From said is kept as text when it names no address that can be read.
    assert result.rewritten and result.original_from == original
    traced = email.message_from_bytes(result.data, policy=email.policy.default)
    assert traced["X-Original-From"] == original
    assert header(result.data, "From") == [("", MAILBOX)]
    assert b"\r\nReply-To:" not in result.data and not result.data.startswith(b"Reply-To")
    assert without(result.data, "From") == without(data, "From")


def test_rewrite_adds_from_when_missing() -> None:
    result = run("rewrite", "app@example.com", message(None))
    assert RawMessage(result.data).names()[-1] == "From"   # appended after the others
    assert b"\r\nFrom: relay@contoso.com\r\n\r\n" in result.data


def test_rewrite_names_what_it_replaced_in_trace_fields_at_the_top() -> None:
    data = message(b"From: Billing <billing@contoso.com>, Ann <ann@example.com>")
    result = run("rewrite", "cron@host.local", data)
    assert result.data.startswith(b"X-Original-Sender: cron@host.local\r\n"
                                  b"X-Original-From: billing@contoso.com, ann@example.com\r\n"
                                  b"From: Billing <relay@contoso.com>\r\n")
    assert [a for _, a in header(result.data, "Reply-To")] == [
        "billing@contoso.com", "ann@example.com"]


def test_rewrite_replaces_trace_fields_the_client_wrote() -> None:
    forged = b"X-Original-Sender: ceo@contoso.com\r\nX-Original-From: ceo@contoso.com\r\n"
    data = message(b"From: app@example.com", extra=forged)
    result = run("rewrite", "app@example.com", data)
    fields = RawMessage(result.data)
    assert fields.raw_fields("X-Original-Sender") == [b"X-Original-Sender: app@example.com\r\n"]
    assert fields.raw_fields("X-Original-From") == [b"X-Original-From: app@example.com\r\n"]
    # ... but only when the relay has something to say: a permitted sender keeps them.
    kept = message(b"From: relay@contoso.com", extra=forged)
    assert run("rewrite", MAILBOX, kept).data is kept


def test_rewrite_trace_fields_cannot_be_made_to_break_a_line() -> None:
    # An envelope sender may be an encoded word that decodes to CRLF and a field: it
    # goes into its trace field as the text it is.
    sender = "=?utf-8?q?x=0D=0ABcc=3A_victim=40evil.example?=@app.example.com"
    data = message(b"From: =?utf-8?q?y=0D=0ABcc=3A_victim=40evil.example?=")
    result = run("rewrite", sender, data)
    parsed = email.message_from_bytes(result.data, policy=email.policy.default)
    assert parsed["X-Original-Sender"] == sender
    assert "Bcc" not in parsed and b"\nBcc" not in result.data
    long = "x" * 3000 + "@app.example.com"
    result = run("rewrite", "app@example.com", message(f"From: {long}".encode()))
    assert result.original_from is not None and len(result.original_from) == 512


@pytest.mark.parametrize(("sender_field", "kept"), [
    (b"Sender: app@example.com\r\n", False),
    (b"Sender: x@\r\n", False),
    (b"Sender: Ops <ops@alerts.contoso.com>\r\n", True),
])
def test_rewrite_sender_header(sender_field: bytes, kept: bool) -> None:
    data = message(b"From: Billing <billing@contoso.com>", extra=sender_field)
    result = run("rewrite", "billing@contoso.com", data)
    assert (sender_field in result.data) is kept
    assert without(result.data, "From", "Reply-To", "Sender") == without(data, "From", "Sender")


def test_rewrite_writes_out_a_permitted_sender_only_the_fallback_could_read() -> None:
    # A strict reader takes "x@y" from the field as it came; the fallback's reading goes.
    data = message(b"From: relay@contoso.com", extra=b"Sender: x@y <relay@contoso.com>\r\n")
    result = run("rewrite", MAILBOX, data)
    assert RawMessage(result.data).raw_fields("Sender") == [
        b"Sender: \"x@y\" <relay@contoso.com>\r\n"]
    assert header(result.data, "Sender") == [("x@y", MAILBOX)]


def test_rewrite_replaces_removed_sender_when_from_has_several_authors() -> None:
    data = message(b"From: relay@contoso.com, noreply@contoso.com",
                   extra=b"Sender: app@example.com\r\n")
    result = run("rewrite", MAILBOX, data)
    assert header(result.data, "From") == [("", MAILBOX), ("", "noreply@contoso.com")]
    assert header(result.data, "Sender") == [("", MAILBOX)]
    assert result.original_from is None and result.rewritten


def test_rewrite_tidies_a_permitted_from_only_the_fallback_could_read() -> None:
    data = message(b"From: Alerts @ Contoso <cron@alerts.contoso.com>")
    result = run("rewrite", "cron@alerts.contoso.com", data)
    assert RawMessage(result.data).raw_fields("From") == [
        b"From: \"Alerts @ Contoso\" <cron@alerts.contoso.com>\r\n"]
    assert header(result.data, "Reply-To") == []
    assert without(result.data, "From") == without(data, "From")


def test_rewrite_tidies_a_permitted_from_in_the_obsolete_syntax() -> None:
    # "From :" is an mbox separator line to the email package, which skips it: upstream
    # there would be no From at all.
    data = message(b"From :relay@contoso.com")
    result = run("rewrite", MAILBOX, data)
    assert RawMessage(result.data).raw_fields("From") == [b"From: relay@contoso.com\r\n"]
    assert header(result.data, "From") == [("", MAILBOX)]


def test_rewrite_lf_only_message_stays_lf() -> None:
    data = message(b"From: Zo\xc3\xab \xc3\x85ngstr\xc3\xb6m <zoe@example.com>", eol=b"\n")
    assert b"\r" not in data
    result = run("rewrite", "zoe@example.com", data)
    assert b"\r" not in result.data
    assert header(result.data, "From") == [("Zoë Ångström", MAILBOX)]
    assert without(result.data, "From", "Reply-To") == without(data, "From")
    assert result.data.endswith(b"\n\n" + BODY.replace(b"\r\n", b"\n"))


# --- reject ------------------------------------------------------------------------------

@pytest.mark.parametrize(("mail_from", "from_field"), [
    (MAILBOX, b"From: Relay <relay@contoso.com>"),
    # the "@" in the display name must not be mistaken for the address (SendAsDenied)
    (MAILBOX, b"From: \"Sales @ HQ\" <relay@contoso.com>"),
    (MAILBOX, b"From: \"Sales @ HQ\r\n (main office)\" <relay@contoso.com>"),
    ("cron@alerts.contoso.com", b"From: =?utf-8?q?Z=C3=B6e?= <cron@alerts.contoso.com>"),
    ("cron@alerts.contoso.com", "From: Zöe <cron@alerts.contoso.com>".encode()),
    (MAILBOX, b"From: relay@contoso.com, noreply@contoso.com"),
])
def test_reject_accepts_permitted_senders(mail_from: str, from_field: bytes) -> None:
    data = message(from_field)
    result = run("reject", mail_from, data)
    assert result == PolicyResult(mail_from, data, rewritten=False)


@pytest.mark.parametrize(("mail_from", "from_field", "reason"), [
    ("billing@contoso.com", b"From: relay@contoso.com",
     "Sender billing@contoso.com is not permitted for mailbox relay@contoso.com (profile "
     "reject); add it to profiles.reject.send_as or use sender_policy: rewrite"),
    ("", b"From: relay@contoso.com", "null sender <> is not permitted"),
    (MAILBOX, b"From: Billing <billing@contoso.com>",
     "From address billing@contoso.com is not permitted for mailbox relay@contoso.com "
     "(profile reject); add it to profiles.reject.send_as or use sender_policy: rewrite"),
    (MAILBOX, b"From: relay@contoso.com, \"Sales @ HQ\" <sales@example.com>",
     "From address sales@example.com is not permitted"),
    (MAILBOX, b"From: relay@contoso.com\r\nFrom: other@example.com",
     "From address other@example.com is not permitted"),
    (MAILBOX, b"From: x@", "From header cannot be parsed"),
    (MAILBOX, b"From: root (Cron Daemon)", "From header"),
    (MAILBOX, None, "no From address"),
    (MAILBOX, b"From: undisclosed:;", "no From address"),
    # readable only by guessing: a strict reader takes ceo@contoso.com from it
    (MAILBOX, b"From: ceo@contoso.com <relay@contoso.com>", "From header is ambiguous"),
    (MAILBOX, b"From: relay@contoso.com\r\nSender: Smith, John <relay@contoso.com>",
     "Sender header is ambiguous"),
])
def test_reject_refuses(mail_from: str, from_field: bytes | None, reason: str) -> None:
    with pytest.raises(PolicyRejected) as err:
        run("reject", mail_from, message(from_field))
    reply = err.value.reply
    assert reply.code == 550 and reply.text.startswith("5.7.1 ")
    assert reason in reply.text
    assert "relay@contoso.com" in reply.text and "sender_policy: rewrite" in reply.text
    assert "\n" not in reply.text and "\r" not in reply.text


# --- robustness --------------------------------------------------------------------------

def test_no_unhandled_exception_on_random_headers() -> None:
    rng = random.Random(20261122)
    alphabet = b'<>@,;:"()\\ \t\r\n=?.abcXYZ\xc3\xa9\xff\x00[]'
    for _ in range(400):
        value = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        data = b"From: " + value + b"\r\nSubject: s\r\nSender: " + value[::-1] + b"\r\n\r\nbody"
        for policy in ("keep", "rewrite", "reject"):
            try:
                result = run(policy, "app@example.com", data)
            except PolicyRejected as exc:
                assert policy == "reject" and exc.reply.code == 550
                continue
            # (A random value's bare LF makes it the message's line end, which the
            # fields the policy adds follow; the relay itself only sees CRLF.)
            assert result.data.endswith(b"\n\r\nbody")
            if policy == "rewrite":
                got = email.message_from_bytes(result.data, policy=email.policy.default)
                assert [a.addr_spec for a in got["From"].addresses] == [MAILBOX]
