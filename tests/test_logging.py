"""What the relay writes to its log, as an operator's log shipper would receive it.

A relay runs end to end at DEBUG, with the real handler and formatter from
``setup_logging`` writing into a buffer, in text and in JSON, through everything that
handles secrets: AUTH PLAIN and LOGIN (good and bad passwords), token fetches, a token
refresh after Exchange rejected the cached one, Entra ID errors and upstream failures.
Then the whole output is searched for every secret that went by. The formatter's
scrubber (relay.core.log.redact) is only the last line of defence: a ``[REDACTED]`` in the
output means some code path tried to log a secret, which fails the test as well.

The JSON run also checks that every message-stage line carries its fields as keys.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.core.log import _NOISY, JsonFormatter, TextFormatter, setup_logging
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import PASSWORDS, address, build_config, wait_until

WRONG_PASSWORD = "not-the-password-Q7x"
BAD_SECRET_REPLY = {"error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. "
                                         "Trace ID: 1 Correlation ID: 2",
                    "error_codes": [7000215]}
STAGE_FIELDS = {"client", "profile", "mailbox", "rcpts", "reply", "duration"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR)\s+"
                       r"[\w.]+ \[[-0-9A-F]+\] ")


@pytest.fixture
def capture_logs() -> Iterator[Callable[[str], io.StringIO]]:
    """``setup_logging('debug', fmt)`` onto a buffer; the logging set-up is restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in (*_NOISY, "msal")}

    def capture(fmt: str) -> io.StringIO:
        buffer = io.StringIO()
        stderr, sys.stderr = sys.stderr, buffer
        try:
            setup_logging("debug", fmt)
        finally:
            sys.stderr = stderr
        return buffer

    yield capture
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


async def session(relay: Relay, login: tuple[str, str, str] | None,
                  rcpts: list[str], sender: str = "app@contoso.com") -> str:
    """One message (after AUTH ``mechanism`` when ``login`` is given); the final reply."""
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        if login is not None:
            await client.ehlo()
            mechanism, user, password = login
            await (client.auth_plain if mechanism == "PLAIN" else client.auth_login)(
                user, password)
        data = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: test\r\n\r\n"
                "body\r\n").encode()
        try:
            await client.sendmail(sender, rcpts, data)
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        return "250"


async def refused_login(relay: Relay, mechanism: str, user: str) -> None:
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        await client.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await (client.auth_plain if mechanism == "PLAIN" else client.auth_login)(
                user, WRONG_PASSWORD)


async def drained(relay: Relay) -> None:
    """Wait until every message is delivered or failed, so the next fault meets the
    next message, not a retry."""
    queued = (State.INCOMING, State.ACTIVE, State.DEFERRED)
    await wait_until(lambda: all(relay.spool.count(s) == 0 for s in queued), within=20)


async def exercise(relay: Relay, sandbox: Sandbox) -> None:
    """Everything that handles a secret, with the relay's own retries played out."""
    entra, exchange = sandbox.entra, sandbox.exchange
    alice = ("PLAIN", "alice", PASSWORDS["alice"])
    bob = ("LOGIN", "bob", PASSWORDS["bob"])
    await refused_login(relay, "PLAIN", "alice")
    await refused_login(relay, "LOGIN", "bob")
    assert await session(relay, alice, ["a@example.com"], "alice@contoso.com") == "250"
    assert await session(relay, bob, ["b@example.com"]) == "250"
    # The cached token stops working: 535 upstream, a new token, the message goes out.
    requests = entra.token_requests
    entra.revoke_all()
    await exchange.disconnect_all()
    assert await session(relay, bob, ["c@example.com"]) == "250"
    assert entra.token_requests > requests
    # ... and now Entra ID refuses the secret, then fails: deferred, retried, delivered.
    entra.revoke_all()
    await exchange.disconnect_all()
    entra.fail_next(400, count=2, body=BAD_SECRET_REPLY)
    entra.fail_next(500, count=1, retry_after=0)
    assert await session(relay, alice, ["d@example.com"], "alice@contoso.com") == "250"
    await drained(relay)
    # Upstream failures: a refused recipient (bounce), a temporary DATA failure, a
    # dropped connection during AUTH, a 535 for a token Exchange says it does not like,
    # and a permanent refusal the waiting client is told about.
    exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="nobody@example.com")
    assert await session(relay, None, ["e@example.com", "nobody@example.com"]) == "250"
    await drained(relay)
    exchange.fail_next("data", 451, "4.3.0 Temporary server error")
    assert await session(relay, None, ["f@example.com"]) == "250"
    await drained(relay)
    await exchange.disconnect_all()
    exchange.drop_next("auth")
    assert await session(relay, None, ["g@example.com"]) == "250"
    await drained(relay)
    await exchange.disconnect_all()
    exchange.fail_next("auth", 535, "5.7.3 Authentication unsuccessful")
    assert await session(relay, None, ["h@example.com"]) == "250"
    exchange.fail_next("data", 554, "5.2.252 SendAsDenied; app@contoso.com not allowed")
    assert (await session(relay, None, ["i@example.com"])).startswith("554")
    await drained(relay)


