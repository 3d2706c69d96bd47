"""Readiness per profile: a profile whose upstream login or SendAs keeps being refused
makes /readyz, the profile_ready gauge and ``healthcheck --ready`` say so, with the reason,
and turns ready again once the upstream accepts it.

The relays run against the sandbox stand-ins: the fake Exchange refuses a mailbox the app
was not granted (``535 5.7.3``, as after a missing Add-MailboxPermission) and a sender the
mailbox may not send as (``SendAsDenied`` after DATA), exactly as Exchange does. Retries
are fast (0.2 s to 1 s), so "the next attempt" comes within a test's patience.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from relay.app import Relay
from relay.config import Config
from relay.core.events import Hooks
from relay.core.log import redact
from relay.core.reply import Reply
from relay.deliver.classify import Problem, classify
from relay.ops.profilehealth import LOGIN_REFUSALS, SEND_AS_DENIALS, ProfileHealth
from relay.sandbox.service import Sandbox
from tests.conftest import RelayFactory, address, build_config, wait_until
from tests.test_http import get, value

ROOT = Path(__file__).resolve().parent.parent

# alice's mail goes through the "alice" profile (alice@contoso.com), everything else
# through "system" (relay@contoso.com).
OVERRIDES: dict[str, Any] = {
    "http": {"port": 0, "cache_ttl": "0.1s", "request_timeout": "2s"},
    "routing": {"rules": [{"sender": "*@alice.example", "profile": "alice"}]},
}
NOT_GRANTED = Reply(535, "5.7.3 Authentication unsuccessful [outlook.office365.com]")
SEND_AS = Reply(554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as "
                     "app@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException")


def overrides(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(v) for k, v in OVERRIDES.items()}
    for key, val in (extra or {}).items():
        out[key] = {**out.get(key, {}), **val} if isinstance(val, dict) else val
    return out


async def send(relay: Relay, sender: str, *, header_from: str | None = None,
               rcpt: str = "someone@example.com") -> aiosmtplib.SMTPResponse:
    """One message; the relay waits for the first attempt (delivery.synchronous)."""
    host, port = address(relay)
    body = (f"From: {header_from or sender}\r\nTo: {rcpt}\r\nSubject: readiness\r\n\r\n"
            "hello\r\n").encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               timeout=30) as client:
        await client.mail(sender)
        await client.rcpt(rcpt)
        try:
            return await client.data(body)
        except aiosmtplib.SMTPDataError as exc:
            return aiosmtplib.SMTPResponse(exc.code, exc.message)


async def readyz(relay: Relay) -> tuple[int, dict[str, str]]:
    """/readyz's status and its lines by check name ("profile system" -> "NOT READY: ...")."""
    reply = await get(relay, "/readyz")
    checks = {}
    for line in reply.text.splitlines()[1:]:
        name, _, rest = line.partition(": ")
        checks[name] = rest
    return reply.status, checks


async def metric(relay: Relay, name: str, **labels: str) -> float | None:
    return value((await get(relay, "/metrics")).text, name, **labels)


