"""DSNs as a mail reader sees them: parsed back with the email package, field by field."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage, Message
from typing import Any

import pytest

from relay.core.reply import Reply
from relay.queue.dsn import build_dsn, is_auto_reply

ORIGINAL = (b"From: App <app@contoso.com>\r\nTo: bob@example.net\r\nSubject: Invoice 42\r\n"
            b"Message-ID: <orig-1@contoso.com>\r\n\r\nconfidential body text\r\n")
SEND_AS = Reply(554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as "
                     "app@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException")
ARRIVAL = 1_700_000_000.0


def dsn(**overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "reporting_mta": "relay.contoso.com", "sender_mailbox": "relay@contoso.com",
        "to": "app@contoso.com", "original_headers": ORIGINAL, "arrival": ARRIVAL,
        "failed": {"bob@example.net": SEND_AS}, "remote_mta": "smtp.office365.com",
        "original_envelope_id": "QQ314159", "reason": "gave up after 5 days",
        "queue_id": "A1B2C3D4E5F6"}
    kwargs.update(overrides)
    return build_dsn(**kwargs)


def parse(raw: bytes) -> tuple[EmailMessage, str, list[Message], EmailMessage]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.iter_parts()
    assert [p.get_content_type() for p in (human, status, headers)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return msg, human.get_content(), blocks, headers


def test_failed_recipient_report() -> None:
    raw = dsn()
    msg, text, blocks, headers = parse(raw)

    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["From"].addresses[0].addr_spec == "relay@contoso.com"
    assert msg["To"] == "app@contoso.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@relay.contoso.com>")
    assert msg["Date"].datetime is not None

    assert "gave up after 5 days" in text
    assert "bob@example.net" in text and "5.2.252 SendAsDenied" in text

    per_message, per_rcpt = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.contoso.com"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["X-Relay-Queue-Id"] == "A1B2C3D4E5F6"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.2.252"
    assert per_rcpt["Remote-MTA"] == "dns; smtp.office365.com"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {SEND_AS}"

    returned = headers.get_content()
    assert "Subject: Invoice 42" in returned and "Message-ID: <orig-1@contoso.com>" in returned
    assert "confidential body text" not in returned


def test_wire_format_is_crlf_and_7bit() -> None:
    raw = dsn(original_headers=b"Subject: Gr\xc3\xbc\xc3\x9fe \xff\xfe\r\n",
              failed={"j\u00fcrgen@example.net": Reply(550, "5.1.1 Empf\u00e4nger unbekannt")})
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert max(raw) < 0x80
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_non_ascii_survives_where_it_can_and_never_crashes() -> None:
    reply = Reply(550, "5.1.1 Empf\u00e4nger unbekannt")
    raw = dsn(original_headers=b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nX-Latin1: caf\xe9\r\n\r\nbody",
              failed={"bob@example.net": reply})
    _, text, blocks, headers = parse(raw)
    assert "Empf\u00e4nger unbekannt" in text
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\xe4nger unbekannt"
    returned = headers.get_content()
    assert "Subject: Gr\u00fc\u00dfe" in returned
    assert "X-Latin1: caf\ufffd" in returned


def test_delayed_only_report() -> None:
    raw = dsn(failed={}, delayed={"bob@example.net": Reply(451, "temporary local problem")},
              reason=None)
    msg, text, blocks, _ = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.0.0"
    assert "Reason" not in text and "keeps trying" in text


def test_failed_and_delayed_recipients_each_get_a_block() -> None:
    raw = dsn(failed={"a@example.net": SEND_AS},
              delayed={"b@example.net": Reply(432, "4.3.2 Concurrent connections limit "
                                                   "exceeded")})
    msg, _, blocks, _ = parse(raw)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    got = [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]]
    assert got == [("rfc822; a@example.net", "failed", "5.2.252"),
                   ("rfc822; b@example.net", "delayed", "4.3.2")]


@pytest.mark.parametrize(("reply", "bucket", "status"), [
    (Reply(554, "Transaction failed"), "failed", "5.0.0"),
    (Reply(451, "try later"), "failed", "4.0.0"),      # gave up on a transient reply
    (Reply(0, "connection lost"), "failed", "5.0.0"),
    (Reply(0, "connection lost"), "delayed", "4.0.0"),
])
def test_status_without_an_enhanced_code(reply: Reply, bucket: str, status: str) -> None:
    outcome = {"failed": {}, "delayed": {}}
    outcome[bucket] = {"bob@example.net": reply}
    _, _, blocks, _ = parse(dsn(**outcome))
    assert blocks[1]["Status"] == status


def test_optional_fields_are_left_out() -> None:
    _, _, blocks, _ = parse(dsn(remote_mta=None, original_envelope_id="", queue_id=None))
    assert "Original-Envelope-Id" not in blocks[0] and "X-Relay-Queue-Id" not in blocks[0]
    assert "Remote-MTA" not in blocks[1]


def test_message_ids_are_unique() -> None:
    first, second = (email.message_from_bytes(dsn())["Message-ID"] for _ in range(2))
    assert first != second


@pytest.mark.parametrize(("headers", "expected"), [
    (ORIGINAL, False),
    (b"Auto-Submitted: no\r\nSubject: x\r\n", False),
    (b"AUTO-SUBMITTED: No (sent by a person)\r\n", False),
    (b"Auto-Submitted: auto-generated\r\n", True),
    (b"Auto-Submitted: auto-replied; owner-email=\"a@b.c\"\r\n", True),
    (b"Content-Type: multipart/report; report-type=disposition-notification;\r\n"
     b" boundary=x\r\n", True),
    (b"Content-Type: Multipart/Report; boundary=x\r\n", True),
    (b"Subject: caf\xe9\r\nFrom: \xff\r\n\r\nAuto-Submitted: auto-replied\r\n", False),
    (b"", False),
])
def test_is_auto_reply(headers: bytes, expected: bool) -> None:
    assert is_auto_reply(headers) is expected


def test_a_dsn_is_recognised_as_an_auto_reply() -> None:
    assert is_auto_reply(dsn())


def test_send_as_denied_explains_the_missing_permission_in_the_human_part() -> None:
    _, text, blocks, _ = parse(dsn())
    flat = " ".join(text.split())
    assert "What this means: the mailbox relay@contoso.com lacks Send As permission for " \
           "app@contoso.com" in flat
    assert "Add-RecipientPermission" in flat and "send_as" in flat
    assert str(SEND_AS) in flat                        # the upstream's words stay too
    assert blocks[1]["Diagnostic-Code"] == f"smtp; {SEND_AS}"   # machine part unchanged
    explained = text[text.index("    What this means"):]   # wrapped for a mail reader
    assert max(len(line) for line in explained.splitlines()) <= 78


def test_a_reply_without_a_known_meaning_gets_no_explanation() -> None:
    _, text, _, _ = parse(dsn(failed={"bob@example.net": Reply(550, "5.1.1 User unknown")}))
    assert "What this means" not in text
