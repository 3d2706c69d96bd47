"""Hostile clients over real loopback sockets: password guessing, connection hogging, and
AUTH on a relay without accounts.

The receiver runs on a clock the test moves (penalties, lockouts and the refusal log read
it), while the delays before failure replies are real but a few milliseconds long. Other
addresses on 127.0.0.0/8 play other machines (Linux routes the whole block to loopback).
The bookkeeping itself is tested to the second in tests/test_guard.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.accept.route import Router
from relay.config import Config
from relay.receive.passwords import PasswordVerifier
from relay.receive.server import Receiver
from tests.conftest import PASSWORDS, build_config
from tests.test_guard import Clock
from tests.test_receive import (  # noqa: F401  (_close_clients: autouse fixture)
    REFUSED_NETWORK,
    SYSTEM,
    Client,
    FakeSubmit,
    _close_clients,
    b64,
    make_receiver,
    plain,
    until,
)

LOCKED_OUT = (454, "4.7.0 Too many authentication failures, try again later")
CLOSING = (421, "4.7.0 Too many authentication failures")
WRONG = "Wr0ng-guess-0815"


class CountingVerifier(PasswordVerifier):
    """The real verifier, counting how many passwords it was asked to check."""

    def __init__(self, hashes: dict[str, str]) -> None:
        super().__init__(hashes)
        self.checks = 0

    async def verify(self, user: str, password: bytes) -> bool:
        self.checks += 1
        return await super().verify(user, password)


@dataclass
class Relay:
    receiver: Receiver
    config: Config
    clock: Clock
    verifier: CountingVerifier

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.receiver.bound[0]
        return host, port

    async def connect(self, client_ip: str = "127.0.0.1") -> Client:
        """A session from ``client_ip`` (any 127.x.y.z), past its 220 banner and EHLO."""
        client = await Client.connect(self.address, local_addr=(client_ip, 0))
        assert client.banner[0] == 220, client.banner
        await client.ehlo()
        return client


Start = Callable[..., Awaitable[Relay]]


def throttle(**settings: Any) -> dict[str, Any]:
    """Overrides for server.auth_throttle, on top of the tiny delays of the test config."""
    return {"server": {"auth_throttle": settings}}


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    receivers: list[Receiver] = []

    async def start(overrides: dict[str, Any] | None = None, *, users: bool = True
                    ) -> Relay:
        config = build_config(overrides)
        if not users:
            config = config.model_copy(update={"users": {}})
        clock = Clock()
        verifier = CountingVerifier({n: u.password_hash for n, u in config.users.items()})
        receiver = make_receiver(config, FakeSubmit(), tmp_path / f"spool{len(receivers)}",
                                 verifier=verifier, clock=clock)
        await receiver.start()
        receivers.append(receiver)
        return Relay(receiver, config, clock, verifier)

    yield start
    for receiver in receivers:
        await receiver.stop()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def login(relay: Relay, user: str, password: str, client_ip: str = "127.0.0.1"
                ) -> tuple[int, str]:
    """One AUTH PLAIN on a new connection from ``client_ip``; the reply."""
    c = await relay.connect(client_ip)
    reply = await c.cmd(f"AUTH PLAIN {plain(user, password)}")
    await c.close()
    return reply


# --- password guessing ----------------------------------------------------------------------

async def test_guessing_over_many_connections_is_locked_out(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    # The reported attack: 50 wrong passwords over 17 connections, then the right one.
    caplog.set_level(logging.DEBUG, logger="relay")
    relay = await start({"server": {**REFUSED_NETWORK["server"],
                                    "auth_throttle": {"lockout_after": 5, "window": "10m",
                                                      "lockout": "10m"}}})
    replies: list[int] = []
    for _ in range(17):
        c = await relay.connect()
        for _ in range(3):
            code, _text = await c.cmd(f"AUTH PLAIN {plain('alice', WRONG)}")
            replies.append(code)
            if code == 421:
                break
        assert await c.closed()
    # Two connections' worth of real checks (max_auth_failures: 3 closes each), the 5th
    # failure starts the lockout, and from then on nothing is checked at all.
    assert replies[:6] == [535, 535, 421, 535, 535, 421]
    assert replies[6:] == [454, 454, 421] * 15
    assert relay.verifier.checks == 5
    assert len(lines(caplog, "AUTH PLAIN failed: client=127.0.0.1")) == 5
    assert lines(caplog, "AUTH lockout") == [
        "AUTH lockout of client: client=127.0.0.1 user='alice' failures=5 lockout=600s",
        "AUTH lockout of user: client=127.0.0.1 user='alice' failures=5 lockout=600s"]

    # The right password is refused during the lockout, unchecked, for any user name.
    c = await relay.connect()
    assert await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}") == LOCKED_OUT
    assert await c.cmd(f"AUTH LOGIN {b64('bob')}") == (334, b64("Password:"))
    assert await c.cmd(b64(PASSWORDS["bob"])) == LOCKED_OUT
    assert relay.verifier.checks == 5
    assert (await c.cmd(f"MAIL FROM:<{SYSTEM}>"))[0] == 530
    assert await c.cmd("NOOP") == (250, "2.0.0 OK")

    relay.clock.advance(599)
    assert await login(relay, "alice", PASSWORDS["alice"]) == LOCKED_OUT
    relay.clock.advance(1)                                  # the lockout is over
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}"))[0] == 235
    assert (await c.send("alice@contoso.com", ["x@example.com"]))[0] == 250
    assert len(lines(caplog, "AUTH lockout")) == 2           # said once, not per attempt
    for secret in (WRONG, PASSWORDS["alice"], PASSWORDS["bob"]):
        assert secret not in caplog.text


async def test_parallel_guesses_gain_nothing_past_the_limit(start: Start) -> None:
    # Guesses sent at once on many connections all pass the lockout check before any has
    # failed; those that fail (or succeed) after the lockout began are answered 454.
    relay = await start(throttle(lockout_after=3))
    clients = [await relay.connect() for _ in range(12)]
    guesses = [PASSWORDS["alice"] if i == 11 else f"guess-{i}" for i in range(12)]
    replies = await asyncio.gather(*(c.cmd(f"AUTH PLAIN {plain('alice', g)}")
                                     for c, g in zip(clients, guesses, strict=True)))
    codes = [code for code, _ in replies]
    assert codes.count(535) == 3
    assert codes.count(454) + codes.count(235) == 9
    if codes[11] == 235:
        # The right password was checked before the third failure: that is allowed, and
        # the lockout it then met still holds for everyone else.
        assert codes.count(454) == 8
    assert await login(relay, "alice", PASSWORDS["alice"]) == LOCKED_OUT


async def test_failure_replies_wait_longer_each_time(start: Start) -> None:
    relay = await start({"server": {"max_auth_failures": 10, "auth_throttle": {
        "delay": "40ms", "max_delay": "320ms", "lockout_after": 10}}})
    c = await relay.connect()
    took = []
    for _ in range(4):
        began = time.monotonic()
        assert (await c.cmd(f"AUTH PLAIN {plain('alice', WRONG)}"))[0] == 535
        took.append(time.monotonic() - began)
    for seconds, least in zip(took, [0.04, 0.08, 0.16, 0.32], strict=True):
        assert seconds >= least, took
    # The count belongs to the address, not the connection: a new one goes on from there
    # (and stops at max_delay).
    c2 = await relay.connect()
    began = time.monotonic()
    assert (await c2.cmd(f"AUTH PLAIN {plain('bob', WRONG)}"))[0] == 535
    assert time.monotonic() - began >= 0.32
    # A successful login resets the address: the next failure waits the base delay...
    assert (await c2.cmd(f"AUTH PLAIN {plain('bob', PASSWORDS['bob'])}"))[0] == 235
    c3 = await relay.connect()
    began = time.monotonic()
    assert (await c3.cmd(f"AUTH PLAIN {plain('carol', WRONG)}"))[0] == 535
    assert 0.04 <= time.monotonic() - began < 0.3
    # ... but not alice's count, which is by user name: a guess at her still waits long.
    began = time.monotonic()
    assert (await c3.cmd(f"AUTH PLAIN {plain('alice', WRONG)}"))[0] == 535
    assert time.monotonic() - began >= 0.32


async def test_a_delayed_failure_does_not_hold_up_other_sessions(start: Start) -> None:
    relay = await start(throttle(delay="1s", max_delay="1s"))
    guesser = await relay.connect("127.0.0.9")
    began = time.monotonic()
    guess = asyncio.create_task(guesser.cmd(f"AUTH PLAIN {plain('alice', WRONG)}"))
    await until(lambda: relay.verifier.checks == 1)
    app = await relay.connect()
    assert (await app.cmd(f"AUTH PLAIN {plain('bob', PASSWORDS['bob'])}"))[0] == 235
    assert (await app.send(SYSTEM, ["a@example.com"]))[0] == 250
    assert not guess.done()
    assert time.monotonic() - began < 1.0
    assert (await guess)[0] == 535
    assert time.monotonic() - began >= 1.0


async def test_user_lockout_spares_the_address_that_uses_the_account(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    relay = await start(throttle(lockout_after=3))
    app, elsewhere = "127.0.0.2", "127.0.0.6"
    assert (await login(relay, "alice", PASSWORDS["alice"], app))[0] == 235
    # Three machines, one guess each: no address is locked, the user name is.
    for attacker in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
        assert (await login(relay, "alice", WRONG, attacker))[0] == 535
    assert lines(caplog, "AUTH lockout") == [
        "AUTH lockout of user: client=127.0.0.5 user='alice' failures=3 lockout=600s"]
    checks = relay.verifier.checks
    assert await login(relay, "alice", PASSWORDS["alice"], elsewhere) == LOCKED_OUT
    assert relay.verifier.checks == checks                  # not even looked at
    assert (await login(relay, "bob", PASSWORDS["bob"], elsewhere))[0] == 235
    # The application's own address logged in as alice before: it carries on.
    assert (await login(relay, "alice", PASSWORDS["alice"], app))[0] == 235
    # ... but its own address's lockout applies to it like to anyone.
    c = await relay.connect(app)
    assert (await c.cmd(f"AUTH PLAIN {plain('bob', WRONG)}"))[0] == 535
    assert (await c.cmd(f"AUTH PLAIN {plain('bob', WRONG)}"))[0] == 535
    assert await c.cmd(f"AUTH PLAIN {plain('bob', WRONG)}") == CLOSING
    assert ("AUTH lockout of client: client=127.0.0.2 user='bob' failures=3 "
            "lockout=600s") in caplog.text
    assert await login(relay, "alice", PASSWORDS["alice"], app) == LOCKED_OUT


async def test_lockout_survives_a_reload(start: Start) -> None:
    relay = await start(throttle(lockout_after=2))
    for _ in range(2):
        assert (await login(relay, "alice", WRONG))[0] == 535
    config = build_config(throttle(lockout_after=2, lockout="1m"))
    relay.receiver.update(config, Router(config), relay.verifier)
    assert await login(relay, "alice", PASSWORDS["alice"]) == LOCKED_OUT
    relay.clock.advance(600)
    assert (await login(relay, "alice", PASSWORDS["alice"]))[0] == 235


# --- connection limits ----------------------------------------------------------------------

PER_CLIENT = (421, "4.7.0 Too many connections from your address, try again later")


async def test_one_address_cannot_take_every_connection(start: Start) -> None:
    relay = await start({"server": {"max_connections": 6}})      # 3 per address by default
    assert relay.config.server.connections_per_client == 3
    hog = [await relay.connect("127.0.0.7") for _ in range(3)]
    refused = await Client.connect(relay.address, local_addr=("127.0.0.7", 0))
    assert refused.banner == PER_CLIENT
    assert await refused.closed()
    # Others still get in, up to the total.
    others = [await relay.connect(ip) for ip in ("127.0.0.1", "127.0.0.1", "127.0.0.8")]
    assert (await others[0].send(SYSTEM, ["a@example.com"]))[0] == 250
    full = await Client.connect(relay.address, local_addr=("127.0.0.9", 0))
    assert full.banner == (421, "4.7.0 Too many connections, try again later")
    # A slot freed by the hog is the hog's again.
    assert (await hog[0].cmd("QUIT"))[0] == 221
    await until(lambda: relay.receiver.sessions == 5)
    again = await relay.connect("127.0.0.7")
    assert await again.cmd("NOOP") == (250, "2.0.0 OK")


async def test_refused_connections_are_logged_once_per_address_per_minute(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    relay = await start({"server": {"max_connections": 10, "max_connections_per_client": 1}})
    await relay.connect("127.0.0.7")
    await relay.connect("127.0.0.8")

    async def refused(ip: str) -> None:
        c = await Client.connect(relay.address, local_addr=(ip, 0))
        assert c.banner == PER_CLIENT
        assert await c.closed()

    for _ in range(10):
        await refused("127.0.0.7")
    await refused("127.0.0.8")
    reply = f"{PER_CLIENT[0]} {PER_CLIENT[1]}"
    assert lines(caplog, "connection refused") == [
        f"connection refused: client=127.0.0.7 reply={reply}",
        f"connection refused: client=127.0.0.8 reply={reply}"]
    relay.clock.advance(59)
    await refused("127.0.0.7")
    assert len(lines(caplog, "connection refused")) == 2
    relay.clock.advance(1)
    await refused("127.0.0.7")
    assert lines(caplog, "connection refused")[2:] == [
        f"connection refused: client=127.0.0.7 reply={reply} (10 more since the last line)"]


# --- no accounts ----------------------------------------------------------------------------

async def test_no_auth_is_offered_without_accounts(start: Start) -> None:
    relay = await start(REFUSED_NETWORK, users=False)
    c = await relay.connect()
    assert not any(ext.startswith("AUTH") for ext in await c.ehlo())
    assert await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}") == (
        502, "5.5.1 AUTH not available: no accounts are configured")
    assert await c.cmd("AUTH LOGIN") == (
        502, "5.5.1 AUTH not available: no accounts are configured")
    assert relay.verifier.checks == 0
    # Not "authenticate": there is nothing to authenticate with.
    assert (await c.cmd(f"MAIL FROM:<{SYSTEM}>")) == (
        554, "5.7.1 Relay access denied for 127.0.0.1")
