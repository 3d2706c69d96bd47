"""The upstream client against the fake Exchange Online, over real loopback sockets and TLS.

What matters here: the token only travels over verified TLS, in the two-step XOAUTH2
form; messages arrive byte for byte; the upstream's verdicts on a message reach the
client unchanged; and every infrastructure failure becomes a 4xx, never a bounce.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Upstream
from relay.core.message import Content, Outbound
from relay.core.secrets import Secret
from relay.deliver import data as data_module
from relay.deliver.failures import AuthenticationRejected, refusal_for
from relay.deliver.upstream import UpstreamClient
from relay.oauth.token import Token
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.pki import LocalPKI, create_pki

MAILBOX = "relay@contoso.com"
# Real tokens are 1.5-3 kB: long enough to break a 512-octet AUTH command line.
GOOD = "eyJ0eXAiOiJKV1QifQ." + "A" * 2200 + ".good-signature"
EXPIRED = "eyJ0eXAiOiJKV1QifQ." + "B" * 2200 + ".expired-one"
NO_ROLE = "eyJ0eXAiOiJKV1QifQ." + "C" * 2200 + ".no-role"


def validate(token: str) -> dict[str, Any]:
    """A stand-in for FakeEntra.validate_token: three known tokens, the rest invalid."""
    if token == GOOD:
        return {"roles": ["SMTP.SendAsApp"], "aud": "https://outlook.office365.com"}
    if token == NO_ROLE:
        return {"roles": ["Mail.Send"]}
    if token == EXPIRED:
        raise ValueError("token expired")
    raise ValueError("signature invalid")


def token(value: str = GOOD) -> Token:
    return Token(access_token=Secret(value), expires_at=time.time() + 3600, claims={})


BODY = (
    "From: Relay <relay@contoso.com>\r\n"
    "To: Alice <alice@example.com>\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße aus Köln — 8-bit UTF-8 body.\r\n"
    ".a line that starts with a dot\r\n"
    "..two dots\r\n"
    ".\r\n"
    "last line\r\n"
).encode()


def message(rcpts: list[str] | None = None, data: bytes = BODY,
            mail_from: str = MAILBOX, options: list[str] | None = None) -> Outbound:
    return Outbound(id="TEST01", profile="system", mail_from=mail_from,
                    rcpt_tos=rcpts or ["alice@example.com"], content=Content.from_bytes(data),
                    mail_options=options if options is not None else ["BODY=8BITMIME"])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def exchange(pki: LocalPKI, tmp_path: Path) -> AsyncIterator[FakeExchange]:
    async with FakeExchange(pki, validate, maildir=tmp_path / "mail") as fake:
        yield fake


def client_for(host: str, port: int, ca_file: Path | None, **kw: Any) -> UpstreamClient:
    upstream = Upstream(host=host, port=port, ca_file=ca_file, timeout=kw.pop("timeout", 5))
    return UpstreamClient(upstream, kw.pop("helo", "relay.test"))


@pytest.fixture
def client(exchange: FakeExchange, pki: LocalPKI) -> UpstreamClient:
    return client_for(exchange.host, exchange.port, pki.ca_file)


# --- delivery ------------------------------------------------------------------------------

async def test_delivers_byte_identical_over_starttls_with_two_step_xoauth2(
        exchange: FakeExchange, client: UpstreamClient, tmp_path: Path) -> None:
    result = await client.send(message(), MAILBOX, token())

    assert result.reply.code == 250, result.reply
    assert result.accepted == ["alice@example.com"] and result.refused == {}
    [got] = exchange.messages
    assert got.data == BODY
    assert (got.mailbox, got.mail_from, got.rcpt_tos) == (MAILBOX, MAILBOX, ["alice@example.com"])
    assert "BODY=8BITMIME" in got.mail_options
    assert f"SIZE={len(BODY)}" in got.mail_options
    # The token went in the two-step form, only after STARTTLS, and the session ended well.
    verbs = [c.split(" ")[0] for c in exchange.commands]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert "AUTH XOAUTH2" in exchange.commands
    [attempt] = exchange.auth_attempts
    assert attempt.ok and attempt.mechanism == "XOAUTH2" and not attempt.initial_response
    assert attempt.mailbox == MAILBOX
    assert (exchange.sessions, exchange.auth_ok, exchange.auth_failed) == (1, 1, 0)
    # The sandbox keeps the message as a file with its envelope beside it.
    assert got.path is not None and got.path.read_bytes() == BODY
    envelope = json.loads(got.path.with_suffix(".json").read_text())
    assert envelope["rcpt_tos"] == ["alice@example.com"] and envelope["mailbox"] == MAILBOX


async def test_bcc_style_recipients_all_delivered_once(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    rcpts = ["alice@example.com", "hidden1@example.org", "hidden2@example.net"]
    result = await client.send(message(rcpts), MAILBOX, token())

    assert result.reply.ok and result.accepted == rcpts
    [got] = exchange.messages
    assert got.rcpt_tos == rcpts and got.data == BODY
    assert b"hidden1" not in got.data  # envelope only, as the client sent it
    sidecar = json.loads(got.path.with_suffix(".json").read_text())  # type: ignore[union-attr]
    assert sidecar["rcpt_tos"] == rcpts


async def test_messages_in_maildir_sort_by_arrival(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    for i in range(3):
        data = BODY.replace(b"last line", f"number {i}".encode())
        assert (await client.send(message(data=data), MAILBOX, token())).reply.ok
    assert exchange.maildir is not None
    files = sorted(exchange.maildir.glob("*.eml"))
    assert [f.read_bytes().count(f"number {i}".encode()) for i, f in enumerate(files)] \
        == [1, 1, 1]
    assert not list(exchange.maildir.glob(".*.tmp"))


async def test_maildir_files_carry_the_relays_queue_id_across_restarts(
        pki: LocalPKI, tmp_path: Path) -> None:
    """The file name is the arrival time and the queue id of the relay's topmost Received
    field (`noqueue` without one); a second fake on the same directory (a restarted
    `make run`) adds files after the first one's, never over them."""
    received = (b"Received: from app.test ([127.0.0.1]) by relay.test (smtp-oauth-relay)\r\n"
                b"\twith ESMTP id 4F2A9C01B3D7 for <alice@example.com>;\r\n"
                b"\tSun, 01 Jun 2025 12:00:00 +0000\r\n"
                b"Received: from elsewhere by other.test (smtp-oauth-relay) with ESMTP\r\n"
                b"\tid 000000000001; Sun, 01 Jun 2025 11:59:00 +0000\r\n")
    names: list[str] = []
    for data in (received + BODY, BODY, received + BODY):
        async with FakeExchange(pki, validate, maildir=tmp_path / "mail") as fake:
            client = client_for(fake.host, fake.port, pki.ca_file)
            assert (await client.send(message(data=data), MAILBOX, token())).reply.ok
            [got] = fake.messages
            assert got.path is not None and got.path.read_bytes() == data
            names.append(got.path.name)
            sidecar = json.loads(got.path.with_suffix(".json").read_text())
            assert sidecar["queue_id"] == ("4F2A9C01B3D7" if data != BODY else None)
    assert [n.split("-", 1)[1] for n in names] == [
        "4F2A9C01B3D7.eml", "noqueue.eml", "4F2A9C01B3D7.eml"]
    assert sorted(p.name for p in (tmp_path / "mail").glob("*.eml")) == names


