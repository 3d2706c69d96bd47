"""Legacy app -> relay -> fake Exchange, with tokens from the fake Entra, over real sockets."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time

import aiosmtplib
import pytest

from relay.app import Relay
from relay.sandbox.service import Sandbox
from relay.spool.records import Entry, State
from tests.conftest import PASSWORDS, RelayFactory, address, wait_until

MESSAGE = (
    b"From: Billing <billing@contoso.com>\r\n"
    b"To: customer@example.com\r\n"
    b"Subject: Invoice\r\n"
    b"\r\n"
    b"Please find the invoice.\r\n"
)


def smtplib_send(host: str, port: int, sender: str, rcpts: list[str], data: bytes,
                 login: tuple[str, str] | None = None) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("legacy-app.test")
        if login:
            client.login(*login)
        return client.sendmail(sender, rcpts, data)


async def send(relay: Relay, sender: str, rcpts: list[str], data: bytes = MESSAGE,
               login: tuple[str, str] | None = None) -> aiosmtplib.SMTPResponse:
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               use_tls=False, timeout=30) as client:
        if login:
            await client.login(*login)
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        return await client.data(data)


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


async def test_smtplib_message_is_delivered_as_system_mailbox(
        relay: Relay, sandbox: Sandbox) -> None:
    host, port = address(relay)
    refused = await asyncio.to_thread(smtplib_send, host, port, "billing@contoso.com",
                                      ["customer@example.com"], MESSAGE)
    assert refused == {}
    [got] = sandbox.exchange.messages
    assert got.mailbox == "relay@contoso.com"
    assert got.mail_from == "relay@contoso.com"           # rewritten: not permitted sender
    assert got.rcpt_tos == ["customer@example.com"]
    assert got.data.startswith(b"Received: from legacy-app.test")
    assert b"From: Billing <relay@contoso.com>" in got.data
    assert b"Reply-To: billing@contoso.com" in got.data
    assert body_of(got.data) == body_of(MESSAGE)
    assert sandbox.entra.token_requests == 1
    assert len(list(sandbox.maildir.glob("*.eml"))) == 1


async def test_authenticated_user_profile_overrides_system(
        relay: Relay, sandbox: Sandbox) -> None:
    await send(relay, "alice@contoso.com", ["x@example.com"],
               MESSAGE.replace(b"billing@contoso.com", b"alice@contoso.com"),
               login=("alice", PASSWORDS["alice"]))
    await send(relay, "bob@contoso.com", ["x@example.com"], login=("bob", PASSWORDS["bob"]))
    alice_msg, bob_msg = sandbox.exchange.messages
    assert alice_msg.mailbox == "alice@contoso.com"
    assert alice_msg.mail_from == "alice@contoso.com"
    assert b"From: Billing <alice@contoso.com>" in alice_msg.data
    assert b"Reply-To" not in alice_msg.data                 # permitted: nothing rewritten
    assert bob_msg.mailbox == "relay@contoso.com"            # bob has no profile: system


async def test_wrong_password_is_refused(relay: Relay, sandbox: Sandbox) -> None:
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await send(relay, "a@contoso.com", ["x@example.com"], login=("alice", "wrong"))
    assert err.value.code == 535
    assert sandbox.exchange.messages == []


async def test_bcc_only_recipients_are_delivered(relay: Relay, sandbox: Sandbox) -> None:
    rcpts = ["customer@example.com", "hidden1@example.org", "hidden2@example.net"]
    await send(relay, "billing@contoso.com", rcpts)
    [got] = sandbox.exchange.messages
    assert sorted(got.rcpt_tos) == sorted(rcpts)
    assert b"hidden1" not in got.data                        # no Bcc list leaks in headers


@pytest.mark.parametrize("policy", ["rewrite", "keep"])
async def test_a_bcc_field_is_removed_and_every_envelope_recipient_still_gets_the_message(
        start_relay: RelayFactory, sandbox: Sandbox, policy: str) -> None:
    # What `mail -b` and many scripts write: the copies in secret named in the header.
    relay = await start_relay({"profiles": {"system": {"sender_policy": policy,
                                                       "send_as": ["*@contoso.com"]}}})
    data = (b"From: Billing <billing@contoso.com>\r\n"
            b"To: customer@example.com\r\n"
            b"Bcc: auditor@example.org,\r\n\tarchive@example.net\r\n"
            b"Subject: Invoice\r\n"
            b"resent-bcc: second-look@example.org\r\n"
            b"\r\n"
            b"Bcc: a body line, which stays\r\n")
    rcpts = ["customer@example.com", "auditor@example.org", "archive@example.net",
             "second-look@example.org"]
    reply = await send(relay, "billing@contoso.com", rcpts, data)
    assert reply.code == 250
    [got] = sandbox.exchange.messages
    assert got.rcpt_tos == rcpts
    head, body = got.data.split(b"\r\n\r\n", 1)
    assert b"auditor" not in head and b"archive" not in head and b"second-look" not in head
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(
        (b"bcc", b"resent-bcc"))] == []
    assert b"Subject: Invoice\r\n" in got.data
    assert body == b"Bcc: a body line, which stays\r\n"


async def test_utf8_8bit_message_arrives_byte_identical(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"profiles": {"system": {"sender_policy": "keep",
                                                       "send_as": ["*@contoso.com"]}}})
    data = ("From: Zoë Ångström <zoe@contoso.com>\r\n"
            "To: Jürgen <j@example.com>\r\n"
            "Subject: Grüße – €100 — 日本語\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            "\r\n"
            "Größe: 5 × 3 ≠ 15 ✓\r\n"
            ".leading dot line\r\n"
            "line with trailing spaces   \r\n"
            + "x" * 5000 + "\r\n").encode("utf-8")
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
        await client.sendmail("zoe@contoso.com", ["j@example.com"], data,
                              mail_options=["BODY=8BITMIME"])
    [got] = sandbox.exchange.messages
    received, rest = got.data.split(b"\r\n", 1)
    while rest.startswith((b"\t", b" ")):
        rest = rest.split(b"\r\n", 1)[1]
    assert received.startswith(b"Received: ")
    assert rest == data


async def test_fifty_concurrent_messages_share_one_token(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    # Entra ID holds the first token request: every message arrives while there is no
    # token yet, so each delivery attempt needs one at the same moment.
    sandbox.entra.hold_token_requests()
    relay = await start_relay({"delivery": {"mailbox_limits": {"messages_per_minute": 1000}}})
    sends = asyncio.gather(*(send(relay, "billing@contoso.com", [f"r{i}@example.com"])
                             for i in range(50)))
    try:
        await wait_until(lambda: relay.queue.in_flight >= 3)   # attempts waiting for it
        assert sandbox.entra.token_requests == 1
    finally:
        sandbox.entra.release_token_requests()
    replies = await sends
    assert all(r.code == 250 for r in replies)
    await wait_until(lambda: len(sandbox.exchange.messages) == 50)
    assert sandbox.entra.token_requests == 1
    assert sandbox.exchange.max_concurrent_sessions <= 3      # Exchange's per-mailbox limit


async def test_535_gets_a_new_token_and_succeeds(relay: Relay, sandbox: Sandbox) -> None:
    await send(relay, "billing@contoso.com", ["a@example.com"])
    sandbox.entra.revoke_all()                      # the cached token is now refused upstream
    await sandbox.exchange.disconnect_all()         # (tokens are checked at AUTH: new session)
    await send(relay, "billing@contoso.com", ["b@example.com"])
    assert len(sandbox.exchange.messages) == 2
    assert sandbox.entra.token_requests == 2
    assert sandbox.exchange.auth_failed == 1


async def test_token_refreshed_after_expiry(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    sandbox.entra.token_lifetime = 1
    relay = await start_relay({"credentials": {"main": {"refresh_before": "0.2s"}}})
    await send(relay, "billing@contoso.com", ["a@example.com"])
    await asyncio.sleep(1.3)
    await send(relay, "billing@contoso.com", ["b@example.com"])
    assert len(sandbox.exchange.messages) == 2
    assert sandbox.entra.token_requests >= 2
    assert sandbox.exchange.auth_failed == 0        # the expired token was never presented


async def test_entra_outage_with_valid_cached_token(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    # refresh_before longer than the lifetime: every message wants a new token.
    sandbox.entra.token_lifetime = 600
    relay = await start_relay({"credentials": {"main": {"refresh_before": "20m"}}})
    await send(relay, "billing@contoso.com", ["a@example.com"])
    sandbox.entra.fail_next(500, count=100)
    await send(relay, "billing@contoso.com", ["b@example.com"])
    assert len(sandbox.exchange.messages) == 2


async def test_entra_outage_without_token_queues_the_message(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": {"retry_initial": "1h"}})
    sandbox.entra.fail_next(500, count=1000, retry_after=0)
    response = await send(relay, "billing@contoso.com", ["a@example.com"])
    assert response.code == 250 and "queued as" in response.message
    assert sandbox.exchange.messages == []
    [entry] = deferred_entries(relay)
    assert entry.last_reply is not None and str(entry.last_reply).startswith("451 4.7.0")
    sandbox.entra.clear_failures()                            # Entra is back
    relay.queue.flush()
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)


def deferred_entries(relay: Relay) -> list[Entry]:
    return [relay.spool.read(State.DEFERRED, n) for n in relay.spool.names(State.DEFERRED)]


@pytest.mark.parametrize(("code", "text"), [
    (554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@y"),
    (550, "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP"),
])
async def test_permanent_upstream_reply_reaches_waiting_client(
        relay: Relay, sandbox: Sandbox, code: int, text: str) -> None:
    sandbox.exchange.fail_next("data", code, text)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, "billing@contoso.com", ["a@example.com"])
    assert err.value.code == code
    assert text.split()[0] in err.value.message       # the upstream's text is passed on
    assert relay.spool.count(State.DEFERRED) == relay.spool.count(State.FAILED) == 0


@pytest.mark.parametrize(("code", "text"), [
    (451, "4.3.2 Temporary server error. Please try again later"),
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
])
async def test_temporary_upstream_reply_is_queued_and_retried(
        relay: Relay, sandbox: Sandbox, code: int, text: str) -> None:
    sandbox.exchange.fail_next("data", code, text)
    response = await send(relay, "billing@contoso.com", ["a@example.com"])
    assert response.code == 250 and "queued as" in response.message
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)   # retried by the queue
    assert relay.spool.count(State.DEFERRED) == 0


async def test_partial_recipient_rejection_bounces_only_the_rejected(
        relay: Relay, sandbox: Sandbox) -> None:
    sandbox.exchange.fail_next("rcpt", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound",
                               recipient="ghost@example.com")
    response = await send(relay, "billing@contoso.com", ["a@example.com", "ghost@example.com"])
    assert response.code == 250
    await wait_until(lambda: len(sandbox.exchange.messages) == 2)
    original, dsn = sandbox.exchange.messages
    assert original.rcpt_tos == ["a@example.com"]
    assert dsn.rcpt_tos == ["billing@contoso.com"]           # the envelope sender
    assert b"multipart/report" in dsn.data and b"ghost@example.com" in dsn.data
    assert b"5.1.10" in dsn.data
    [failed] = relay.spool.names(State.FAILED)
    assert relay.spool.read(State.FAILED, failed).delivered == ["a@example.com"]
    # Each kept in the sandbox's mail under its own queue id: the report's too, from the
    # trace field the relay gives the reports it makes.
    queue_id = re.findall(r"\b[0-9A-F]{12}\b", response.message)[0]     # "delivered as ID"
    assert original.path is not None and original.path.name.endswith(f"-{queue_id}.eml")
    assert dsn.data.startswith(b"Received: by relay.test (smtp-oauth-relay) id ")
    assert dsn.path is not None and re.search(r"-[0-9A-F]{12}\.eml$", dsn.path.name)
    assert dsn.path.name.split("-")[1] != f"{queue_id}.eml"


async def test_the_tenants_external_limit_defers_those_recipients_without_a_bounce(
        relay: Relay, sandbox: Sandbox) -> None:
    sandbox.exchange.fail_next("rcpt", 550, "5.7.233 Recipient address rejected: Tenant "
                               "has exceeded its external recipient rate limit",
                               recipient="partner@fabrikam.example")
    response = await send(relay, "billing@contoso.com",
                          ["colleague@contoso.com", "partner@fabrikam.example"])
    assert response.code == 250
    await wait_until(lambda: relay.spool.count(State.DEFERRED) == 1)
    [delivered] = sandbox.exchange.messages          # no report: nothing failed
    assert delivered.rcpt_tos == ["colleague@contoso.com"]
    [entry] = deferred_entries(relay)
    assert entry.pending == ["partner@fabrikam.example"] and entry.failed == {}
    assert entry.next_attempt - time.time() > 3000    # an hour, not the usual backoff


async def test_upstream_down_keeps_the_message(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": {"retry_initial": "1h"}})
    await sandbox.exchange.stop()
    response = await send(relay, "billing@contoso.com", ["a@example.com"])
    assert response.code == 250
    [entry] = deferred_entries(relay)
    assert entry.last_reply is not None and str(entry.last_reply).startswith("451 4.4.1")
    assert relay.spool.data_path(entry.id).exists()


@pytest.mark.parametrize(("policy", "outcome"), [
    ("keep", "kept"), ("rewrite", "rewritten"), ("reject", "rejected")])
async def test_sender_policies(start_relay: RelayFactory, sandbox: Sandbox,
                               policy: str, outcome: str) -> None:
    relay = await start_relay({"profiles": {"system": {
        "sender_policy": policy, "send_as": ["*@alerts.contoso.com"]}}})
    # A permitted sender passes unchanged under every policy.
    permitted = MESSAGE.replace(b"billing@contoso.com", b"cron@alerts.contoso.com")
    await send(relay, "cron@alerts.contoso.com", ["a@example.com"], permitted)
    assert sandbox.exchange.messages[0].mail_from == "cron@alerts.contoso.com"
    assert sandbox.exchange.messages[0].data.endswith(permitted)

    if outcome == "rejected":
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
            await send(relay, "billing@contoso.com", ["a@example.com"])
        assert err.value.code == 550
        assert "billing@contoso.com" in err.value.message
        assert len(sandbox.exchange.messages) == 1
    elif outcome == "kept":
        # Nothing changed: the stand-in, like Exchange, refuses to send as a stranger.
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await send(relay, "billing@contoso.com", ["a@example.com"])
        assert err.value.code == 554 and "SendAsDenied" in err.value.message
    else:
        await send(relay, "billing@contoso.com", ["a@example.com"])
        got = sandbox.exchange.messages[1]
        assert got.mail_from == "relay@contoso.com"
        assert b"Reply-To: billing@contoso.com" in got.data


async def test_size_limit(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"server": {"max_message_size": 10_000}})
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
        await client.ehlo()
        assert client.supports_extension("size")
        assert client.esmtp_extensions["size"] == "10000"
        with pytest.raises(aiosmtplib.SMTPResponseException) as err:
            await client.sendmail("billing@contoso.com", ["a@example.com"],
                                  MESSAGE + b"x" * 20_000 + b"\r\n")
    assert err.value.code == 552
    assert sandbox.exchange.messages == []


async def test_unauthenticated_from_refused_network(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"server": {"relay_networks": ["192.0.2.0/24"]}})
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await send(relay, "billing@contoso.com", ["a@example.com"])
    assert err.value.code == 530
    # ...but an authenticated user may send from there.
    await send(relay, "bob@contoso.com", ["a@example.com"], login=("bob", PASSWORDS["bob"]))
    assert len(sandbox.exchange.messages) == 1


async def test_unroutable_mail_gets_550(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"routing": {"system_profile": None}})
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await send(relay, "billing@contoso.com", ["a@example.com"])
    assert err.value.code == 550
    assert "profile" in err.value.message


async def test_no_secret_in_logs(relay: Relay, sandbox: Sandbox,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    await send(relay, "alice@contoso.com", ["a@example.com"], login=("alice", PASSWORDS["alice"]))
    sandbox.entra.revoke_all()
    await sandbox.exchange.disconnect_all()
    await send(relay, "alice@contoso.com", ["a@example.com"], login=("alice", PASSWORDS["alice"]))
    text = caplog.text
    assert PASSWORDS["alice"] not in text
    assert "Bearer" not in text
    for token in sandbox.entra.issued_tokens:
        assert token not in text and token[-40:] not in text
    assert "replaced-by-sandbox" not in text


async def test_relay_survives_garbage(relay: Relay, sandbox: Sandbox) -> None:
    host, port = address(relay)
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readline()
    for line in (b"\x00\xff\xfe garbage\r\n", b"MAIL FROM:<<<>>>\r\n", b"RCPT TO:<x>\r\n",
                 b"DATA\r\n", b"AUTH PLAIN !!!\r\n"):
        writer.write(line)
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 5)
        assert reply[:1] in (b"4", b"5"), reply
    writer.close()
    await send(relay, "billing@contoso.com", ["a@example.com"])
    assert len(sandbox.exchange.messages) == 1
