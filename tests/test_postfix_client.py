"""Postfix, a real MTA nobody here wrote, as a client of the relay.

The usual way a machine's own mail reaches the relay: programs call Postfix's sendmail, and
Postfix hands everything to its ``relayhost``, the relay, which sends it on to (the fake)
Exchange Online. Postfix runs privately (tests/realservers.py), with no listener of its
own; it logs only to its maillog file, which the tests read for its side of the story.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from relay.sandbox.service import Sandbox
from tests.conftest import PASSWORDS, RelayFactory, address, wait_until
from tests.realservers import Postfix, postfix_missing

_MISSING = postfix_missing()
pytestmark = [pytest.mark.realserver,
              pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

MESSAGE = ("From: Cron Daemon <app@contoso.com>\n"      # a program writes plain LF lines
           "To: ops@example.com\n"
           "Subject: Sicherung für März\n"                 # raw UTF-8, as programs do
           "Content-Type: text/plain; charset=utf-8\n"
           "Content-Transfer-Encoding: 8bit\n"
           "\n"
           "Sicherung beendet – 0 Fehler\n"
           ".\n"
           "exit status 0\n").encode()
BODY = "Sicherung beendet – 0 Fehler\r\n.\r\nexit status 0\r\n".encode()
RCPTS = ["ops@example.com", "audit@example.org"]            # the second only in the envelope

# Postfix refuses plaintext SASL mechanisms without TLS by default (noplaintext); the relay
# listens on loopback without TLS here, so the test allows them.
SASL = """\
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{user}:{password}
smtp_sasl_security_options = noanonymous
smtp_sasl_mechanism_filter = plain
"""


@pytest.fixture
def postfix() -> Iterator[Callable[..., Postfix]]:
    """Start a private Postfix that relays to the given port; stopped at teardown."""
    started: list[Postfix] = []

    def start(relay_port: int, extra: str = "") -> Postfix:
        instance = Postfix(relay_port, extra=extra)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.stop()


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


async def test_postfix_relays_through_the_relay_without_auth(
        start_relay: RelayFactory, sandbox: Sandbox,
        postfix: Callable[..., Postfix]) -> None:
    relay = await start_relay()
    mta = await asyncio.to_thread(postfix, address(relay)[1])

    await asyncio.to_thread(mta.sendmail, "app@contoso.com", RCPTS, MESSAGE)

    await wait_until(lambda: sandbox.exchange.messages, within=20)
    [got] = sandbox.exchange.messages
    # 127.0.0.1 is one of the relay's relay_networks: no AUTH, the system mailbox.
    assert got.mailbox == "relay@contoso.com"
    assert got.mail_from == "relay@contoso.com"        # rewritten: app@ may not send as it
    assert got.rcpt_tos == RCPTS
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Received: from postfix.test")   # the relay's, naming Postfix
    assert b"by postfix.test (Postfix" in head                # and Postfix's own
    assert b"\r\nReply-To: app@contoso.com" in head      # the original sender
    assert "\r\nSubject: Sicherung für März\r\n".encode() in head
    assert body_of(got.data) == BODY
    # Postfix saw 8-bit text and UTF-8 headers and asked for 8BITMIME and SMTPUTF8; the
    # relay passed both on.
    assert "BODY=8BITMIME" in got.mail_options and "SMTPUTF8" in got.mail_options
    # Postfix was told the relay's verdict: delivered (not merely queued), both recipients.
    await wait_until(lambda: mta.maillog().count("status=sent (250 2.0.0 Ok: delivered") == 2,
                     within=10)
    assert "relay=127.0.0.1[127.0.0.1]:" in mta.maillog()


async def test_postfix_logs_in_with_auth_plain_and_gets_the_users_mailbox(
        start_relay: RelayFactory, sandbox: Sandbox,
        postfix: Callable[..., Postfix]) -> None:
    relay = await start_relay()
    mta = await asyncio.to_thread(
        postfix, address(relay)[1], SASL.format(user="alice", password=PASSWORDS["alice"]))

    await asyncio.to_thread(mta.sendmail, "app@contoso.com", RCPTS, MESSAGE)

    await wait_until(lambda: sandbox.exchange.messages, within=20)
    [got] = sandbox.exchange.messages
    # Only an authenticated alice gets alice's profile; from 127.0.0.1 without AUTH the
    # message would have gone out as the system mailbox.
    assert got.mailbox == "alice@contoso.com"
    assert got.rcpt_tos == RCPTS
    assert body_of(got.data) == BODY
    await wait_until(lambda: mta.maillog().count("status=sent (250 2.0.0 Ok: delivered") == 2,
                     within=10)
    assert "SASL authentication failed" not in mta.maillog()


async def test_postfix_keeps_the_mail_when_the_relay_refuses_its_login(
        start_relay: RelayFactory, sandbox: Sandbox,
        postfix: Callable[..., Postfix]) -> None:
    relay = await start_relay()
    mta = await asyncio.to_thread(
        postfix, address(relay)[1], SASL.format(user="alice", password="not-her-password"))

    await asyncio.to_thread(mta.sendmail, "app@contoso.com", RCPTS, MESSAGE)

    # Postfix does not fall back to sending without AUTH: it defers, with the relay's 535.
    await wait_until(lambda: "status=deferred" in mta.maillog(), within=20)
    log = mta.maillog()
    assert "SASL authentication failed" in log and "535 5.7.8" in log, log
    assert "status=sent" not in log
    assert sandbox.exchange.messages == []
