"""Upstreams that are other Microsoft services: High Volume Email and Azure Communication
Services Email, each with its login and its own limits.

ACS takes the app's client secret as the SMTP password (AUTH LOGIN as
``<resource>.<app id>.<tenant id>``), not an OAuth token; the fake Exchange plays it with
``password_logins``, over the same STARTTLS it demands of Exchange. HVE logs in with
XOAUTH2 like Exchange Online, at its own host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.config import Config, ConfigError, Upstream
from relay.ops.doctor import Doctor
from relay.ops.doctorreport import Status
from relay.queue.governor import Limits
from relay.sandbox.exchange import FakeExchange
from relay.sandbox.pki import LocalPKI, create_pki
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import build_config, wait_until
from tests.test_end_to_end import send

USERNAME = "contoso-acs.11111111-1111-1111-1111-111111111111.00000000-0000-0000-0000-000000000000"
SECRET = "acs-client-secret-value-0123456789"


def test_service_presets_fill_the_host_and_check_the_login() -> None:
    assert Upstream(service="hve").host == "smtp.hve.mx.microsoft"
    assert Upstream(service="acs", username=USERNAME).host == "smtp.azurecomm.net"
    assert Upstream(service="acs", username=USERNAME, host="relay.example").host == (
        "relay.example")
    with pytest.raises(ConfigError, match=r"upstreams\.acs.*needs username"):
        build_config({"upstreams": {"acs": {"service": "acs"}}})
    with pytest.raises(ConfigError, match=r"upstreams\.o365.*only for service: acs"):
        build_config({"upstreams": {"o365": {"username": USERNAME}}})
    # ACS's password is the client secret: a profile through it needs one.
    with pytest.raises(ConfigError, match=r"profiles\.system\.credential.*client_secret"):
        build_config({"upstreams": {"acs": {"service": "acs", "username": USERNAME}},
                      "profiles": {"system": {"upstream": "acs"}},
                      "credentials": {"main": {"client_secret": None,
                                               "managed_identity": "system"}}})
    # One mailbox, one set of limits.
    with pytest.raises(ConfigError, match=r"profiles\.alice\.upstream.*other limits"):
        build_config({"upstreams": {"hve": {"service": "hve",
                                            "limits": {"messages_per_minute": 100}}},
                      "profiles": {"system": {"mailbox": "a@contoso.com"},
                                   "alice": {"mailbox": "a@contoso.com", "upstream": "hve"}}})


@pytest.fixture
async def acs(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[FakeExchange]:
    pki: LocalPKI = create_pki(sandbox.directory / "pki")       # the sandbox's own CA
    async with FakeExchange(pki, sandbox.entra.validate_token,
                            hostname="fake-acs.local") as fake:
        fake.password_logins = {USERNAME: SECRET}
        fake.allow_send_as(USERNAME, "@contoso.com")   # the verified domain
        yield fake


def acs_config(sandbox: Sandbox, acs: FakeExchange, secret_file: Path,
               **upstream: Any) -> Config:
    ca_file = create_pki(sandbox.directory / "pki").ca_file
    config = sandbox.apply(build_config())
    cred = config.credentials["main"].model_copy(
        update={"client_secret": config.credentials["main"].client_secret.model_copy(
            update={"value": None, "file": secret_file})})       # type: ignore[union-attr]
    up = Upstream(service="acs", username=USERNAME, host=acs.host, port=acs.port,
                  ca_file=ca_file, timeout=10, **upstream)
    profiles = {n: p.model_copy(update={"upstream": "acs"})
                for n, p in config.profiles.items()}
    return config.model_copy(update={"upstreams": {"acs": up}, "profiles": profiles,
                                     "credentials": {"main": cred}})


async def relay_through(sandbox: Sandbox, acs: FakeExchange, secret_file: Path,
                        **upstream: Any) -> Relay:
    relay = Relay(acs_config(sandbox, acs, secret_file, **upstream))
    await relay.start()
    return relay


async def test_doctor_checks_an_acs_profile_with_the_secret_as_password(
        sandbox: Sandbox, acs: FakeExchange, tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SECRET)
    [report] = await Doctor(acs_config(sandbox, acs, secret_file)).run(["system"])
    steps = {s.name: s for s in report.steps}
    assert steps["token"].status is Status.INFO and "client secret" in steps["token"].detail
    assert steps["login"].status is Status.OK and USERNAME in steps["login"].detail
    assert steps["envelope"].status is Status.OK
    secret_file.write_text("wrong")
    [report] = await Doctor(acs_config(sandbox, acs, secret_file)).run(["system"])
    login = {s.name: s for s in report.steps}["login"]
    assert login.status is Status.FAIL and "ACS SMTP Username" in (login.fix or "")


async def test_acs_logs_in_with_the_client_secret_and_delivers(
        sandbox: Sandbox, acs: FakeExchange, tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SECRET)
    relay = await relay_through(sandbox, acs, secret_file)
    try:
        response = await send(relay, "billing@contoso.com", ["customer@example.com"])
    finally:
        await relay.stop()
    assert response.code == 250 and "delivered as" in response.message
    [got] = acs.messages
    assert got.mailbox == USERNAME and got.rcpt_tos == ["customer@example.com"]
    [login] = acs.auth_attempts
    assert login.ok and login.mechanism in ("LOGIN", "PLAIN")
    assert "XOAUTH2" not in " ".join(acs.commands)


async def test_a_refused_acs_secret_waits_and_a_rotated_one_is_read_again(
        sandbox: Sandbox, acs: FakeExchange, tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("an-expired-secret")
    relay = await relay_through(sandbox, acs, secret_file)
    try:
        response = await send(relay, "billing@contoso.com", ["customer@example.com"])
        assert response.code == 250 and "queued as" in response.message  # kept, not bounced
        assert [a.ok for a in acs.auth_attempts] == [False, False]       # once more, read again
        assert not relay.metrics.profiles.ready("system")
        secret_file.write_text(SECRET)                    # the operator rotates the secret
        relay.queue.flush()
        await wait_until(lambda: len(acs.messages) == 1)
        assert relay.spool.count(State.FAILED) == 0
        await wait_until(lambda: relay.metrics.profiles.ready("system"))
    finally:
        await relay.stop()


async def test_an_upstream_with_limits_of_its_own_paces_its_mailboxes_by_them(
        sandbox: Sandbox, acs: FakeExchange, tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SECRET)
    relay = await relay_through(sandbox, acs, secret_file, limits={
        "max_sessions": 1, "messages_per_minute": 2, "recipients_per_day": 500})
    try:
        governor = relay.queue.governor
        assert governor.limits_for("relay@contoso.com") == Limits(
            max_sessions=1, messages_per_minute=2, recipients_per_day=500)
        assert governor.limits_for("someone-else@contoso.com") == Limits()
        # The session pool keeps to the upstream's sessions too (the sends below come one
        # at a time, so the fake's count alone could not tell).
        assert relay.deliverer._by_profile["system"].max_sessions == 1
        for _ in range(3):
            response = await send(relay, "billing@contoso.com", ["customer@example.com"])
        # The third waits for the minute's window: two a minute through this upstream.
        assert "queued as" in response.message
        assert len(acs.messages) == 2 and acs.max_concurrent_sessions == 1
    finally:
        await relay.stop()


async def test_hve_logs_in_with_xoauth2_at_its_own_host(
        sandbox: Sandbox, start_relay: Any) -> None:
    relay = await start_relay()
    # The sandbox points every upstream at its fake; an HVE upstream differs from
    # Exchange's in its host and limits only, so the login is the same XOAUTH2.
    up = relay.config.upstreams["sandbox"].model_copy(update={"service": "hve"})
    assert up.host == sandbox.exchange.host
    changed = relay.config.model_copy(update={"upstreams": {"sandbox": up}})
    assert await relay.reload(lambda: changed)
    assert relay.config.upstreams["sandbox"].service == "hve"
    response = await send(relay, "billing@contoso.com", ["colleague@contoso.com"])
    assert response.code == 250
    assert [a.mechanism for a in sandbox.exchange.auth_attempts] == ["XOAUTH2"]
