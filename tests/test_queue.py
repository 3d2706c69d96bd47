"""The queue in a running relay: retries, Exchange-aware pacing, bounces, recovery."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.config import Delivery
from relay.core.message import DeliveryResult, Outbound
from relay.queue.settle import backoff
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import RelayFactory, address, build_config, wait_until

MESSAGE = b"From: app@contoso.com\r\nTo: a@example.com\r\nSubject: queued\r\n\r\nbody\r\n"

ASYNC = {"delivery": {"synchronous": None}}


async def send(relay: Relay, rcpts: list[str], sender: str = "app@contoso.com",
               data: bytes = MESSAGE) -> aiosmtplib.SMTPResponse:
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        return await client.data(data)


def queued(relay: Relay, state: State) -> list[str]:
    return sorted(relay.spool.names(state))


def settled(relay: Relay) -> bool:
    """No attempt running and nothing waiting: whatever a test's mail caused has happened
    (a DSN is spooled before the message it reports on leaves active/)."""
    return relay.queue.in_flight == 0 and not any(
        queued(relay, s) for s in (State.INCOMING, State.ACTIVE, State.DEFERRED))


def reported(dsn: bytes) -> list[str]:
    """The recipients a DSN reports on, from its machine-readable part."""
    report = message_from_bytes(dsn, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    _, status, _ = report.iter_parts()
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [str(b["Final-Recipient"]).removeprefix("rfc822; ") for b in blocks[1:]]


def human_part(dsn: bytes) -> str:
    report = message_from_bytes(dsn, policy=policy.default)
    assert isinstance(report, EmailMessage)
    human = next(report.iter_parts())
    assert isinstance(human, EmailMessage) and human.get_content_type() == "text/plain"
    return str(human.get_content())


async def test_answer_is_250_queued_and_delivery_follows(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    response = await send(relay, ["a@example.com"])
    assert response.code == 250 and "queued as" in response.message
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    # Metadata goes first, then the data file: wait for both, or the check races the remove.
    data = relay.spool.root.joinpath("data")
    await wait_until(lambda: sum(relay.spool.count(s) for s in State) == 0
                     and not any(data.iterdir()))


async def test_connection_dropped_mid_data_is_retried(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    sandbox.exchange.drop_next("data")
    await send(relay, ["a@example.com"])
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    assert sandbox.exchange.messages[0].data.endswith(b"body\r\n")


async def test_throttling_432_slows_the_mailbox_without_losing_mail(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    sandbox.exchange.fail_next("mail", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread "
                                            "limit exceeded", count=3)
    for i in range(10):
        await send(relay, [f"r{i}@example.com"])
    await wait_until(lambda: len(sandbox.exchange.messages) == 10, within=20)
    snap = relay.queue.governor.snapshot("relay@contoso.com", time.time())
    assert snap["limit"] < 3                      # concurrency lowered for the cooldown
    assert sorted(m.rcpt_tos[0] for m in sandbox.exchange.messages) == sorted(
        f"r{i}@example.com" for i in range(10))
    assert queued(relay, State.FAILED) == []


async def test_submission_quota_pauses_only_that_mailbox(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({**ASYNC, "routing": {"rules": [
        {"sender": "alice@contoso.com", "profile": "alice"}]}})
    sandbox.exchange.fail_next("data", 554, "5.2.0 STOREDRV.Submission.Exception:"
                                            "SubmissionQuotaExceededException; Failed to "
                                            "process message due to a permanent exception")
    await send(relay, ["a@example.com"])
    await wait_until(lambda: len(queued(relay, State.DEFERRED)) == 1)
    [name] = queued(relay, State.DEFERRED)
    entry = relay.spool.read(State.DEFERRED, name)
    assert entry.next_attempt > time.time() + 1800   # paused, not bounced, not retried soon
    assert "SubmissionQuotaExceeded" in str(entry.last_reply)
    # More mail for the paused mailbox waits; another mailbox is not affected.
    await send(relay, ["b@example.com"])
    await send(relay, ["c@example.com"], sender="alice@contoso.com",
               data=MESSAGE.replace(b"app@", b"alice@"))
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    assert sandbox.exchange.messages[0].mailbox == "alice@contoso.com"
    await wait_until(lambda: len(queued(relay, State.DEFERRED)) == 2)
    assert queued(relay, State.FAILED) == []


async def test_a_quota_pause_survives_a_restart(sandbox: Sandbox) -> None:
    """Exchange's 24-hour window does not restart with the relay: neither does the pause."""
    config = build_config(ASYNC)
    first = Relay(sandbox.apply(config))
    await first.start()
    sandbox.exchange.fail_next("data", 554, "5.2.0 STOREDRV.Submission.Exception:"
                                            "SubmissionQuotaExceededException")
    await send(first, ["a@example.com"])
    await wait_until(lambda: len(queued(first, State.DEFERRED)) == 1)
    await first.stop()
    assert (first.spool.root / "governor.json").exists()

    second = Relay(sandbox.apply(config))
    await second.start()
    try:
        await send(second, ["b@example.com"])
        await wait_until(lambda: len(queued(second, State.DEFERRED)) == 2)
        [paused] = [n for n in queued(second, State.DEFERRED)
                    if second.spool.read(State.DEFERRED, n).rcpt_tos == ["b@example.com"]]
        entry = second.spool.read(State.DEFERRED, paused)
        assert entry.attempts == 0                  # held back, never offered to Exchange
        assert entry.next_attempt > time.time() + 1800
        assert sandbox.exchange.messages == []
    finally:
        await second.stop()