def secrets_seen(relay: Relay, sandbox: Sandbox) -> dict[str, str]:
    """Every secret that went by, by a name for the failure message."""
    found: dict[str, str] = {}
    for user, password in (*PASSWORDS.items(), ("wrong", WRONG_PASSWORD)):
        found[f"password of {user}"] = password
        found[f"AUTH LOGIN password of {user}"] = b64(password)
        found[f"AUTH PLAIN payload of {user}"] = b64(f"\0{user}\0{password}")
    found["AUTH PLAIN payload, wrong password"] = b64(f"\0alice\0{WRONG_PASSWORD}")
    secret = relay.config.credentials["main"].client_secret
    assert secret is not None and secret.value
    found["client secret"] = secret.value
    tokens = sandbox.entra.issued_tokens
    assert len(tokens) >= 3                       # first, after the 535, after the outage
    mailboxes = {p.mailbox for p in relay.config.profiles.values()}
    for i, token in enumerate(tokens):
        found[f"token {i}"] = token
        for j, part in enumerate(token.split(".")):
            found[f"token {i} part {j}"] = part
        for mailbox in mailboxes:
            found[f"XOAUTH2 payload {i} for {mailbox}"] = b64(
                f"user={mailbox}\x01auth=Bearer {token}\x01\x01")
    return found


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_secret_reaches_the_log(fmt: str, sandbox: Sandbox,
                                         capture_logs: Callable[[str], io.StringIO]) -> None:
    buffer = capture_logs(fmt)
    relay = Relay(sandbox.apply(build_config({"http": {"port": 0}})))
    await relay.start()
    try:
        await exercise(relay, sandbox)
    finally:
        await relay.stop()
    output = buffer.getvalue()
    lines = output.splitlines()
    assert len(lines) > 50

    leaks = [name for name, value in secrets_seen(relay, sandbox).items() if value in output]
    assert leaks == []
    assert "[REDACTED]" not in output         # nothing even relied on the scrubber
    assert "Bearer" not in output

    # The run did what it claims: each secret-handling path left its (harmless) trace.
    for expected in ("AUTH PLAIN ok", "AUTH LOGIN ok", "AUTH PLAIN failed",
                     "AUTH LOGIN failed", "token for credential main acquired",
                     "upstream rejected the token", "the client secret is wrong",
                     "answered with HTTP 500", "failed: <nobody@example.com> (550 5.1.1 User",
                     "4.3.0 Temporary server error", "closed the connection during AUTH",
                     "attempt 1 deferred", "attempt 1 refused", "bounced", "delivered"):
        assert expected in output, expected

    if fmt == "text":
        # One line per record; only a traceback (at DEBUG) continues over several.
        in_traceback = False
        for line in lines:
            if TEXT_LINE.match(line):
                in_traceback = False
            elif line.startswith("Traceback"):
                in_traceback = True
            else:
                assert in_traceback, line
        return
    records = [json.loads(ln) for ln in lines]           # every line is one JSON object
    stages = [r for r in records if r.get("event") in
              ("received", "delivered", "deferred", "bounced", "refused")]
    assert {r["event"] for r in stages} == {"received", "delivered", "deferred", "bounced",
                                            "refused"}
    for record in stages:
        missing = STAGE_FIELDS - record.keys()
        assert not missing, (missing, record)
        assert re.fullmatch(r"[0-9A-F]{12}", record["msgid"]), record
        assert isinstance(record["rcpts"], int) and isinstance(record["duration"], float)
        assert record["client"] == "127.0.0.1" or record["event"] != "received"
    received = [r for r in stages if r["event"] == "received"]
    assert {r["user"] for r in received} >= {"alice", "bob", None}
    assert all(r["reply"].startswith(("250", "554")) for r in received)
    attempts: dict[str, Any] = {r["msgid"]: r for r in stages if r["event"] == "delivered"}
    assert all(r["pending"] == 0 and r["delivered"] >= 1 for r in attempts.values())


# --- the same spelling everywhere --------------------------------------------------------

USER_IN_TEXT = re.compile(r" user=(-|'[^']*')(?: |$)")


