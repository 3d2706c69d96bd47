"""Delegated credentials: a user signs in once (`authorize`, device-code flow), the relay
keeps the refresh token encrypted, renews it with every token, and sends as that user.

Against the fake Entra's user flows (authorization_pending until the user acts, declined,
rotation of refresh tokens, invalid_grant for a revoked sign-in) and the fake Exchange,
which takes a delegated token only with SMTP.Send and only for its own user.
"""

from __future__ import annotations

import asyncio
import copy
import os
import stat
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.app import Relay
from relay.cli import main
from relay.config import ConfigError, Credential, DelegatedAuth
from relay.oauth.clients import delegated_scopes
from relay.oauth.provider import TokenProvider
from relay.oauth.token import TokenError
from relay.oauth.tokenstore import TokenStore, write_key
from relay.ops.doctor import Doctor
from relay.ops.doctorreport import Status
from relay.sandbox.pki import create_pki
from relay.sandbox.service import Sandbox
from relay.spool.records import State
from tests.conftest import BASE_CONFIG, PASSWORDS, build_config, wait_until
from tests.relayproc import merge
from tests.test_end_to_end import send

TENANT, CLIENT, USER = "contoso.onmicrosoft.com", "relay-app", "alice@contoso.com"


def delegated(sandbox: Sandbox, tmp_path: Path) -> dict[str, Any]:
    return {"tenant_id": TENANT, "client_id": CLIENT, "authority": sandbox.entra.url,
            "ca_file": str(create_pki(sandbox.directory / "pki").ca_file),
            "delegated": {"token_file": str(tmp_path / "alice.token"),
                          "key": {"file": str(tmp_path / "token.key")}}}


