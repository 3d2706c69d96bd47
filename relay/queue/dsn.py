"""Delivery status notifications (RFC 3464) for mail the relay gave up on or is still retrying.

- :func:`build_dsn`: the report's bytes, about failed (and delayed) recipients, with the
  original's header section;
- :func:`is_auto_reply`: whether a message is itself a report or an auto-reply, which must
  never be reported on (a mail loop).

Once the relay has answered 250 the client has forgotten the message, so a failure that
comes later can only reach the sender as a DSN (when to send one, and to whom, is
relay.queue.bounce's). It is built with the ``email`` package so that folding, boundaries
and encodings are right, and it is kept 7-bit clean (non-ASCII is quoted-printable or
escaped) so any upstream accepts it whatever the original contained.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import textwrap
import time
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from typing import Literal, cast

from relay.core.reply import Reply
from relay.deliver.classify import classify

# SMTP's line ending, never 8-bit content. Bodies are wrapped at 78 when they are encoded;
# the report is generated with the 998 limit so that a long token in a DSN field is left
# as it is instead of being turned into RFC 2047 encoded-words, which DSN readers do not
# decode (fields are cut to stay below it).
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_OUTPUT = _POLICY.clone(max_line_length=998)
_FIELD_MAX = 900
# The first word of an Auto-Submitted value; a comment or parameters may follow (RFC 3834).
_KEYWORD = re.compile(r"\s*([\w-]*)")


def _ascii(value: str) -> str:
    """DSN fields are ASCII (RFC 3464 s2.1.2); keep what cannot be said in ASCII visible."""
    text = " ".join(value.encode("ascii", "backslashreplace").decode("ascii").split())
    return text[:_FIELD_MAX]


def _date(ts: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(ts, UTC))


def _fields(items: list[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in items:
        block[name] = _ascii(value)
    return block


# The DSN Action values the relay reports (RFC 3464 2.3.3); it never reports "delivered",
# "relayed" or "expanded": success is silent.
DsnAction = Literal["failed", "delayed"]


def _status(reply: Reply, action: DsnAction) -> str:
    if reply.enhanced:
        return reply.enhanced
    klass = reply.code // 100
    if klass not in (4, 5):
        klass = 5 if action == "failed" else 4
    return f"{klass}.0.0"


def _header_block(original: bytes) -> str:
    """The original header section only: the body is the sender's, not ours to send back."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        head, found, _ = original.partition(sep)
        if found:
            original = head
            break
    return original.decode("utf-8", "replace")


def build_dsn(*, reporting_mta: str, sender_mailbox: str, to: str, original_headers: bytes,
              arrival: float, failed: dict[str, Reply], delayed: dict[str, Reply] | None = None,
              remote_mta: str | None, original_envelope_id: str, reason: str | None = None,
              queue_id: str | None = None, now: float | None = None) -> bytes:
    """A ``multipart/report`` DSN to ``to`` about ``failed`` and ``delayed`` recipients.

    ``original_envelope_id`` is the client's ENVID (xtext, as given in MAIL FROM) and is
    left out when empty; ``queue_id`` is the relay's own id, for the operator's grep.
    ``now`` dates the report (the queue's clock; the time of the call if not given).
    """
    delayed = delayed or {}
    outcomes: list[tuple[str, Reply, DsnAction]] = [
        (rcpt, reply, "failed") for rcpt, reply in failed.items()]
    outcomes += [(rcpt, reply, "delayed") for rcpt, reply in delayed.items()]
    where = f" by {remote_mta}" if remote_mta else ""

    text = [f"This is the mail relay at {reporting_mta}.", ""]
    if failed:
        text += ["Your message could not be delivered to one or more recipients.",
                 "It has been returned to you (headers only, below)."]
    if delayed:
        text += ["Delivery to some recipients is delayed; the relay keeps trying and will",
                 "tell you if it gives up. You do not need to send the message again."]
    if reason:
        text += ["", f"Reason: {reason}"]
    for rcpt, reply, action in outcomes:
        text += ["", f"<{rcpt}>: {action}", f"    The message was answered{where} with:",
                 f"    {reply}"]
        # What the reply means, when the relay knows (e.g. a missing Send As permission):
        # the upstream's words alone rarely tell the sender that resending cannot help.
        hint = classify(reply).hint
        if hint:
            text += ["", *textwrap.wrap(f"What this means: {hint}.", width=74,
                                        initial_indent="    ", subsequent_indent="    ")]

    per_message = [("Reporting-MTA", f"dns; {reporting_mta}"),
                   ("Arrival-Date", _date(arrival))]
    if original_envelope_id:
        per_message.insert(0, ("Original-Envelope-Id", original_envelope_id))
    if queue_id:
        per_message.append(("X-Relay-Queue-Id", queue_id))
    blocks = [_fields(per_message)]
    for rcpt, reply, action in outcomes:
        fields = [("Final-Recipient", f"rfc822; {rcpt}"), ("Action", action),
                  ("Status", _status(reply, action))]
        if remote_mta:
            fields.append(("Remote-MTA", f"dns; {remote_mta}"))
        fields.append(("Diagnostic-Code", f"smtp; {reply}"))
        blocks.append(_fields(fields))

    report = EmailMessage(policy=_POLICY)
    report["From"] = Address("Mail Delivery System", addr_spec=sender_mailbox)
    report["To"] = to
    report["Subject"] = ("Undelivered Mail Returned to Sender" if failed
                         else "Delayed Mail (still being retried)")
    report["Date"] = _date(time.time() if now is None else now)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report.add_header("Content-Type", "multipart/report", report_type="delivery-status")

    human = MIMEPart(policy=_POLICY)
    human.set_content("\n".join(text) + "\n")
    status = MIMEPart(policy=_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(list[Message | str](blocks))
    headers = MIMEPart(policy=_POLICY)
    headers.set_content(_header_block(original_headers), subtype="rfc822-headers")
    for part in (human, status, headers):
        report.attach(cast(EmailMessage, part))   # a part, not a whole message: no MIME-Version
    return report.as_bytes(policy=_OUTPUT)


def is_auto_reply(headers: bytes) -> bool:
    """True for bounces and auto-replies, which must never be answered with a bounce (loops)."""
    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(headers)
    found = _KEYWORD.match(str(parsed.get("Auto-Submitted", "")))
    keyword = found.group(1).lower() if found else ""
    return keyword not in ("", "no") or parsed.get_content_type() == "multipart/report"