async def eventually(check: Any, within: float = 10.0) -> None:
    """Poll an async predicate until it holds (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


async def healthcheck_ready(relay: Relay, tmp_path: Path) -> tuple[int, str]:
    """``python -m relay.healthcheck --ready`` against ``relay``, as Docker runs it."""
    assert relay.http_address is not None
    host, port = relay.http_address
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"http": {"address": host, "port": port}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.healthcheck", "--config", str(config), "--ready",
        "--timeout", "5", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


# --- a mailbox the app was not granted ----------------------------------------------------

async def test_a_refused_login_makes_the_profile_not_ready_until_it_is_granted(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.exchange.grant("alice@contoso.com")      # relay@contoso.com is not granted
    relay = await start_relay(overrides())
    status, checks = await readyz(relay)
    assert status == 200, checks
    assert checks["profile system"] == "ok: no upstream login since the start"
    assert await metric(relay, "smtp_relay_profile_ready", profile="system") == 1
    assert await metric(relay, "smtp_relay_upstream_logins_refused_total",
                        profile="system") == 0

    reply = await send(relay, "app@contoso.com")
    assert reply.code == 250 and "queued" in reply.message       # deferred, never bounced
    status, checks = await readyz(relay)
    assert status == 503
    system = checks["profile system"]
    assert system.startswith("NOT READY: the upstream refused the login for relay@contoso.com"
                             ", also with a freshly fetched token")
    assert "535 5.7.3 Authentication unsuccessful" in system          # the upstream's reply
    assert "Add-MailboxPermission" in system and "New-ServicePrincipal" in system  # the fix
    assert "queue flush" in system
    # Only that profile: alice's mailbox is granted and her mail goes through.
    assert (await send(relay, "app@alice.example")).code == 250
    status, checks = await readyz(relay)
    assert status == 503
    assert checks["profile alice"].startswith("ok: upstream login accepted")
    assert "NOT READY" in checks["profile system"]
    metrics = (await get(relay, "/metrics")).text
    assert value(metrics, "smtp_relay_profile_ready", profile="system") == 0
    assert value(metrics, "smtp_relay_profile_ready", profile="alice") == 1
    refused = value(metrics, "smtp_relay_upstream_logins_refused_total", profile="system")
    assert refused is not None and refused >= 1
    assert value(metrics, "smtp_relay_upstream_logins_refused_total", profile="alice") == 0
    code, output = await healthcheck_ready(relay, tmp_path)
    assert code == 1, output
    assert "profile system: NOT READY" in output and "535 5.7.3" in output

    # Neither the token nor the client secret is ever shown.
    body = (await get(relay, "/readyz")).text
    token = relay.tokens.provider("main").current
    assert token is not None and token.access_token.reveal() not in body
    secret = relay.config.credentials["main"].client_secret
    assert secret is not None and secret.resolve().reveal() not in body

    # Granted: the deferred message's next retry logs in, delivers, and the profile is
    # ready again - without a new message and without /readyz contacting Exchange.
    sandbox.exchange.grant("relay@contoso.com")
    await eventually(lambda: _ready(relay))
    await wait_until(lambda: any(m.mailbox == "relay@contoso.com"
                                 for m in sandbox.exchange.messages))
    status, checks = await readyz(relay)
    assert status == 200, checks
    assert checks["profile system"].startswith("ok: upstream login accepted")
    assert await metric(relay, "smtp_relay_profile_ready", profile="system") == 1
    code, output = await healthcheck_ready(relay, tmp_path)
    assert code == 0, output


async def _ready(relay: Relay) -> bool:
    return (await get(relay, "/readyz")).status == 200


async def test_readiness_does_not_contact_exchange(start_relay: RelayFactory,
                                                   sandbox: Sandbox) -> None:
    relay = await start_relay(overrides())
    sessions = sandbox.exchange.sessions
    for _ in range(5):
        assert (await get(relay, "/readyz")).status == 200
        await get(relay, "/metrics")
    assert sandbox.exchange.sessions == sessions == 0


async def test_a_mailbox_logon_failure_needs_two_attempts_in_a_row(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """430 4.2.0 comes at AUTH without the fresh-token retry: one may be a passing fault."""
    relay = await start_relay(overrides({"delivery": {"retry_initial": "1h",
                                                      "retry_max": "1h"}}))
    logon = "4.2.0 STOREDRV; mailbox logon failure"
    sandbox.exchange.fail_next("auth", 430, logon)
    assert (await send(relay, "app@contoso.com")).code == 250
    status, checks = await readyz(relay)
    assert status == 200, checks
    assert "1 refused login(s) in a row (not ready at 2): 430 4.2.0" in checks["profile system"]
    sandbox.exchange.fail_next("auth", 430, logon)
    assert (await send(relay, "app@contoso.com")).code == 250
    status, checks = await readyz(relay)
    assert status == 503
    system = checks["profile system"]
    assert "refused the login for relay@contoso.com (2 attempt(s) since" in system
    assert "freshly fetched" not in system
    assert "430 4.2.0 STOREDRV; mailbox logon failure" in system
    assert "Add-MailboxPermission" in system
    # The next message logs in: ready again.
    assert (await send(relay, "relay@contoso.com")).code == 250
    assert (await readyz(relay))[0] == 200


# --- SendAsDenied ---------------------------------------------------------------------------

async def test_send_as_denied_on_consecutive_messages_makes_the_profile_not_ready(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    relay = await start_relay(overrides({"profiles": {"system": {"sender_policy": "keep"}}}))
    # One message with a From the mailbox may not use: one application's mistake.
    reply = await send(relay, "app@contoso.com")
    assert reply.code == 554 and "SendAsDenied" in reply.message
    status, checks = await readyz(relay)
    assert status == 200, checks
    assert "1 message(s) in a row refused SendAsDenied" in checks["profile system"]
    # A delivered message in between starts the count again.
    assert (await send(relay, "relay@contoso.com")).code == 250
    for n in range(1, SEND_AS_DENIALS):
        assert (await send(relay, "app@contoso.com")).code == 554
        status, checks = await readyz(relay)
        assert status == 200, (n, checks)
    assert (await send(relay, "app@contoso.com")).code == 554
    status, checks = await readyz(relay)
    assert status == 503
    system = checks["profile system"]
    assert system.startswith(f"NOT READY: {SEND_AS_DENIALS} messages in a row refused because "
                             "relay@contoso.com may not send as their sender")
    assert "554 5.2.252 SendAsDenied" in system
    assert "Add-RecipientPermission" in system and "sender_policy: rewrite" in system
    assert checks["profile alice"].startswith("ok")
    assert await metric(relay, "smtp_relay_profile_ready", profile="system") == 0
    assert await metric(relay, "smtp_relay_profile_ready", profile="alice") == 1
    # Logins were accepted all along: nothing counted as a refused login.
    assert await metric(relay, "smtp_relay_upstream_logins_refused_total",
                        profile="system") == 0
    code, output = await healthcheck_ready(relay, tmp_path)
    assert code == 1 and "SendAsDenied" in output, output
    # A message the upstream accepts: ready again.
    assert (await send(relay, "relay@contoso.com")).code == 250
    status, checks = await readyz(relay)
    assert status == 200, checks
    assert await metric(relay, "smtp_relay_profile_ready", profile="system") == 1
    code, output = await healthcheck_ready(relay, tmp_path)
    assert code == 0, output


# --- reload ---------------------------------------------------------------------------------

async def test_reload_forgets_removed_profiles_and_keeps_the_others(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    relay = await start_relay(overrides({"profiles": {
        "extra": {"mailbox": "extra@contoso.com", "credential": "main"}}}))
    metrics = (await get(relay, "/metrics")).text
    for profile in ("system", "alice", "extra"):
        assert value(metrics, "smtp_relay_profile_ready", profile=profile) == 1
        assert value(metrics, "smtp_relay_upstream_logins_refused_total",
                     profile=profile) == 0
    sandbox.exchange.grant("alice@contoso.com")
    await send(relay, "app@contoso.com")
    assert not relay.metrics.profiles.ready("system")

    profiles = {k: v for k, v in relay.config.profiles.items() if k != "extra"}
    new = relay.config.model_copy(update={"profiles": profiles})
    assert await relay.reload(lambda: new)
    metrics = (await get(relay, "/metrics")).text
    assert value(metrics, "smtp_relay_profile_ready", profile="extra") is None
    assert value(metrics, "smtp_relay_upstream_logins_refused_total", profile="extra") is None
    # Unchanged profiles keep what was observed: a reload does not hide a problem.
    assert value(metrics, "smtp_relay_profile_ready", profile="system") == 0
    status, checks = await readyz(relay)
    assert status == 503 and "profile extra" not in checks

    # A changed profile (here: another mailbox) starts afresh.
    system = relay.config.profiles["system"].model_copy(
        update={"mailbox": "alice@contoso.com"})
    changed = relay.config.model_copy(update={"profiles": {**relay.config.profiles,
                                                           "system": system}})
    assert await relay.reload(lambda: changed)
    assert relay.metrics.profiles.ready("system")


# --- the rules, one by one -------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _health(config: Config | None = None) -> tuple[ProfileHealth, _Clock]:
    clock = _Clock()
    health = ProfileHealth(clock)
    health.configure(config or build_config())
    return health, clock


def _status(health: ProfileHealth, profile: str) -> tuple[bool, str]:
    by_name = {s.profile: s for s in health.statuses()}
    return by_name[profile].ready, by_name[profile].detail


def test_a_login_refused_with_a_fresh_token_is_definitive() -> None:
    health, _ = _health()
    health.login_refused("system", "relay@contoso.com", NOT_GRANTED, fresh_token=True)
    ready, detail = _status(health, "system")
    assert not ready
    assert "535 5.7.3" in detail and classify(NOT_GRANTED).explanation in detail
    assert _status(health, "alice")[0]
    # A session that logged in but whose message failed for another reason still clears it.
    health.logged_in("system", "relay@contoso.com", delivered=False)
    assert _status(health, "system")[0]


def test_other_login_problems_need_several_in_a_row() -> None:
    health, _ = _health()
    logon = Reply(430, "4.2.0 STOREDRV; mailbox logon failure")
    for _ in range(LOGIN_REFUSALS - 1):
        health.login_refused("system", "relay@contoso.com", logon, fresh_token=False)
        assert health.ready("system")
        health.logged_in("system", "relay@contoso.com", delivered=True)
    for _ in range(LOGIN_REFUSALS):
        assert health.ready("system")
        health.login_refused("system", "relay@contoso.com", logon, fresh_token=False)
    assert not health.ready("system")


def test_send_as_counts_messages_in_a_row_and_only_a_delivery_clears_it() -> None:
    health, _ = _health()
    for _ in range(SEND_AS_DENIALS - 1):
        health.send_as_denied("system", "relay@contoso.com", SEND_AS)
    # Neither delivered nor denied (an unknown recipient): the count stands.
    health.logged_in("system", "relay@contoso.com", delivered=False)
    assert health.ready("system")
    health.send_as_denied("system", "relay@contoso.com", SEND_AS)
    ready, detail = _status(health, "system")
    assert not ready and f"{SEND_AS_DENIALS} messages in a row" in detail
    health.logged_in("system", "relay@contoso.com", delivered=False)
    assert not health.ready("system")
    health.logged_in("system", "relay@contoso.com", delivered=True)
    assert health.ready("system")


def test_both_problems_are_named() -> None:
    health, _ = _health()
    health.login_refused("system", "relay@contoso.com", NOT_GRANTED, fresh_token=True)
    for _ in range(SEND_AS_DENIALS):
        health.send_as_denied("system", "relay@contoso.com", SEND_AS)
    ready, detail = _status(health, "system")
    assert not ready and "refused the login" in detail and "SendAsDenied" in detail


def test_unknown_profiles_are_not_remembered() -> None:
    health, _ = _health()
    for _ in range(100):
        health.login_refused("gone", "x@contoso.com", NOT_GRANTED, fresh_token=True)
        health.send_as_denied("gone", "x@contoso.com", SEND_AS)
    assert "gone" not in health
    assert [s.profile for s in health.statuses()] == ["system", "alice"]
    assert health.ready("gone")


def test_a_shown_reply_is_one_bounded_line_without_secrets() -> None:
    health, _ = _health()
    redact("eyJ0eXAiOiJKV1Qi.a-token-that-must-not-show")
    reply = Reply(535, "5.7.3 Authentication unsuccessful\r\nBearer "
                       "eyJ0eXAiOiJKV1Qi.a-token-that-must-not-show\x00 " + "x" * 2000)
    health.login_refused("system", "relay@contoso.com", reply, fresh_token=True)
    _, detail = _status(health, "system")
    assert "a-token-that-must-not-show" not in detail and "[REDACTED]" in detail
    assert "\n" not in detail and "\r" not in detail and "\x00" not in detail
    assert "x" * 400 not in detail


def test_the_classifier_marks_the_replies_readiness_counts() -> None:
    login = ["535 5.7.3 Authentication unsuccessful",
             "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
             "430 4.2.0 STOREDRV; mailbox logon failure",
             "451 4.7.0 Upstream x says the relay is not authenticated: 530 5.7.57 Client "
             "not authenticated to send mail",
             "550 5.7.30 Basic authentication is not supported for Client Submission.",
             "451 4.7.0 Upstream refused the relay's login for a@b: 535 5.7.3 Authentication "
             "unsuccessful; message not sent, try again later"]
    send_as = ["554 5.2.252 SendAsDenied; a@b not allowed to send as c@d",
               "550 5.7.60 SMTP; Client does not have permissions to send as this sender"]
    neither = ["501 5.5.127 Token will expire soon", "250 2.0.0 OK", "550 5.1.1 User unknown",
               "451 4.7.0 Relay cannot obtain an OAuth token for profile p",
               "432 4.3.2 Concurrent connections limit exceeded"]
    for text, problem in ([(t, Problem.LOGIN) for t in login]
                          + [(t, Problem.SEND_AS) for t in send_as]
                          + [(t, None) for t in neither]):
        code, _, rest = text.partition(" ")
        assert classify(Reply(int(code), rest)).problem is problem, text


class _Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def login_refused(self, profile: str, mailbox: str, reply: Reply, *,
                      fresh_token: bool) -> None:
        self.events.append(("login_refused", profile, str(reply.code), str(fresh_token)))

    def logged_in(self, profile: str, mailbox: str, *, delivered: bool) -> None:
        self.events.append(("logged_in", profile, str(delivered)))

    def send_as_denied(self, profile: str, mailbox: str, reply: Reply) -> None:
        self.events.append(("send_as_denied", profile, str(reply.code)))


async def test_the_deliverer_reports_what_each_attempt_showed(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    from relay.core.message import Content, Outbound
    from relay.deliver.deliverer import Deliverer

    relay = await start_relay(overrides())
    hooks = _Recorder()
    deliverer = Deliverer(relay.config, relay.tokens, hooks=hooks)

    def message(sender: str = "relay@contoso.com") -> Outbound:
        return Outbound(id="T1", profile="system", mail_from=sender,
                        rcpt_tos=["someone@example.com"],
                        content=Content.from_bytes(f"From: {sender}\r\n\r\nhi\r\n".encode()),
                        mailbox="relay@contoso.com", client="127.0.0.1")

    try:
        assert (await deliverer.deliver(message())).reply.ok
        # Exchange says mid-session that the relay is not authenticated (wrapped as 451).
        sandbox.exchange.fail_next("mail", 530, "5.7.57 Client not authenticated to send mail")
        assert (await deliverer.deliver(message())).reply.code == 451
        # An unknown recipient: logged in, not delivered.
        sandbox.exchange.fail_next("rcpt", 550, "5.1.1 User unknown")
        assert (await deliverer.deliver(message())).reply.code == 550
        assert (await deliverer.deliver(message("app@contoso.com"))).reply.code == 554
        # Refused with the first token and with a fresh one too (a new session: the
        # pooled one would be reused without a login).
        await sandbox.exchange.disconnect_all()
        sandbox.exchange.fail_next("auth", 535, "5.7.3 Authentication unsuccessful", count=2)
        assert (await deliverer.deliver(message())).reply.code == 451
        # Refused once, accepted with a fresh token: a login that works.
        sandbox.exchange.fail_next("auth", 535, "5.7.3 Authentication unsuccessful")
        assert (await deliverer.deliver(message())).reply.ok
    finally:
        await deliverer.aclose()
    assert hooks.events == [
        ("logged_in", "system", "True"),
        ("login_refused", "system", "451", "False"),
        ("logged_in", "system", "False"),
        ("logged_in", "system", "False"),
        ("send_as_denied", "system", "554"),
        ("login_refused", "system", "535", "True"),
        ("logged_in", "system", "True"),
    ]


async def test_send_as_denied_without_a_waiting_client_despite_the_delivery_reports(
        start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """Without delivery.synchronous each refused message is bounced: a delivery report
    from the mailbox itself, which Exchange accepts. The relay's own reports are not the
    profile's mail being delivered, so they do not reset the count."""
    relay = await start_relay(overrides({"delivery": {"synchronous": None},
                                         "profiles": {"system": {"sender_policy": "keep"}}}))
    for n in range(1, SEND_AS_DENIALS + 1):
        assert (await send(relay, "app@contoso.com")).code == 250          # queued
        # Wait for the report about this message: it was refused and bounced.
        await wait_until(lambda n=n: sum(m.rcpt_tos == ["app@contoso.com"]
                                         for m in sandbox.exchange.messages) == n)
    status, checks = await readyz(relay)
    assert status == 503, checks
    assert f"{SEND_AS_DENIALS} messages in a row refused" in checks["profile system"]
    assert (await send(relay, "relay@contoso.com")).code == 250
    await eventually(lambda: _ready(relay))