async def test_only_advertised_mail_options_are_passed(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    msg = message(options=["BODY=8BITMIME", "SMTPUTF8", "SIZE=1", "RET=HDRS"],
                  rcpts=["jürgen@example.de"])
    result = await client.send(msg, MAILBOX, token())

    assert result.reply.ok, result.reply
    [got] = exchange.messages
    assert sorted(got.mail_options) == sorted(["BODY=8BITMIME", "SMTPUTF8",
                                               f"SIZE={len(BODY)}"])
    assert got.rcpt_tos == ["jürgen@example.de"]


# --- authentication --------------------------------------------------------------------------

async def test_fake_refuses_auth_and_mail_without_starttls(exchange: FakeExchange) -> None:
    smtp = aiosmtplib.SMTP(hostname=exchange.host, port=exchange.port, start_tls=False,
                           timeout=5)
    await smtp.connect()
    try:
        ehlo = await smtp.ehlo()
        assert "STARTTLS" in ehlo.message and "AUTH" not in ehlo.message
        payload = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {GOOD}\x01\x01".encode())
        auth = await smtp.execute_command(b"AUTH", b"XOAUTH2")
        assert (auth.code, auth.message) == (530, "5.7.0 Must issue a STARTTLS command first")
        mail = await smtp.execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
        assert mail.code == 530 and "STARTTLS" in mail.message
        assert payload  # never sent: the fake did not even ask for it
    finally:
        smtp.close()
    assert exchange.auth_ok == 0 and exchange.messages == []


async def test_fake_advertises_exchange_extensions_after_tls(
        exchange: FakeExchange, pki: LocalPKI) -> None:
    smtp = aiosmtplib.SMTP(hostname=exchange.host, port=exchange.port, start_tls=True,
                           cert_bundle=str(pki.ca_file), timeout=5)
    await smtp.connect()
    try:
        ehlo = await smtp.ehlo()
        for ext in ("SIZE 157286400", "AUTH LOGIN XOAUTH2", "8BITMIME", "SMTPUTF8",
                    "PIPELINING"):
            assert ext in ehlo.message
        mail = await smtp.execute_command(b"MAIL", b"FROM:<relay@contoso.com>")
        assert (mail.code, mail.message) == (530, "5.7.57 Client not authenticated to send mail")
        basic = await smtp.execute_command(
            b"AUTH", b"PLAIN", base64.b64encode(b"\0relay@contoso.com\0password"))
        assert basic.code == 535 and basic.message.startswith(
            "5.7.139 Authentication unsuccessful, basic authentication is disabled")
        # The one-line form is accepted too (a 2 kB command line).
        one_line = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {GOOD}\x01\x01".encode())
        auth = await smtp.execute_command(b"AUTH", b"XOAUTH2", one_line)
        assert auth.code == 235, auth
    finally:
        smtp.close()
    assert [a.initial_response for a in exchange.auth_attempts] == [True, True]
    assert exchange.auth_attempts[1].ok


@pytest.mark.parametrize(("value", "why"), [(EXPIRED, "token expired"),
                                            ("not-a-token", "signature invalid"),
                                            (NO_ROLE, "SMTP.SendAsApp")])
async def test_bad_token_is_535_5_7_3_and_raises(
        exchange: FakeExchange, client: UpstreamClient, value: str, why: str) -> None:
    with pytest.raises(AuthenticationRejected) as info:
        await client.send(message(), MAILBOX, token(value))
    assert info.value.reply.code == 535
    assert info.value.reply.text.startswith("5.7.3 Authentication unsuccessful")
    assert why in info.value.reply.text
    assert value not in str(info.value)
    assert exchange.auth_failed == 1 and exchange.messages == []
    assert not any(c.startswith("MAIL") for c in exchange.commands)


async def test_mailbox_not_granted_is_rejected(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.grant("other@contoso.com")
    with pytest.raises(AuthenticationRejected) as info:
        await client.send(message(), MAILBOX, token())
    assert info.value.reply.code == 535 and "5.7.3" in info.value.reply.text
    exchange.grant(MAILBOX)
    assert (await client.send(message(), MAILBOX, token())).reply.ok


async def test_json_error_challenge_is_answered_with_empty_line(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    challenge = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
    exchange.fail_next("auth", 334, challenge)
    with pytest.raises(AuthenticationRejected) as info:
        await client.send(message(), MAILBOX, token())
    assert info.value.reply.code == 535
    assert '"status":"401"' in info.value.reply.text  # the decoded challenge is kept
    assert "<empty line>" in exchange.commands


async def test_temporary_auth_failure_is_4xx_not_rejection(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("auth", 454, "4.7.0 Temporary authentication failure")
    result = await client.send(message(), MAILBOX, token())
    assert (result.reply.code, result.reply.text) == (454, "4.7.0 Temporary authentication "
                                                           "failure")


async def test_token_never_logged(exchange: FakeExchange, client: UpstreamClient,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert (await client.send(message(), MAILBOX, token())).reply.ok
    with pytest.raises(AuthenticationRejected):
        await client.send(message(), MAILBOX, token(EXPIRED))
    exchange.drop_next("auth")
    assert (await client.send(message(), MAILBOX, token())).reply.transient

    payload = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {GOOD}\x01\x01".encode())
    # Every logger at DEBUG, the fake server's (aiosmtpd) included.
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for secret in (GOOD, EXPIRED, GOOD[20:80], payload.decode()[:60], "Bearer "):
        assert secret not in logged
    ours = [r for r in caplog.records if r.name.startswith("relay.deliver.")]
    delivered = [r.getMessage() for r in ours if "reply=250" in r.getMessage()]
    assert len(delivered) == 1
    assert all(part in delivered[0] for part in
               (f"127.0.0.1:{exchange.port}", f"mailbox={MAILBOX}", "rcpts=1", " s)"))
    assert not any("Grüße" in r.getMessage() or "Köln" in r.getMessage() for r in ours)


# --- upstream verdicts -------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_4xx_from_upstream_stays_4xx_with_its_text(
        exchange: FakeExchange, client: UpstreamClient, stage: str) -> None:
    text = "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
    exchange.fail_next(stage, 432, text)
    result = await client.send(message(), MAILBOX, token())
    assert result.reply.code == 432 and text in result.reply.text
    assert result.accepted == [] and exchange.messages == []


async def test_5xx_at_data_is_passed_on_unchanged(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    text = "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    exchange.fail_next("data", 554, text)
    result = await client.send(message(), MAILBOX, token())
    assert (result.reply.code, result.reply.text) == (554, text)
    assert result.accepted == []


async def test_send_as_denied_after_data(exchange: FakeExchange,
                                         client: UpstreamClient) -> None:
    result = await client.send(message(mail_from="ceo@contoso.com"), MAILBOX, token())
    assert result.reply.code == 554
    assert result.reply.text == (
        f"5.2.252 SendAsDenied; {MAILBOX} not allowed to send as ceo@contoso.com; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied")
    assert "DATA" in exchange.commands  # refused after the content, as Exchange does

    # Header From is checked too, parsed properly (an "@" in the display name is fine).
    spoofed = BODY.replace(b"From: Relay <relay@contoso.com>",
                           b'From: "Printer @ 3rd floor" <printer@contoso.com>')
    result = await client.send(message(data=spoofed), MAILBOX, token())
    assert result.reply.code == 554 and "send as printer@contoso.com" in result.reply.text

    exchange.allow_send_as(MAILBOX, "@contoso.com")
    assert (await client.send(message(data=spoofed), MAILBOX, token())).reply.ok
    assert (await client.send(message(mail_from="ceo@contoso.com"), MAILBOX,
                              token())).reply.ok


async def test_partial_refusal_abandons_message_by_default(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    text = "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    exchange.fail_next("rcpt", 550, text, recipient="ghost@example.com")
    rcpts = ["alice@example.com", "ghost@example.com", "bob@example.com"]
    result = await client.send(message(rcpts), MAILBOX, token())

    assert result.reply.code == 550 and result.reply.enhanced == "5.1.10"
    assert "ghost@example.com" in result.reply.text and text in result.reply.text
    assert "alice@example.com" not in result.reply.text
    assert result.accepted == [] and list(result.refused) == ["ghost@example.com"]
    assert result.refused["ghost@example.com"].text == text
    assert exchange.messages == []     # tests/test_pipelining.py: how, either way


async def test_partial_refusal_with_a_4xx_makes_the_whole_reply_4xx(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("rcpt", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound",
                       recipient="ghost@example.com")
    exchange.fail_next("rcpt", 452, "4.5.3 Too many recipients", recipient="bob@example.com")
    result = await client.send(message(["ghost@example.com", "bob@example.com"]),
                               MAILBOX, token())
    assert result.reply.code == 452 and result.reply.transient
    assert set(result.refused) == {"ghost@example.com", "bob@example.com"}


async def test_partial_refusal_delivers_to_the_rest_when_allowed(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    text = "5.1.10 RESOLVER.ADR.RecipientNotFound"
    exchange.fail_next("rcpt", 550, text, recipient="ghost@example.com")
    rcpts = ["alice@example.com", "ghost@example.com", "bob@example.com"]
    result = await client.send(message(rcpts), MAILBOX, token(), require_all_recipients=False)

    assert result.reply.code == 250
    assert result.accepted == ["alice@example.com", "bob@example.com"]
    assert {r: (x.code, x.text) for r, x in result.refused.items()} == {
        "ghost@example.com": (550, text)}
    [got] = exchange.messages
    assert got.rcpt_tos == ["alice@example.com", "bob@example.com"] and got.data == BODY


async def test_all_refused_is_a_refusal_even_when_partial_allowed(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.fail_next("rcpt", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound", count=2)
    result = await client.send(message(["a@example.com", "b@example.com"]), MAILBOX,
                               token(), require_all_recipients=False)
    assert result.reply.code == 550 and result.accepted == []
    assert len(result.refused) == 2 and exchange.messages == []


def test_refusal_reply_is_permanent_only_if_all_refusals_are() -> None:
    from relay.core.reply import Reply

    perm = Reply(550, "5.1.1 unknown")
    temp = Reply(451, "4.4.0 later")
    assert refusal_for({"a@x": perm}, 2).code == 550
    mixed = refusal_for({"a@x": perm, "b@x": temp}, 2)
    assert mixed.code == 451 and mixed.enhanced == "4.4.0"
    assert "<a@x>: 550 5.1.1 unknown" in mixed.text and "<b@x>: 451 4.4.0 later" in mixed.text


# --- infrastructure failures are 4xx -------------------------------------------------------

async def test_connection_dropped_mid_data_is_4xx(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    exchange.drop_next("data")
    result = await client.send(message(), MAILBOX, token())
    assert result.reply.code == 451 and result.reply.enhanced == "4.4.2"
    assert f"{exchange.host}:{exchange.port}" in result.reply.text
    assert "DATA" in result.reply.text and exchange.messages == []
    # The fake serves the next connection normally.
    assert (await client.send(message(), MAILBOX, token())).reply.ok


@pytest.mark.parametrize("stage", ["connect", "ehlo", "auth", "mail", "rcpt"])
async def test_connection_dropped_at_any_stage_is_4xx(
        exchange: FakeExchange, client: UpstreamClient, stage: str) -> None:
    exchange.drop_next(stage)
    result = await client.send(message(), MAILBOX, token())
    assert result.reply.code == 451, result.reply
    assert f"{exchange.host}:{exchange.port}" in result.reply.text


@pytest.mark.parametrize(("code", "expected"), [(421, 421), (554, 451)])
async def test_session_refused_at_greeting(exchange: FakeExchange, client: UpstreamClient,
                                           code: int, expected: int) -> None:
    exchange.fail_next("connect", code, f"{code // 100}.3.2 Service not available")
    result = await client.send(message(), MAILBOX, token())
    assert result.reply.code == expected
    assert f"{code // 100}.3.2 Service not available" in result.reply.text
    assert exchange.auth_attempts == []


async def test_connection_refused_is_4xx(pki: LocalPKI) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        result = await client_for("127.0.0.1", port, pki.ca_file).send(
            message(), MAILBOX, token())
    assert result.reply.code == 451 and result.reply.enhanced == "4.4.1"
    assert f"127.0.0.1:{port}" in result.reply.text and "refused" in result.reply.text


async def test_unresolvable_host_is_4xx(pki: LocalPKI) -> None:
    result = await client_for("no-such-host.invalid", 587, pki.ca_file).send(
        message(), MAILBOX, token())
    assert result.reply.code == 451 and "no-such-host.invalid" in result.reply.text


async def test_silent_server_times_out_as_4xx(pki: LocalPKI) -> None:
    import asyncio

    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accept, never greet

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        result = await client_for("127.0.0.1", port, pki.ca_file, timeout=0.5).send(
            message(), MAILBOX, token())
    finally:
        server.close()
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        await server.wait_closed()
    assert result.reply.code == 451 and "0.5 s" in result.reply.text
    assert time.monotonic() - started < 3


async def test_wrong_ca_is_4xx_naming_the_certificate(
        exchange: FakeExchange, tmp_path: Path) -> None:
    other = create_pki(tmp_path / "other-ca")
    result = await client_for(exchange.host, exchange.port, other.ca_file).send(
        message(), MAILBOX, token())
    assert result.reply.code == 451 and result.reply.enhanced == "4.4.1"
    assert "certificate verify failed" in result.reply.text
    assert "ca_file" in result.reply.text
    assert exchange.auth_attempts == [] and "AUTH XOAUTH2" not in exchange.commands


async def test_no_starttls_offered_means_no_auth(pki: LocalPKI, tmp_path: Path) -> None:
    async with FakeExchange(pki, validate, starttls=False) as stripped:
        result = await client_for(stripped.host, stripped.port, pki.ca_file).send(
            message(), MAILBOX, token())
        assert result.reply.code == 451 and "STARTTLS" in result.reply.text
        assert not any(c.startswith(("AUTH", "MAIL")) for c in stripped.commands)
        assert stripped.commands[0].startswith("EHLO relay.test")


async def test_implicit_tls_to_a_starttls_port_is_4xx(
        exchange: FakeExchange, pki: LocalPKI) -> None:
    upstream = Upstream(host=exchange.host, port=exchange.port, tls="implicit",
                        ca_file=pki.ca_file, timeout=2)
    result = await UpstreamClient(upstream, "relay.test").send(message(), MAILBOX, token())
    assert result.reply.code == 451 and f"{exchange.host}:{exchange.port}" in result.reply.text
    assert exchange.auth_attempts == []


# --- sessions ----------------------------------------------------------------------------------

async def test_one_session_carries_several_messages(
        exchange: FakeExchange, client: UpstreamClient) -> None:
    session = client.session()
    await session.open(MAILBOX, token())
    try:
        assert session.authenticated_as(MAILBOX, token())
        assert not session.authenticated_as(MAILBOX, token(EXPIRED))
        exchange.fail_next("rcpt", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound")
        first = await session.send_one(message())
        second = await session.send_one(message(["bob@example.com"]))
        third = await session.send_one(message(["carol@example.com"]))
    finally:
        await session.close()
    assert (first.reply.code, second.reply.code, third.reply.code) == (550, 250, 250)
    assert exchange.sessions == 1 and exchange.auth_ok == 1
    assert [m.rcpt_tos for m in exchange.messages] == [["bob@example.com"],
                                                       ["carol@example.com"]]
    assert not session.is_open


def test_fault_injection_arguments_are_checked(pki: LocalPKI) -> None:
    fake = FakeExchange(pki, validate)
    with pytest.raises(ValueError, match="unknown stage"):
        fake.fail_next("quit", 421, "4.3.2 bye")
    with pytest.raises(ValueError, match="count"):
        fake.drop_next("data", count=0)


class _Protocol:
    """What send_data uses of aiosmtplib's protocol, keeping every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def execute_command(self, *args: Any, **kw: Any) -> aiosmtplib.SMTPResponse:
        return aiosmtplib.SMTPResponse(354, "go ahead")

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def _drain_helper(self) -> None:
        pass

    async def read_response(self, **kw: Any) -> aiosmtplib.SMTPResponse:
        return aiosmtplib.SMTPResponse(250, "queued")


@settings(max_examples=200)
@given(lines=st.lists(st.sampled_from([b".", b"..", b".x", b"x.", b"", b"abc"]),
                      min_size=1, max_size=12),
       chunk=st.integers(1, 12), ends_with_break=st.booleans())
def test_data_is_dot_stuffed_across_chunks_and_ends_in_the_last_write(
        lines: list[bytes], chunk: int, ends_with_break: bool) -> None:
    """Whatever the chunks cut through (a dot at a chunk's start, a CRLF split in two),
    the upstream gets every line start's dot doubled, then one end of data, and the last
    chunk leaves in the same write as the final dot."""
    body = b"\r\n".join(lines) + (b"\r\n" if ends_with_break else b"")
    protocol = _Protocol()
    smtp = mock.Mock(protocol=protocol)
    with mock.patch.object(data_module, "_DATA_CHUNK", chunk):
        reply = asyncio.run(data_module.send_data(smtp, Content(data=body), 5))
    assert reply.code == 250
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                            for line in body.split(b"\r\n"))
    at_line_start = body == b"" or body.endswith(b"\r\n")
    assert b"".join(protocol.writes) == stuffed + (b".\r\n" if at_line_start
                                                   else b"\r\n.\r\n")
    assert len(protocol.writes) == max(1, -(-len(body) // chunk))