async def commands(relay: Relay, *lines: bytes) -> list[tuple[int, str]]:
    """Each line as a command on one connection, in turn; the replies."""
    host, port = address(relay)
    replies = []
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        await client.ehlo()
        for line in lines:
            response = await client.execute_command(line)
            replies.append((response.code, response.message))
    return replies


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_every_line_spells_the_user_one_way(
        fmt: str, start_relay: Callable[..., Any],
        capture_logs: Callable[[str], io.StringIO]) -> None:
    buffer = capture_logs(fmt)
    relay = await start_relay({"server": {"max_auth_failures": 3}})
    # A wrong password, a login answer too long to read a name from, then a third failure
    # that closes the connection; then mail without a login and with one.
    assert await commands(relay, f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'x')}".encode(),
                          b"AUTH LOGIN", b"A" * 3000,
                          f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + 'y')}".encode()) == [
        (535, "5.7.8 Authentication credentials invalid"), (334, b64("Username:")),
        (500, "5.5.6 Authentication exchange line is too long"),
        (421, "4.7.0 Too many authentication failures")]
    assert await session(relay, None, ["a@example.com"]) == "250"
    assert await session(relay, ("PLAIN", "bob", PASSWORDS["bob"]), ["b@example.com"]) == "250"
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("app@contoso.com", ["c@example.com"],
                                  b"Subject: a NUL\r\n\r\n\0\r\n")
    assert refused.value.code == 554

    lines = buffer.getvalue().splitlines()
    if fmt == "text":
        texts = [line.split("] ", 1)[1] for line in lines if TEXT_LINE.match(line)]
    else:
        records = [json.loads(line) for line in lines]
        texts = [r["msg"] for r in records]
    with_user = [t for t in texts if " user=" in t]
    assert [t for t in with_user if not USER_IN_TEXT.search(t)] == []
    assert [t for t in with_user if "AUTH" in t] == [
        "AUTH PLAIN failed: client=127.0.0.1 user='alice'",
        "AUTH LOGIN failed: client=127.0.0.1 user=- reason=answer line too long",
        "AUTH PLAIN failed: client=127.0.0.1 user='bob'",
        "too many AUTH failures, closing: client=127.0.0.1 user='bob' failures=3",
        "AUTH PLAIN ok: client=127.0.0.1 user='bob'"]
    received = [t for t in with_user if t.startswith("message: ")]
    assert [m.group(1) for t in received if (m := USER_IN_TEXT.search(t))] == ["-", "'bob'"]
    assert [t.split(" sender=")[0] for t in with_user if t.startswith("message refused")] == [
        "message refused: client=127.0.0.1 user=-"]
    if fmt == "text":
        return
    # JSON: the same user in its "user" field (null for "-"), and every AUTH line, failed
    # or not, names the client and the user.
    for record in records:
        m = USER_IN_TEXT.search(record["msg"])
        if m is not None:
            assert record["user"] == (None if m.group(1) == "-" else m.group(1)[1:-1]), record
        if "AUTH" in record["msg"]:
            assert record["client"] == "127.0.0.1" and "user" in record, record
    assert [r["event"] for r in records if "AUTH" in r["msg"]] == [
        "auth_failed", "auth_failed", "auth_failed", "auth_closed", "auth_ok"]
    # The message lines' senders, as their text names them: sent as the mailbox, from
    # the application's envelope sender and From.
    assert [(r["sender"], r["original_sender"], r["original_from"]) for r in records
            if r.get("event") == "received"] == [
        ("relay@contoso.com", "app@contoso.com", "app@contoso.com")] * 2
    assert all(" from=<relay@contoso.com> original_sender=<app@contoso.com> "
               "original_from=<app@contoso.com> " in t for t in received)


async def test_the_log_names_the_reply_the_client_got(
        sandbox: Sandbox, start_relay: Callable[..., Any],
        capture_logs: Callable[[str], io.StringIO]) -> None:
    # The client waits for the first attempt (delivery.synchronous), and the upstream's
    # refusal, which has no enhanced status code, reaches it with one.
    buffer = capture_logs("text")
    relay = await start_relay()
    sandbox.exchange.fail_next("data", 500, "Line too long (see RFC5321 4.5.3.1.6)")
    got = await session(relay, None, ["a@example.com"])
    m = re.fullmatch(r"500 5\.5\.2 Line too long \(see RFC5321 4\.5\.3\.1\.6\) "
                     r"\(id ([0-9A-F]{12})\)", got)
    assert m, got
    logged = [line.split("] ", 1)[1] for line in buffer.getvalue().splitlines()
              if f"[{m.group(1)}] message: " in line]
    assert len(logged) == 1
    assert logged[0].startswith("message: client=127.0.0.1 user=- profile=system ")
    assert f" reply={got} (" in logged[0]


def test_both_formats_stamp_each_line_with_its_own_utc_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The text of a second is reused for the lines within it, never for the next one,
    and is UTC whatever the machine's time zone."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        stamps = []
        for created in (1_800_000_000.25, 1_800_000_000.999, 1_800_000_001.0, 86_399.5):
            record = logging.LogRecord("relay", logging.INFO, "", 0, "x", None, None)
            record.created, record.msecs = created, (created % 1) * 1000
            record.msgid = "-"
            text = TextFormatter().format(record)
            data = json.loads(JsonFormatter().format(record))
            assert text.startswith(data["ts"] + " INFO")
            stamps.append(data["ts"])
        assert stamps == ["2027-01-15T08:00:00.250Z", "2027-01-15T08:00:00.999Z",
                          "2027-01-15T08:00:01.000Z", "1970-01-01T23:59:59.500Z"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
