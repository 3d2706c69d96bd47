"""The relay against a real XOAUTH2 submission server: Dovecot, not one of our own fakes.

Dovecot (Debian's dovecot-core + dovecot-submissiond) runs privately on 127.0.0.2 with
``ssl = required`` and an oauth2 passdb that validates the relay's JWT locally against
FakeEntra's RS256 public key; what it accepts it relays to an SMTP sink. The relay fetches
its token from FakeEntra with msal as usual and talks to Dovecot as it would to
smtp.office365.com. See tests/realservers.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.sandbox.entra import FakeEntra
from relay.sandbox.pki import LocalPKI, create_pki
from relay.spool.records import State
from tests.conftest import address, build_config, wait_until
from tests.realservers import DOVECOT_HOST, Dovecot, SmtpSink, dovecot_missing
from tests.relayproc import CLIENT_ID, MAILBOX, TENANT  # those of conftest's BASE_CONFIG

_MISSING = dovecot_missing()
pytestmark = [pytest.mark.realserver,
              pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


@dataclass
class Upstream:
    pki: LocalPKI
    entra: FakeEntra
    secret: str
    sink: SmtpSink
    dovecot: Dovecot
    # How far FakeEntra's clock is behind: its tokens' exp claims are that much too early,
    # while expires_in (what msal and the relay go by) still says a full hour.
    entra_behind: dict[str, float]


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    pki = create_pki(tmp_path / "pki")
    behind = {"seconds": 0.0}
    entra = FakeEntra(pki, signing="RS256", clock=lambda: time.time() - behind["seconds"])
    secret = secrets.token_urlsafe(24)
    entra.add_app(TENANT, CLIENT_ID, secret=secret)
    # Exchange checks that the app may act for the mailbox named in the XOAUTH2 login;
    # Dovecot checks that the token names that mailbox, in the claim its oauth2
    # username_attribute reads.
    entra.extra_claims["email"] = MAILBOX
    sink = SmtpSink()
    dovecot = Dovecot(pki, sink, username_attribute="email")
    dovecot.publish_key(entra.kid, entra.public_key_pem)
    try:
        entra.start()
        sink.start()
        dovecot.start()
        yield Upstream(pki, entra, secret, sink, dovecot, behind)
    finally:
        dovecot.stop()
        sink.stop()
        entra.stop()


@pytest.fixture
async def relay(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Relay]:
    """The relay of tests/conftest.py, its profiles sending through Dovecot."""
    config = build_config({
        "credentials": {"main": {"authority": upstream.entra.url,
                                 "client_secret": {"value": upstream.secret},
                                 "ca_file": str(upstream.pki.ca_file)}},
        "upstreams": {"dovecot": {"host": DOVECOT_HOST, "port": upstream.dovecot.port,
                                  "tls": "starttls", "ca_file": str(upstream.pki.ca_file),
                                  "timeout": 15}},
        "profiles": {"system": {"upstream": "dovecot"}, "alice": {"upstream": "dovecot"}},
        "spool": {"directory": str(tmp_path / "spool"), "on_tmpfs": "warn"},
    })
    relay = Relay(config)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


def message(subject: str, body: bytes = b"Hello from the legacy app.\r\n") -> bytes:
    head = [f"From: Relay <{MAILBOX}>", "To: alice@example.com", "Cc: bob@example.net",
            f"Subject: {subject}", f"Date: {email.utils.formatdate()}",
            f"Message-ID: {email.utils.make_msgid(domain='app.test')}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


RCPTS = ["alice@example.com", "bob@example.net", "hidden@example.org"]  # the last: Bcc only


def _submit(host: str, port: int, sender: str, rcpts: list[str],
            data: bytes) -> tuple[int, str]:
    with smtplib.SMTP(host, port, timeout=60) as client:
        client.ehlo("legacy-app.test")
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = client.data(data)
        return code, text.decode()


async def submit(relay: Relay, data: bytes, rcpts: list[str] = RCPTS) -> tuple[int, str]:
    """Send as a legacy app (no AUTH, from 127.0.0.1); the relay's reply to DATA."""
    host, port = address(relay)
    return await asyncio.to_thread(_submit, host, port, MAILBOX, rcpts, data)