def config_file(sandbox: Sandbox, tmp_path: Path) -> Path:
    data = copy.deepcopy(BASE_CONFIG)
    merge(data, {"credentials": {"main": {**delegated(sandbox, tmp_path),
                                          "client_secret": None}}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def authorize(sandbox: Sandbox, tmp_path: Path, act: str = "approve",
                    cfg: Path | None = None, tenant: str = TENANT,
                    user: str = USER) -> int:
    """`smtp-oauth-relay authorize`, with the test as the user at the browser."""
    sandbox.entra.add_app(tenant, CLIENT, public=True)   # "Allow public client flows"
    cfg = cfg or config_file(sandbox, tmp_path)
    running = asyncio.create_task(asyncio.to_thread(
        main, ["authorize", "--config", str(cfg), "system"]))
    await wait_until(lambda: sandbox.entra.users.pending() or running.done())
    if not running.done():
        [code] = sandbox.entra.users.pending()
        if act == "approve":
            sandbox.entra.users.approve(code, user)
        else:
            sandbox.entra.users.decline(code)
    return await asyncio.wait_for(running, 30)


async def start(sandbox: Sandbox, tmp_path: Path, **profile: Any) -> Relay:
    config = sandbox.apply(build_config({"profiles": {"system": {"mailbox": USER, **profile},
                                                      "alice": {"mailbox": USER}}}))
    cred = Credential(**{**delegated(sandbox, tmp_path), "ca_file": config.credentials[
        "main"].ca_file})
    relay = Relay(config.model_copy(update={"credentials": {"main": cred}}))
    await relay.start()
    return relay


async def test_a_user_signs_in_once_and_the_relay_sends_as_them(
        sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await authorize(sandbox, tmp_path) == 0
    out = capsys.readouterr().out
    assert "enter the code" in out and f"signed in as {USER}" in out
    token_file, key_file = tmp_path / "alice.token", tmp_path / "token.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    sealed = token_file.read_bytes()
    assert b"refresh_token" not in sealed and b"0.rt." not in sealed    # encrypted

    relay = await start(sandbox, tmp_path)
    try:
        response = await send(relay, USER, ["customer@example.com"],
                              b"From: Alice <alice@contoso.com>\r\nTo: customer@example.com"
                              b"\r\nSubject: hi\r\n\r\nHello.\r\n", login=None)
    finally:
        await relay.stop()
    assert response.code == 250 and "delivered as" in response.message
    [got] = sandbox.exchange.messages
    assert got.mailbox == USER
    [login] = sandbox.exchange.auth_attempts
    assert login.ok and login.mailbox == USER
    assert token_file.read_bytes() != sealed            # rotated with the new token


async def test_a_revoked_sign_in_keeps_the_mail_and_says_how_to_sign_in_again(
        sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert await authorize(sandbox, tmp_path) == 0
    sandbox.entra.users.revoke(USER)                    # a password change, say
    relay = await start(sandbox, tmp_path)
    try:
        response = await send(relay, USER, ["customer@example.com"],
                              b"Subject: hi\r\n\r\nHello.\r\n")
        assert response.code == 250 and "queued as" in response.message   # kept
        assert relay.spool.count(State.FAILED) == 0
        # Not ready (/readyz, smtp_relay_profile_ready) until the user signs in again.
        assert not relay.metrics.profiles.ready("system")
        [status] = [s for s in relay.metrics.profiles.statuses() if s.profile == "system"]
        assert "authorize --credential main" in status.detail
        assert sandbox.exchange.messages == []
        assert await authorize(sandbox, tmp_path) == 0
        relay.queue.flush()
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
        await wait_until(lambda: relay.metrics.profiles.ready("system"))
    finally:
        await relay.stop()
    assert "smtp-oauth-relay authorize --credential main" in caplog.text
    assert "AADSTS50173" in caplog.text


async def test_a_code_nobody_uses_expires_and_is_exit_75(
        sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.entra.add_app(TENANT, CLIENT, public=True)
    sandbox.entra.users.device_lifetime = 2
    code = await asyncio.to_thread(main, ["authorize", "--config",
                                          str(config_file(sandbox, tmp_path)),
                                          "--credential", "main"])
    assert code == 75 and not (tmp_path / "alice.token").exists()


async def test_each_legacy_login_sends_as_its_own_person(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """users.alice.profile -> a profile whose credential is alice's own sign-in; mail of
    everyone else still goes through the system profile's app credential."""
    assert await authorize(sandbox, tmp_path) == 0
    config = sandbox.apply(build_config({"profiles": {
        "alice": {"mailbox": USER, "credential": "alice"}}, "credentials": {
        "alice": {"tenant_id": TENANT, "client_id": CLIENT,
                  "client_secret": {"value": "replaced-by-sandbox"}}}}))
    cred = Credential(**{**delegated(sandbox, tmp_path),
                         "ca_file": config.credentials["main"].ca_file})
    relay = Relay(config.model_copy(update={"credentials": {
        **config.credentials, "alice": cred}}))
    await relay.start()
    try:
        await send(relay, USER, ["customer@example.com"],
                   b"From: alice@contoso.com\r\nSubject: mine\r\n\r\nHi.\r\n",
                   login=("alice", PASSWORDS["alice"]))
        await send(relay, "billing@contoso.com", ["customer@example.com"])
    finally:
        await relay.stop()
    mine, billing = sandbox.exchange.messages
    assert mine.mailbox == USER and billing.mailbox == "relay@contoso.com"
    assert {a.mailbox for a in sandbox.exchange.auth_attempts if a.ok} == {
        USER, "relay@contoso.com"}


async def test_a_declined_sign_in_is_exit_77_and_stores_nothing(
        sandbox: Sandbox, tmp_path: Path) -> None:
    assert await authorize(sandbox, tmp_path, act="decline") == 77
    assert not (tmp_path / "alice.token").exists()


def test_the_key_is_never_in_the_config_or_the_environment(tmp_path: Path) -> None:
    for key in ({"value": "x" * 44}, {"env": "RELAY_TOKEN_KEY"}):
        with pytest.raises(ConfigError, match=r"credentials\.main\.delegated.*key must be"):
            build_config({"credentials": {"main": {
                "client_secret": None,
                "delegated": {"token_file": str(tmp_path / "t"), "key": key}}}})


async def test_over_graph_the_delegated_token_is_for_mail_send(
        sandbox: Sandbox, tmp_path: Path) -> None:
    assert await authorize(sandbox, tmp_path) == 0
    relay = await start(sandbox, tmp_path, transport="graph")
    try:
        response = await send(relay, USER, ["customer@example.com"],
                              b"To: customer@example.com\r\nSubject: hi\r\n\r\nHello.\r\n")
    finally:
        await relay.stop()
    assert response.code == 250 and "delivered as" in response.message
    [got] = sandbox.graph.messages
    assert got.mailbox == USER and got.recipients == ["customer@example.com"]


async def test_doctor_checks_the_users_token(sandbox: Sandbox, tmp_path: Path) -> None:
    assert await authorize(sandbox, tmp_path) == 0
    relay = await start(sandbox, tmp_path)
    config = relay.config
    await relay.stop()
    [report] = await Doctor(config).run(["system"])
    steps = {s.name: s for s in report.steps}
    assert steps["claims"].status is Status.OK
    assert f"delegated token of {USER} with SMTP.Send; signed in 0 day(s) ago" in (
        steps["claims"].detail)
    assert steps["login"].status is Status.OK and steps["envelope"].status is Status.OK
    # Someone else's sign-in for this mailbox is named, with the fix.
    other = config.model_copy(update={"profiles": {
        "system": config.profiles["system"].model_copy(update={"mailbox": "bob@contoso.com"})}})
    [report] = await Doctor(other).run(["system"])
    claims = {s.name: s for s in report.steps}["claims"]
    assert claims.status is Status.FAIL and "sign in as bob@contoso.com" in (claims.fix or "")


async def test_in_a_browser_with_pkce(sandbox: Sandbox, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`authorize --browser`: the authorization-code flow with PKCE, back to a loopback
    server of the command's own; the test plays the user's browser."""
    sandbox.entra.add_app(TENANT, CLIENT, public=True)
    cfg = config_file(sandbox, tmp_path)
    running = asyncio.create_task(asyncio.to_thread(
        main, ["authorize", "--config", str(cfg), "--credential", "main", "--browser"]))
    shown: list[str] = []

    def auth_uri() -> str | None:
        shown.append(capsys.readouterr().out)
        return next((line for line in "".join(shown).splitlines()
                     if line.startswith(sandbox.entra.url)), None)

    await wait_until(lambda: auth_uri() or running.done())
    uri = auth_uri()
    assert uri is not None and "code_challenge_method=S256" in uri
    assert "response_mode=form_post" in uri
    back = urllib.parse.urlsplit(sandbox.entra.users.sign_in(uri, USER))
    assert back.netloc.startswith("localhost:")
    # The browser posts the code and the state back (form_post), as Entra's page does.
    page = await asyncio.to_thread(
        urllib.request.urlopen, f"http://{back.netloc}/", back.query.encode(), 10)
    assert b"can be closed" in page.read()
    assert await asyncio.wait_for(running, 30) == 0
    assert f"signed in as {USER}" in "".join(shown) + capsys.readouterr().out
    assert (tmp_path / "alice.token").exists()


def test_a_code_redeemed_without_its_verifier_is_refused() -> None:
    from relay.sandbox.userflows import FlowError, UserFlows

    flows = UserFlows()
    uri = ("https://login.example/authorize?client_id=app&redirect_uri=http%3A%2F%2F"
           "localhost%3A1&state=s&scope=https%3A%2F%2Foutlook.office365.com%2FSMTP.Send"
           "&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
           "&code_challenge_method=S256")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(flows.sign_in(uri, USER)).query)
    with pytest.raises(FlowError, match="Code_Verifier does not match"):
        flows.redeem_code("app", code["code"][0], "not-the-verifier", "http://localhost:1")


def test_personal_accounts_are_delegated_only_and_use_outlook_com() -> None:
    base = {"client_id": CLIENT, "client_secret": None}
    with pytest.raises(ConfigError, match="cloud: consumer and tenant_id: consumers"):
        build_config({"credentials": {"main": {**base, "tenant_id": "consumers",
                                               "managed_identity": "system"}}})
    with pytest.raises(ConfigError, match="works only with delegated"):
        build_config({"credentials": {"main": {**base, "tenant_id": "consumers",
                                               "cloud": "consumer",
                                               "managed_identity": "system"}}})
    config = build_config({"credentials": {"main": {
        **base, "tenant_id": "consumers", "cloud": "consumer",
        "delegated": {"token_file": "/tmp/t", "key": {"file": "/tmp/k"}}}}})
    cred = config.credentials["main"]
    assert cred.authority_url == "https://login.microsoftonline.com/consumers"
    assert config.upstream_for(config.profiles["system"]).host == "smtp-mail.outlook.com"
    assert delegated_scopes(cred.scopes) == ["https://outlook.office.com/SMTP.Send"]
    assert delegated_scopes(cred.graph_scopes) == ["https://graph.microsoft.com/Mail.Send"]


async def test_every_renewal_keeps_the_sign_in_alive_and_long_disuse_ends_it(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """Entra ends a refresh token unused for 90 days; the relay uses it with each renewal
    (hourly), so only a relay stopped for that long loses the sign-in."""
    assert await authorize(sandbox, tmp_path) == 0
    cred = Credential(**delegated(sandbox, tmp_path))
    provider = TokenProvider("main", cred)
    try:
        first = await provider.get()
        sandbox.entra.users.age(89 * 86400)
        second = await provider.refresh(stale=first)      # 89 days unused: still good
        sandbox.entra.users.age(89 * 86400)
        third = await provider.refresh(stale=second)      # and counted from its last use
        sandbox.entra.users.age(91 * 86400)
        with pytest.raises(TokenError, match=r"AADSTS700082.*authorize --credential main"):
            await provider.refresh(stale=third)
    finally:
        await provider.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_run_as_root_the_files_belong_to_the_relays_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 10025, 10025)             # the relay's StateDirectory=
    settings = DelegatedAuth(token_file=state / "alice.token",
                             key={"file": str(state / "token.key")})
    write_key(state / "token.key")
    TokenStore("main", settings).save("0.rt.secret-refresh-token", USER)
    for name in ("alice.token", "token.key"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10025, 10025, 0o600)
    assert TokenStore("main", settings).load()["refresh_token"] == (  # type: ignore[index]
        "0.rt.secret-refresh-token")


async def test_a_personal_account_signs_in_at_the_consumers_authority(
        sandbox: Sandbox, tmp_path: Path) -> None:
    data = copy.deepcopy(BASE_CONFIG)
    merge(data, {"credentials": {"main": {**delegated(sandbox, tmp_path),
                                          "tenant_id": "consumers", "cloud": "consumer",
                                          "client_secret": None}}})
    cfg = tmp_path / "personal.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert await authorize(sandbox, tmp_path, cfg=cfg, tenant="consumers",
                           user="jane@outlook.com") == 0
    cred = Credential(**{**delegated(sandbox, tmp_path), "tenant_id": "consumers",
                         "cloud": "consumer"})
    provider = TokenProvider("main", cred)
    try:
        token = await provider.get()
    finally:
        await provider.aclose()
    assert token.audience == "https://outlook.office.com" and "SMTP.Send" in token.scopes
    assert token.claims["upn"] == "jane@outlook.com"


@pytest.mark.slow
async def test_told_to_slow_down_it_waits_longer_and_still_signs_in(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """Entra's slow_down: msal waits five seconds more between polls, and goes on."""
    sandbox.entra.users.slow_down_once = True
    started = asyncio.get_running_loop().time()
    assert await authorize(sandbox, tmp_path) == 0
    assert asyncio.get_running_loop().time() - started > 5
