"""Shared fixtures: a relay running on loopback against the protocol-enforcing stand-ins.

The stand-ins are the same ones `run --sandbox` uses (relay/sandbox/): a fake Entra ID over
HTTPS that issues expiring, signed tokens and can fail on request, and a fake Exchange Online
that demands STARTTLS and a valid XOAUTH2 token and records what it accepted.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from relay.app import Relay
from relay.config import Config, parse_config
from relay.core.passhash import hash_password
from relay.sandbox.service import Sandbox
from tests.relayproc import merge

# Hypothesis (tests/test_prop_*.py, marked ``fuzz``). ``make test`` runs the "bounded"
# profile: few examples, derandomized, so that every run (CI's included) tries the same
# inputs and a red build is reproducible from the log alone; no example database, which
# would make a run depend on what earlier runs on the same machine happened to find.
# ``make fuzz`` runs the "fuzz" profile: many random examples each time, the database in
# .hypothesis/ replaying what failed before. No deadlines in either: the SMTP properties
# time real sockets and worker threads, whose pace depends on the machine's load.
settings.register_profile(
    "bounded", max_examples=50, derandomize=True, database=None, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}
_HASHES = {user: hash_password(pw, ln=10) for user, pw in PASSWORDS.items()}

BASE_CONFIG: dict[str, Any] = {
    "server": {"hostname": "relay.test", "listeners": [{"address": "127.0.0.1", "port": 0}],
               # Failed logins are answered after a delay: milliseconds, not seconds.
               "auth_throttle": {"delay": "10ms", "max_delay": "40ms"}},
    "users": {
        "alice": {"password_hash": _HASHES["alice"], "profile": "alice"},
        "bob": {"password_hash": _HASHES["bob"]},
    },
    "profiles": {
        "system": {"mailbox": "relay@contoso.com", "credential": "main"},
        "alice": {"mailbox": "alice@contoso.com", "credential": "main"},
    },
    "routing": {"system_profile": "system"},
    # Clients wait for the first attempt (so upstream verdicts reach them); retries are
    # fast so that tests of the queue do not wait minutes.
    "delivery": {"synchronous": 10, "retry_initial": "0.2s", "retry_max": "1s"},
    "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "relay-app",
                             "client_secret": {"value": "replaced-by-sandbox"}}},
    "http": {"port": 0},               # never the fixed default port in tests
}


def build_config(overrides: dict[str, Any] | None = None) -> Config:
    """BASE_CONFIG with ``overrides`` merged in (dicts merge, everything else replaces)."""
    data = copy.deepcopy(BASE_CONFIG)
    merge(data, overrides or {})
    return parse_config(data, check_secrets=False, check_files=False)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox") as sb:
        yield sb


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(sandbox: Sandbox) -> AsyncIterator[RelayFactory]:
    """Start a relay wired to ``sandbox``; call with config overrides. Stopped at teardown."""
    relays: list[Relay] = []

    async def start(overrides: dict[str, Any] | None = None) -> Relay:
        relay = Relay(sandbox.apply(build_config(overrides)))
        await relay.start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.stop()


@pytest.fixture
async def relay(start_relay: RelayFactory) -> Relay:
    return await start_relay()


def address(relay: Relay) -> tuple[str, int]:
    return relay.listening[0]


async def wait_until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``predicate`` until it is true; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)