def xoauth2(token: str) -> str:
    return base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def _tls(pki: LocalPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def refusals(dovecot: Dovecot) -> list[str]:
    return re.findall(r"oauth2 failed: (.*)", dovecot.log())


# --- delivery -------------------------------------------------------------------------------

async def test_message_reaches_the_server_behind_dovecot_intact(
        upstream: Upstream, relay: Relay) -> None:
    body = (b"First line.\r\n"
            b".A line that starts with a dot (dot-stuffed on both hops).\r\n"
            b"..Two dots.\r\n"
            + b"x" * 990 + b"\r\n"
            + b"".join(base64.b64encode(secrets.token_bytes(57)) + b"\r\n"
                       for _ in range(4000))            # about 300 kB, like an attachment
            + b".\r\n"                                  # a lone dot inside the message
            + b"Last line.\r\n")
    data = message("Quarterly report", body)

    code, text = await submit(relay, data)

    assert code == 250 and "delivered as" in text        # the relay waited for Dovecot
    [got] = upstream.sink.messages
    assert got.mail_from == MAILBOX
    assert sorted(got.rcpt_tos) == sorted(RCPTS)         # the Bcc-only recipient too
    assert got.data.endswith(data)                       # byte for byte
    prepended = got.data[: -len(data)]
    assert len(re.findall(rb"^Received: ", prepended, re.MULTILINE)) == 2
    assert b"by dovecot.test" in prepended and b"by relay.test" in prepended
    # Dovecot's own account: one XOAUTH2 login as the mailbox, over TLS, and the relay's
    # session came from 127.0.0.1 to 127.0.0.2 (so Dovecot did not count it as local).
    [login] = upstream.dovecot.logins()
    assert f"user=<{MAILBOX}>, method=XOAUTH2, rip=127.0.0.1, lip=127.0.0.2" in login
    assert ", TLS," in login
    assert re.search(rf"Successfully relayed message: from=<{re.escape(MAILBOX)}>, "
                     rf"size=\d+, id=\S+, nrcpt=3, reply=`250 ", upstream.dovecot.log())
    assert refusals(upstream.dovecot) == []


async def test_dovecot_demands_starttls_and_the_two_step_xoauth2_form(
        upstream: Upstream, relay: Relay) -> None:
    code, _ = await submit(relay, message("Through TLS"))
    assert code == 250 and len(upstream.sink.messages) == 1
    [login] = upstream.dovecot.logins()
    assert ", TLS," in login                        # the relay's session was encrypted
    token = upstream.entra.issued_tokens[-1]        # the token the relay logged in with
    payload = xoauth2(token)

    def probe() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtplib.SMTP(DOVECOT_HOST, upstream.dovecot.port, timeout=30) as c:
            c.ehlo("probe.test")
            seen["plain_features"] = dict(c.esmtp_features)
            seen["plain_auth"] = c.docmd("AUTH", "XOAUTH2")
            c.starttls(context=_tls(upstream.pki))
            c.ehlo("probe.test")
            seen["tls_auth_methods"] = c.esmtp_features.get("auth", "").split()
            seen["one_line"] = c.docmd("AUTH", f"XOAUTH2 {payload}")
        with smtplib.SMTP(DOVECOT_HOST, upstream.dovecot.port, timeout=30) as c:
            c.starttls(context=_tls(upstream.pki))
            c.ehlo("probe.test")
            seen["two_step"] = [c.docmd("AUTH", "XOAUTH2"), c.docmd(payload)]
        return seen

    seen = await asyncio.to_thread(probe)

    # Without TLS Dovecot offers STARTTLS but no AUTH, and refuses AUTH outright: the
    # relay's successful login above can only have come after STARTTLS.
    assert "starttls" in seen["plain_features"] and "auth" not in seen["plain_features"]
    assert seen["plain_auth"][0] == 530 and b"TLS required" in seen["plain_auth"][1]
    assert "XOAUTH2" in seen["tls_auth_methods"]
    # The token as an initial response makes an AUTH line too long for Dovecot; the same
    # token in the two-step form (what the relay sends) logs in.
    assert len(payload) > 1100
    assert seen["one_line"][0] == 500 and b"too long" in seen["one_line"][1].lower()
    assert [r[0] for r in seen["two_step"]] == [334, 235]


async def test_one_session_carries_several_messages_and_is_reopened_when_dovecot_ends_it(
        upstream: Upstream, relay: Relay) -> None:
    for i in range(3):
        code, text = await submit(relay, message(f"Batch {i}"))
        assert code == 250 and "delivered as" in text
    assert len(upstream.dovecot.logins()) == 1        # one XOAUTH2 login, three messages

    await asyncio.to_thread(upstream.dovecot.kick, MAILBOX)    # 421, then Dovecot closes
    await wait_until(lambda: "Disconnected: Shutting down" in upstream.dovecot.log(), within=5)
    code, text = await submit(relay, message("After the server ended the session"))

    assert code == 250 and "delivered as" in text
    assert len(upstream.sink.messages) == 4
    assert len(upstream.dovecot.logins()) == 2        # a new session, logged in again


async def test_a_recipient_refused_inside_a_pipelined_group_gets_nothing(
        upstream: Upstream, relay: Relay) -> None:
    """Dovecot offers PIPELINING, so the relay sends MAIL, the RCPTs and DATA in one go
    and reads the refusal of one recipient after Dovecot already said 354: the message
    goes to the others, once, and the refused one gets nothing."""
    upstream.sink.unknown.add("bob@example.net")
    features = await asyncio.to_thread(_features_after_tls, upstream)
    assert "pipelining" in features

    code, text = await submit(relay, message("Two of three"))

    assert code == 250 and "to some recipients" in text
    # (The sender's delivery report quotes the headers too: it goes to the mailbox.)
    [got] = [m for m in upstream.sink.messages
             if b"Subject: Two of three" in m.data and m.rcpt_tos != [MAILBOX]]
    assert sorted(got.rcpt_tos) == ["alice@example.com", "hidden@example.org"]
    assert re.search(r"nrcpt=2, reply=`250 ", upstream.dovecot.log())
    code, text = await submit(relay, message("Next one"), ["alice@example.com"])
    assert code == 250 and "delivered as" in text
    got_next = [m for m in upstream.sink.messages
                if b"Subject: Next one" in m.data and m.rcpt_tos != [MAILBOX]]
    assert len(got_next) == 1
    # Nothing reached the refused recipient; the sender heard of it (the relay's DSN).
    assert all("bob@example.net" not in m.rcpt_tos for m in upstream.sink.messages)
    await wait_until(lambda: any(m.rcpt_tos == [MAILBOX] for m in upstream.sink.messages),
                     within=10)


def _features_after_tls(upstream: Upstream) -> dict[str, str]:
    with smtplib.SMTP(DOVECOT_HOST, upstream.dovecot.port, timeout=30) as c:
        c.starttls(context=_tls(upstream.pki))
        c.ehlo("probe.test")
        return dict(c.esmtp_features)


async def test_no_token_goes_to_a_server_without_starttls(
        upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A second Dovecot, misconfigured: no TLS at all, XOAUTH2 offered and taken in clear.
    clear = Dovecot(upstream.pki, upstream.sink, tls=False)
    try:
        clear.publish_key(upstream.entra.kid, upstream.entra.public_key_pem)
        await asyncio.to_thread(clear.start)
        config = build_config({
            "credentials": {"main": {"authority": upstream.entra.url,
                                     "client_secret": {"value": upstream.secret},
                                     "ca_file": str(upstream.pki.ca_file)}},
            "upstreams": {"clear": {"host": DOVECOT_HOST, "port": clear.port,
                                    "tls": "starttls", "timeout": 15}},
            "profiles": {"system": {"upstream": "clear"}, "alice": {"upstream": "clear"}},
            "spool": {"directory": str(tmp_path / "spool"), "on_tmpfs": "warn"},
        })
        relay = Relay(config)
        await relay.start()
        try:
            code, text = await submit(relay, message("Not in clear"))
            tokens = upstream.entra.issued_tokens
        finally:
            await relay.stop()

        def clear_login(token: str) -> list[tuple[int, bytes]]:
            with smtplib.SMTP(DOVECOT_HOST, clear.port, timeout=30) as c:
                c.ehlo("probe.test")
                return [c.docmd("AUTH", "XOAUTH2"), c.docmd(xoauth2(token))]

        # The relay kept the message and said why; Dovecot never saw a login attempt ...
        assert code == 250 and "queued as" in text
        assert "does not offer STARTTLS" in caplog.text
        assert "XOAUTH2" not in clear.log() and refusals(clear) == []
        assert upstream.sink.messages == []
        # ... although it would have taken the relay's token in clear.
        assert [r[0] for r in await asyncio.to_thread(clear_login, tokens[-1])] == [334, 235]
    finally:
        clear.stop()


# --- a token Dovecot refuses ---------------------------------------------------------------

def _withhold_key(up: Upstream) -> Callable[[], None]:
    """Dovecot does not know the key the tokens are signed with (a key rollover that has
    not reached it yet); the fix publishes it."""
    up.dovecot.withdraw_key(up.entra.kid)
    return lambda: up.dovecot.publish_key(up.entra.kid, up.entra.public_key_pem)


def _expire_tokens(up: Upstream) -> Callable[[], None]:
    """Entra's clock two hours behind Dovecot's: by their exp claim the tokens expired an
    hour ago, though expires_in promises an hour. The fix sets the clock right."""
    up.entra_behind["seconds"] = 7200

    def fix() -> None:
        up.entra_behind["seconds"] = 0
    return fix


@pytest.mark.parametrize(("break_tokens", "dovecot_says"), [
    (_withhold_key, r"RS256 key '[0-9a-f]+' not found"),
    (_expire_tokens, r"Token has expired"),
], ids=["unknown-signing-key", "expired"])
async def test_refused_token_defers_the_message_until_dovecot_accepts_one(
        upstream: Upstream, relay: Relay, caplog: pytest.LogCaptureFixture,
        break_tokens: Callable[[Upstream], Callable[[], None]], dovecot_says: str) -> None:
    caplog.set_level(logging.INFO)
    fix = break_tokens(upstream)
    data = message("Kept until the login works")

    code, text = await submit(relay, data)

    # The waiting client is told the message is queued: never a 5xx, never a bounce.
    assert code == 250 and "queued as" in text, text
    mid = text.rsplit(" ", 1)[-1]
    # The relay asked for a fresh token once, was refused again, and deferred.
    rejected = [r.getMessage() for r in caplog.records
                if "upstream rejected a fresh token" in r.getMessage()]
    assert rejected and "535 5.7.8" in rejected[0]
    # Later attempts are refused too, for the same reason; the message waits meanwhile.
    await wait_until(lambda: len(refusals(upstream.dovecot)) >= 4, within=15)
    assert all(re.fullmatch(dovecot_says, why.split(": ", 1)[-1])
               for why in refusals(upstream.dovecot)), refusals(upstream.dovecot)
    located = relay.spool.locate(mid)
    assert located is not None and located[0] in (State.DEFERRED, State.ACTIVE)
    assert relay.spool.count(State.FAILED) == 0
    assert upstream.sink.messages == []

    fix()
    await wait_until(lambda: upstream.sink.messages, within=15)

    [got] = upstream.sink.messages                # the message itself, not a DSN
    assert got.mail_from == MAILBOX and sorted(got.rcpt_tos) == sorted(RCPTS)
    assert got.data.endswith(data)
    await wait_until(lambda: relay.spool.locate(mid) is None, within=5)
    assert relay.spool.count(State.FAILED) == 0
    assert len(upstream.dovecot.logins()) == 1
