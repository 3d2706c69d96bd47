"""Which application sent a message the relay sent as the mailbox, as an operator finds out.

Cron jobs and scripts send as ``root@host`` or ``backup@db1.local``, often without a From
header; under ``sender_policy: rewrite`` the relay sends them as the mailbox. A relay
process is given such messages while Exchange is down, and the original envelope sender
and From are looked for where an operator looks: the log line of each message, ``queue
show`` (text and JSON), and, once Exchange is back, the message that arrives (the trace
fields and Reply-To). The rules themselves are tested in tests/test_policy.py.
"""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.sandbox.exchange import ReceivedMessage
from tests.relayproc import QUEUED_RE, Harness, harness, wait_for

BACKUP = b"Subject: nightly backup\r\nTo: ops@example.com\r\n\r\nall done\r\n"
INVOICE = (b"From: Billing <billing@erp.example.com>\r\nTo: customer@example.com\r\n"
           b"Subject: invoice\r\n\r\nattached\r\n")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    with harness(tmp_path, {"delivery": {"retry_initial": "1h", "retry_max": "1h"}}) as h:
        yield h


def send(client: smtplib.SMTP, sender: str, data: bytes) -> str:
    client.ehlo_or_helo_if_needed()
    assert client.mail(sender)[0] == 250
    assert client.rcpt("ops@example.com")[0] == 250
    code, text = client.data(data)
    assert code == 250, text
    m = QUEUED_RE.search(text.decode())
    assert m
    return m.group(1)


def arrived(h: Harness, subject: str) -> ReceivedMessage:
    [msg] = [m for m in h.exchange.messages if f"Subject: {subject}".encode() in m.data]
    return msg


def trace_and_sender_fields(data: bytes) -> list[bytes]:
    """The fields after the relay's Received field, up to the first of the message's own
    that the rewrite did not write."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields = re.split(rb"\r\n(?![ \t])", head)
    assert fields[0].startswith(b"Received: from ")
    return [f for f in fields[1:] if f.startswith((b"X-Original-", b"Reply-To:", b"From:"))]


def test_the_sending_application_is_named_in_the_log_the_queue_and_the_message(
        h: Harness) -> None:
    h.upstream_down()
    proc = h.start()
    with proc.connect() as client:
        backup = send(client, "backup@db1.local", BACKUP)
        invoice = send(client, "erp@erp.example.com", INVOICE)

    # The log line of each message names what the mailbox replaced.
    assert re.search(
        rf"\[{backup}\] message: client=127\.0\.0\.1 user=- profile=system "
        r"from=<relay@contoso\.com> original_sender=<backup@db1\.local> rcpts=1 size=\d+ "
        rf"reply=250 2\.0\.0 Ok: queued as {backup} \(", proc.log), proc.log
    assert re.search(
        rf"\[{invoice}\] message: client=127\.0\.0\.1 user=- profile=system "
        r"from=<relay@contoso\.com> original_sender=<erp@erp\.example\.com> "
        r"original_from=<billing@erp\.example\.com> rcpts=1 ", proc.log), proc.log

    # queue show, JSON and text, while the message waits for Exchange.
    wait_for(lambda: all(r["state"] == "deferred" for r in h.queue_list()) and
             len(h.queue_list()) == 2, 15, "both messages deferred")
    res = h.queue("show", backup, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["from"], info["original_sender"], info["original_from"]) == (
        "relay@contoso.com", "backup@db1.local", None)
    assert info["headers"].startswith("Received: from ")
    assert "\nX-Original-Sender: backup@db1.local\n" in info["headers"].replace("\r", "")
    res = h.queue("show", invoice)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:6] == [f"{name + ':':<17} {value}" for name, value in (
        ("id", invoice), ("state", "deferred"), ("profile", "system"),
        ("from", "relay@contoso.com"), ("original sender", "erp@erp.example.com"),
        ("original from", "billing@erp.example.com"))]

    # Exchange gets them with the trace fields; replies to the invoice reach Billing.
    h.upstream_up()
    mark = proc.mark()
    proc.hup()
    proc.wait_for_log("configuration reloaded", 10, since=mark)
    proc.usr1()                                         # retry now, as `queue flush` does
    wait_for(lambda: len(h.exchange.messages) == 2, 15, "both messages delivered")
    assert trace_and_sender_fields(arrived(h, "nightly backup").data) == [
        b"X-Original-Sender: backup@db1.local", b"From: relay@contoso.com"]
    assert trace_and_sender_fields(arrived(h, "invoice").data) == [
        b"X-Original-Sender: erp@erp.example.com",
        b"X-Original-From: billing@erp.example.com",
        b"From: Billing <relay@contoso.com>", b"Reply-To: billing@erp.example.com"]
    assert {m.mail_from for m in h.exchange.messages} == {"relay@contoso.com"}
