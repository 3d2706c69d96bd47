"""The queue in a running relay: retries, Exchange-aware pacing, bounces, recovery."""

from __future__ import annotations

import time
from email import message_from_bytes, policy

import aiosmtplib

from relay.app import Relay
from relay.sandbox.service import Sandbox
from relay.spool import State
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


async def test_answer_is_250_queued_and_delivery_follows(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(ASYNC)
    response = await send(relay, ["a@example.com"])
    assert response.code == 250 and "queued as" in response.message
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    await wait_until(lambda: sum(relay.spool.count(s) for s in State) == 0)
    assert list(relay.spool.root.joinpath("data").iterdir()) == []


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
    assert "SubmissionQuotaExceeded" in (entry.last_reply or "")
    # More mail for the paused mailbox waits; another mailbox is not affected.
    await send(relay, ["b@example.com"])
    await send(relay, ["c@example.com"], sender="alice@contoso.com",
               data=MESSAGE.replace(b"app@", b"alice@"))
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    assert sandbox.exchange.messages[0].mailbox == "alice@contoso.com"
    await wait_until(lambda: len(queued(relay, State.DEFERRED)) == 2)
    assert queued(relay, State.FAILED) == []


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


async def test_synchronous_per_listener_and_per_profile(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    # No waiting by default, but the profile asks for it: its client sees the 5xx.
    relay = await start_relay({"delivery": {"synchronous": None},
                               "profiles": {"system": {"synchronous": 5}}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    try:
        await send(relay, ["gone@example.com"])
        raise AssertionError("expected a 5xx")
    except aiosmtplib.SMTPDataError as err:
        assert err.code == 550
    # A listener that waits: same verdict for its clients.
    relay2 = await start_relay({"delivery": {"synchronous": None}, "server": {
        "listeners": [{"address": "127.0.0.1", "port": 0, "synchronous": 5}]}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    try:
        await send(relay2, ["gone@example.com"])
        raise AssertionError("expected a 5xx")
    except aiosmtplib.SMTPDataError as err:
        assert err.code == 550
    # Neither: the answer is 250 at once and the refusal becomes a DSN.
    relay3 = await start_relay({"delivery": {"synchronous": None}})
    sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
    response = await send(relay3, ["gone@example.com"])
    assert response.code == 250 and "queued as" in response.message