async def test_messages_per_minute_are_paced_not_refused(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({**ASYNC, "delivery": {
        "synchronous": None, "mailbox_limits": {"messages_per_minute": 2}}})
    for i in range(4):
        response = await send(relay, [f"r{i}@example.com"])
        assert response.code == 250
    await wait_until(lambda: len(sandbox.exchange.messages) == 2)
    await wait_until(lambda: len(queued(relay, State.DEFERRED)) == 2)
    for name in queued(relay, State.DEFERRED):
        entry = relay.spool.read(State.DEFERRED, name)
        assert entry.attempts == 0                # waiting for its turn, not failed
        assert entry.next_attempt > time.time() + 10


async def test_lifetime_expiry_sends_a_dsn(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": {"synchronous": None, "max_lifetime": "1s",
                                            "retry_initial": "0.3s"}})
    sandbox.exchange.fail_next("rcpt", 451, "4.4.0 Temporary failure, try later", count=1000,
                               recipient="slow@example.com")
    await send(relay, ["slow@example.com"], sender="app@contoso.com")
    await wait_until(lambda: len(queued(relay, State.FAILED)) == 1, within=15)
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    dsn = sandbox.exchange.messages[0]
    assert dsn.rcpt_tos == ["app@contoso.com"]
    report = message_from_bytes(dsn.data, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "gave up after" in dsn.data.decode()
    assert b"slow@example.com" in dsn.data and b"Action: failed" in dsn.data


async def test_bounce_to_operator_and_none(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": {"synchronous": None, "bounce": "operator",
                                            "operator": "postmaster@contoso.com"}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    await send(relay, ["gone@example.com"])
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    assert sandbox.exchange.messages[0].rcpt_tos == ["postmaster@contoso.com"]


async def test_a_bounce_is_never_bounced(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="app@contoso.com")
    await send(relay, ["gone@example.com"])
    await wait_until(lambda: len(queued(relay, State.FAILED)) == 2)
    assert sandbox.exchange.messages == []        # the DSN failed too, and stopped there


async def test_synchronous_permanent_refusal_queues_nothing(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": {"synchronous": 5}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    try:
        await send(relay, ["gone@example.com"])
        raise AssertionError("expected a 5xx")
    except aiosmtplib.SMTPDataError as err:
        assert err.code == 550 and "5.1.1" in err.message
    assert sum(relay.spool.count(s) for s in State) == 0
    assert list(relay.spool.root.joinpath("data").iterdir()) == []


async def test_restart_delivers_what_was_queued(sandbox: Sandbox) -> None:
    config = build_config(ASYNC)
    await sandbox.exchange.stop()
    first = Relay(sandbox.apply(config))
    await first.start()
    await send(first, ["a@example.com"])
    await wait_until(lambda: len(queued(first, State.DEFERRED)) == 1)
    await first.stop()

    await sandbox.exchange.start()                # back, on a new port
    second = Relay(sandbox.apply(config))
    await second.start()
    try:
        second.queue.flush()
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    finally:
        await second.stop()


# One relay per case: relays may not share a spool (Spool.claim), and the sandbox has one.
@pytest.mark.parametrize(("where", "overrides"), [
    # No waiting by default, but the profile asks for it: its client sees the 5xx.
    ("profile", {"profiles": {"system": {"synchronous": 5}}}),
    # A listener that waits: same verdict for its clients.
    ("listener", {"server": {"listeners": [
        {"address": "127.0.0.1", "port": 0, "synchronous": 5}]}}),
    # Neither: the answer is 250 at once and the refusal becomes a DSN.
    ("neither", {}),
])
async def test_synchronous_per_listener_and_per_profile(
        start_relay: RelayFactory, sandbox: Sandbox, where: str,
        overrides: dict[str, Any]) -> None:
    relay = await start_relay({"delivery": {"synchronous": None}, **overrides})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    if where == "neither":
        response = await send(relay, ["gone@example.com"])
        assert response.code == 250 and "queued as" in response.message
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
        assert reported(sandbox.exchange.messages[0].data) == ["gone@example.com"]
        return
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, ["gone@example.com"])
    assert err.value.code == 550
    assert sum(relay.spool.count(s) for s in State) == 0      # the client owns the failure


# --- a client whose wait ran out -----------------------------------------------------------

async def test_wait_expiry_then_permanent_refusal_sends_a_dsn(
        start_relay: RelayFactory, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = await start_relay({"delivery": {"synchronous": "0.3s"}})
    gate = asyncio.Event()
    deliver = relay.deliverer.deliver

    async def held(msg: Outbound, **kwargs: Any) -> DeliveryResult:
        await gate.wait()                       # the upstream is slower than the client waits
        return await deliver(msg, **kwargs)

    monkeypatch.setattr(relay.deliverer, "deliver", held)
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    response = await send(relay, ["gone@example.com"])
    assert response.code == 250 and "queued as" in response.message
    assert relay.queue.in_flight == 1           # the attempt outlived the client's wait
    gate.set()
    # The client was told 250, so the refusal can only reach the sender as a DSN.
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    dsn = sandbox.exchange.messages[0]
    assert dsn.rcpt_tos == ["app@contoso.com"]
    assert reported(dsn.data) == ["gone@example.com"]
    await wait_until(lambda: settled(relay))
    [name] = queued(relay, State.FAILED)        # and the message is kept, not deleted
    assert "gone@example.com" in relay.spool.read(State.FAILED, name).failed


# --- bounces that must not happen ----------------------------------------------------------

OPERATOR = {"synchronous": None, "bounce": "operator", "operator": "postmaster@contoso.com"}


async def test_a_failed_dsn_to_the_operator_is_not_bounced_again(
        start_relay: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.queue")
    relay = await start_relay({"delivery": OPERATOR})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", count=1000,
                               recipient="postmaster@contoso.com")
    await send(relay, ["gone@example.com"])
    await wait_until(lambda: len(queued(relay, State.FAILED)) == 2)
    await wait_until(lambda: settled(relay), within=5)   # a DSN loop never settles
    assert len(queued(relay, State.FAILED)) == 2 and sandbox.exchange.messages == []
    [dsn_id] = [e.id for e in (relay.spool.read(State.FAILED, n)
                               for n in queued(relay, State.FAILED))
                if e.rcpt_tos == ["postmaster@contoso.com"]]
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "no bounce" in r.getMessage() and dsn_id in r.getMessage()]


@pytest.mark.parametrize(("sender", "extra_header"), [
    ("", b""),                                              # MAIL FROM:<>
    ("app@contoso.com", b"Auto-Submitted: auto-replied\r\n"),  # a vacation reply
])
async def test_reports_and_null_sender_mail_never_get_a_dsn(
        start_relay: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
        sender: str, extra_header: bytes) -> None:
    caplog.set_level(logging.WARNING, logger="relay.queue")
    relay = await start_relay({"delivery": OPERATOR})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    await send(relay, ["gone@example.com"], sender=sender, data=extra_header + MESSAGE)
    await wait_until(lambda: len(queued(relay, State.FAILED)) == 1)
    await wait_until(lambda: settled(relay))
    assert sandbox.exchange.messages == []                 # not even to the operator
    [name] = queued(relay, State.FAILED)
    assert any("no bounce" in r.getMessage() and relay.spool.id_from_name(name) in
               r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_bounce_none_sends_no_dsn(
        start_relay: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.queue")
    relay = await start_relay({"delivery": {"synchronous": None, "bounce": "none"}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    await send(relay, ["gone@example.com"])
    await wait_until(lambda: len(queued(relay, State.FAILED)) == 1)
    await wait_until(lambda: settled(relay))
    assert sandbox.exchange.messages == []
    assert relay.spool.count(State.FAILED) == 1            # the dead letter is kept
    assert "bounce suppressed" in caplog.text and "gone@example.com" in caplog.text


async def test_persistent_535_defers_and_alerts_never_bounces(
        start_relay: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    relay = await start_relay({"delivery": {"retry_initial": "1h", "retry_max": "1h"}})
    sandbox.exchange.fail_next("auth", 535, "5.7.3 Authentication unsuccessful", count=1000)
    response = await send(relay, ["a@example.com"])   # the client waits for the attempt...
    assert response.code == 250 and "queued as" in response.message   # ...and keeps no 5xx
    assert sandbox.exchange.auth_failed == 2          # the token was refreshed once, in vain
    [name] = queued(relay, State.DEFERRED)
    entry = relay.spool.read(State.DEFERRED, name)
    assert entry.failed == {} and entry.attempts == 1
    assert entry.last_reply is not None and "535 5.7.3" in str(entry.last_reply)
    assert entry.next_attempt <= time.time() + 3600   # within retry_max
    assert queued(relay, State.FAILED) == [] and sandbox.exchange.messages == []
    alerts = [r for r in caplog.records if r.name == "relay.queue.attempt"
              and r.levelno == logging.ERROR and "New-ServicePrincipal" in r.getMessage()]
    assert alerts, caplog.text


# --- per-recipient outcomes ----------------------------------------------------------------

SLOW_RETRY = {"synchronous": None, "retry_initial": "1h", "retry_max": "1h"}


async def test_partial_acceptance_retries_only_the_deferred_recipient(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay({"delivery": SLOW_RETRY})
    sandbox.exchange.fail_next("rcpt", 451, "4.4.0 Temporary failure, try later",
                               recipient="slow@example.com")
    await send(relay, ["ok@example.com", "slow@example.com"])
    await wait_until(lambda: len(queued(relay, State.DEFERRED)) == 1)
    assert [m.rcpt_tos for m in sandbox.exchange.messages] == [["ok@example.com"]]
    [name] = queued(relay, State.DEFERRED)
    entry = relay.spool.read(State.DEFERRED, name)
    assert entry.delivered == ["ok@example.com"] and entry.failed == {}

    relay.queue.flush()
    await wait_until(lambda: len(sandbox.exchange.messages) == 2)
    await wait_until(lambda: settled(relay))
    assert [m.rcpt_tos for m in sandbox.exchange.messages] == [
        ["ok@example.com"], ["slow@example.com"]]             # ok@ got it exactly once
    assert sum(relay.spool.count(s) for s in State) == 0       # done, and no DSN


@pytest.mark.parametrize("second", ["refused", "delivered"])
async def test_refused_recipients_are_reported_at_once_and_only_once(
        start_relay: RelayFactory, sandbox: Sandbox, second: str) -> None:
    relay = await start_relay({"delivery": SLOW_RETRY})
    exchange = sandbox.exchange
    exchange.fail_next("rcpt", 550, "5.1.1 User unknown", recipient="gone@example.com")
    exchange.fail_next("rcpt", 451, "4.4.0 Temporary failure, try later",
                       recipient="slow@example.com")
    if second == "refused":
        exchange.fail_next("rcpt", 550, "5.1.10 RecipientNotFound", recipient="slow@example.com")
    await send(relay, ["gone@example.com", "slow@example.com"])

    # First attempt: gone@ is refused, slow@ deferred. The sender hears about gone@ now,
    # not when slow@ is finally done (up to max_lifetime later).
    await wait_until(lambda: len(exchange.messages) == 1)
    first = exchange.messages[0]
    assert first.rcpt_tos == ["app@contoso.com"]
    assert reported(first.data) == ["gone@example.com"]
    await wait_until(lambda: relay.queue.in_flight == 0)
    [name] = queued(relay, State.DEFERRED)
    entry = relay.spool.read(State.DEFERRED, name)      # the report is recorded on disk
    assert list(entry.failed) == ["gone@example.com"] and entry.delivered == []

    relay.queue.flush()
    await wait_until(lambda: len(exchange.messages) == 2)
    await wait_until(lambda: settled(relay))
    latest = exchange.messages[1]
    if second == "refused":
        # A second DSN, for slow@ only: gone@ is not reported twice.
        assert latest.rcpt_tos == ["app@contoso.com"]
        assert reported(latest.data) == ["slow@example.com"]
    else:
        assert latest.rcpt_tos == ["slow@example.com"]     # the original; no further DSN
    assert len(exchange.messages) == 2
    [name] = queued(relay, State.FAILED)
    assert sorted(relay.spool.read(State.FAILED, name).failed) == (
        ["gone@example.com", "slow@example.com"] if second == "refused"
        else ["gone@example.com"])


# --- SendAsDenied: the missing permission reaches the sender -------------------------------

SEND_AS_DENIED = ("5.2.252 SendAsDenied; relay@contoso.com not allowed to send as "
                  "app@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException."
                  "MapiExceptionSendAsDenied")


def secrets_of(relay: Relay) -> list[str]:
    """What must never reach a client or a DSN: credentials and their identifiers."""
    out = ["Bearer", "-Trustee"]
    for cred in relay.config.credentials.values():
        out += [cred.tenant_id, cred.client_id]
        if cred.client_secret is not None and cred.client_secret.value:
            out.append(cred.client_secret.value)
    return out


async def test_send_as_denied_names_the_permission_to_a_waiting_client(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay()
    sandbox.exchange.fail_next("data", 554, SEND_AS_DENIED)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await send(relay, ["a@example.com"])
    assert err.value.code == 554
    assert SEND_AS_DENIED in err.value.message                 # the upstream's own words
    assert "Add-RecipientPermission" in err.value.message and "send_as" in err.value.message
    assert "relay@contoso.com lacks Send As permission for app@contoso.com" in err.value.message
    for secret in secrets_of(relay):
        assert secret not in err.value.message


async def test_send_as_denied_names_the_permission_in_the_dsn(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    sandbox.exchange.fail_next("data", 554, SEND_AS_DENIED)
    await send(relay, ["a@example.com"])
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    dsn = sandbox.exchange.messages[0]
    text = " ".join(human_part(dsn.data).split())
    assert "SendAsDenied; relay@contoso.com not allowed to send as app@contoso.com" in text
    assert "Add-RecipientPermission" in text and "send_as" in text
    for secret in secrets_of(relay):
        assert secret.encode() not in dsn.data


# --- retry schedule ------------------------------------------------------------------------

def test_backoff_schedule_with_the_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Delivery()
    assert (d.retry_initial, d.retry_max) == (60.0, 3600.0)   # 1 min, doubling, to 1 h
    steps = [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600]

    def schedule() -> list[float]:
        return [backoff(n, d.retry_initial, d.retry_max) for n in range(1, len(steps) + 1)]

    monkeypatch.setattr(random, "uniform", lambda a, b: min(a, b))
    assert schedule() == pytest.approx([0.8 * s for s in steps])
    monkeypatch.setattr(random, "uniform", lambda a, b: max(a, b))
    assert schedule() == pytest.approx([60 * 1.2, 120 * 1.2, 240 * 1.2, 480 * 1.2, 960 * 1.2,
                                        1920 * 1.2, 3600, 3600, 3600, 3600])
    monkeypatch.undo()

    for n, step in enumerate(steps, start=1):
        got = [backoff(n, d.retry_initial, d.retry_max) for _ in range(300)]
        assert 0.8 * step <= min(got) and max(got) <= min(1.2 * step, d.retry_max)
        assert max(got) - min(got) > 0.1 * step      # spread out, also once capped
    assert backoff(100, d.retry_initial, d.retry_max) <= d.retry_max   # no overflow either
