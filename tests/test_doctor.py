"""`smtp-oauth-relay doctor` against the stand-ins: every way the setup can be wrong.

Each test breaks one thing - the config, DNS, TCP, TLS, Entra ID, the token's claims,
Exchange's login or envelope checks, the credential's expiry - and checks that the doctor
names that step, says how to fix it, skips only what depends on it, and exits 1 (0 when
there are only warnings). The command runs in-process through ``relay.cli.main`` in a
worker thread, so that the stand-ins keep serving on the test's event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from relay.cli import main
from relay.core import log as relay_log
from relay.sandbox.pki import create_pki
from relay.sandbox.service import Sandbox
from tests.relayproc import merge

ROOT = Path(__file__).resolve().parent.parent
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "relay-app"
SECRET = "Xq8~doctor.Secret-Value_0123456789"
MAILBOX = "relay@contoso.com"
CHAIN = ["config", "dns", "connect", "tls", "token", "claims", "login", "envelope", "expiry"]


@pytest.fixture(autouse=True)
def _isolation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy for loopback; and undo the logging set-up the command does in-process."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in relay_log._NOISY}
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def reports(self) -> list[dict[str, Any]]:
        return json.loads(self.out)

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        """The steps of the only profile checked, by name."""
        [report] = self.reports
        return {s["name"]: s for s in report["steps"]}

    def status(self) -> dict[str, str]:
        return {name: s["status"] for name, s in self.steps.items()}


class Env:
    """A config file pointing at the sandbox's stand-ins, and a way to run the doctor."""

    def __init__(self, sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
        self.sandbox = sandbox
        self.tmp_path = tmp_path
        self.capsys = capsys
        self.ca_file = create_pki(sandbox.directory / "pki").ca_file  # the sandbox's own CA
        sandbox.entra.add_app(TENANT, CLIENT, secret=SECRET)
        self.data: dict[str, Any] = {
            "server": {"hostname": "relay.test"},
            "profiles": {"system": {"mailbox": MAILBOX, "credential": "main",
                                    "upstream": "fake"}},
            "routing": {"system_profile": "system"},
            "credentials": {"main": {"tenant_id": TENANT, "client_id": CLIENT,
                                     "authority": sandbox.entra.url,
                                     "ca_file": str(self.ca_file),
                                     "client_secret": {"value": SECRET}}},
            "upstreams": {"fake": {"host": sandbox.exchange.host,
                                   "port": sandbox.exchange.port,
                                   "ca_file": str(self.ca_file), "timeout": 5}},
        }

    def config(self, overrides: dict[str, Any] | None = None) -> Path:
        data = copy.deepcopy(self.data)
        merge(data, overrides or {})
        path = self.tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    async def run(self, *args: str, overrides: dict[str, Any] | None = None,
                  json_output: bool = True) -> Result:
        argv = ["doctor", "--config", str(self.config(overrides)), "--timeout", "5", *args]
        if json_output:
            argv.append("--json")
        code = await asyncio.to_thread(main, argv)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)


@pytest.fixture
def env(sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Env:
    return Env(sandbox, tmp_path, capsys)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- all good ------------------------------------------------------------------------------

async def test_all_ok_text_exit_0_and_nothing_sent(env: Env) -> None:
    res = await env.run(json_output=False)
    assert res.code == 0, res.out
    for name in CHAIN[:-1]:
        assert re.search(rf"^  \[ OK \] {name}\b", res.out, re.M), (name, res.out)
    assert re.search(r"^  \[INFO\] expiry +client secret expiry unknown; set "
                     r"credentials\.main\.secret_expires", res.out, re.M)
    assert "[FAIL]" not in res.out and "[WARN]" not in res.out
    assert res.out.rstrip().endswith("all checks passed for 1 profile(s)")
    assert res.err == ""                                   # no log lines around the checklist
    exchange = env.sandbox.exchange
    assert exchange.messages == []                         # dry run: nothing was sent
    assert "RSET" in exchange.commands and "DATA" not in exchange.commands
    assert f"MAIL FROM:<{MAILBOX}> SIZE=" in " ".join(exchange.commands)
    for token in env.sandbox.entra.issued_tokens:
        assert token not in res.out and token[-40:] not in res.out
    assert SECRET not in res.out


async def test_json_shape(env: Env) -> None:
    res = await env.run()
    assert res.code == 0
    [report] = res.reports
    assert set(report) == {"profile", "mailbox", "credential", "upstream", "status", "steps"}
    assert report["profile"] == "system" and report["mailbox"] == MAILBOX
    assert report["credential"] == "main" and report["status"] == "ok"
    assert report["upstream"] == f"127.0.0.1:{env.sandbox.exchange.port}"
    assert [s["name"] for s in report["steps"]] == CHAIN
    for step in report["steps"]:
        assert set(step) == {"name", "status", "detail", "fix"}
        assert isinstance(step["detail"], str) and step["detail"]
    assert res.status() == dict.fromkeys(CHAIN, "ok") | {"expiry": "info"}
    assert "role SMTP.SendAsApp" in res.steps["claims"]["detail"]


async def test_every_profile_or_one(env: Env) -> None:
    two = {"profiles": {"alice": {"mailbox": "alice@contoso.com", "credential": "main",
                                  "upstream": "fake"}}}
    res = await env.run(overrides=two)
    assert [r["profile"] for r in res.reports] == ["system", "alice"]
    assert env.sandbox.entra.token_requests == 1          # one token per credential
    res = await env.run("--profile", "alice", overrides=two)
    assert [r["profile"] for r in res.reports] == ["alice"]
    assert res.steps["login"]["detail"] == "XOAUTH2 login accepted for alice@contoso.com"


# --- config ------------------------------------------------------------------------------

async def test_bad_config_is_the_only_step(env: Env) -> None:
    res = await env.run(overrides={"credentials": {"main": {"tennant_id": "typo"}}})
    assert res.code == 1
    [report] = res.reports
    assert report["profile"] is None
    [step] = report["steps"]
    assert step["name"] == "config" and step["status"] == "fail"
    assert "credentials.main.tennant_id: unknown setting" in step["detail"]
    assert "smtp-oauth-relay check" in step["fix"]


async def test_unknown_profile(env: Env) -> None:
    res = await env.run("--profile", "nope", json_output=False)
    assert res.code == 1
    assert "[FAIL] config" in res.out
    assert "no profile named 'nope' (known: system)" in res.out
    assert "nothing else was checked" in res.out


# --- network and TLS -----------------------------------------------------------------------

async def test_dns_failure_skips_the_connection_but_not_the_token(env: Env) -> None:
    res = await env.run(overrides={"upstreams": {"fake": {"host": "nonexistent.invalid"}}})
    assert res.code == 1
    assert res.status() == {"config": "ok", "dns": "fail", "connect": "skip", "tls": "skip",
                            "token": "ok", "claims": "ok", "login": "skip",
                            "envelope": "skip", "expiry": "info"}
    dns = res.steps["dns"]
    assert dns["detail"].startswith("cannot resolve nonexistent.invalid")
    assert "upstreams.fake.host" in dns["fix"] and "DNS resolver" in dns["fix"]


async def test_tcp_refused(env: Env) -> None:
    port = closed_port()
    res = await env.run(overrides={"upstreams": {"fake": {"port": port}}})
    assert res.code == 1
    steps = res.steps
    assert steps["dns"]["status"] == "ok"
    assert steps["connect"]["status"] == "fail"
    assert f"127.0.0.1:{port}: connection refused" in steps["connect"]["detail"]
    assert "nothing accepts connections" in steps["connect"]["fix"]
    assert "upstreams.fake.host and port" in steps["connect"]["fix"]
    assert steps["tls"]["status"] == "skip" and steps["login"]["status"] == "skip"


async def test_no_starttls_means_no_token_sent(env: Env) -> None:
    env.sandbox.exchange.offer_starttls = False
    res = await env.run()
    assert res.code == 1
    steps = res.steps
    assert steps["connect"]["status"] == "ok"
    assert steps["tls"]["status"] == "fail"
    assert "does not offer STARTTLS" in steps["tls"]["detail"]
    assert "inspect esmtp" in steps["tls"]["fix"]
    assert steps["login"] == {"name": "login", "status": "skip", "fix": None,
                              "detail": "not run: no TLS connection to the upstream"}
    assert not any(c.startswith("AUTH") for c in env.sandbox.exchange.commands)


async def test_wrong_ca_names_the_certificate_problem(env: Env) -> None:
    other = create_pki(env.tmp_path / "other-ca")
    res = await env.run(overrides={"upstreams": {"fake": {"ca_file": str(other.ca_file)}}})
    assert res.code == 1
    tls = res.steps["tls"]
    assert tls["status"] == "fail"
    assert "certificate verify failed (unable to get local issuer certificate)" in tls["detail"]
    assert "not signed by the CA in upstreams.fake.ca_file" in tls["fix"]
    assert "TLS-inspecting proxy's own CA" in tls["fix"]
    assert res.steps["token"]["status"] == "ok"           # independent of the upstream
    assert res.steps["login"]["status"] == "skip"


async def test_silent_server_times_out(env: Env) -> None:
    with socket.socket() as silent:             # the kernel accepts; nobody ever greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        res = await env.run("--timeout", "0.5",
                            overrides={"upstreams": {"fake": {"port": port}}})
    assert res.code == 1
    connect = res.steps["connect"]
    assert connect["status"] == "fail"
    assert f"127.0.0.1:{port}: no answer within 0.5 s" in connect["detail"]
    assert "a firewall probably drops outbound connections to port" in connect["fix"]


async def test_tls_handshake_failure(env: Env) -> None:
    """Implicit TLS against a STARTTLS port: the handshake, not the certificate, fails."""
    res = await env.run(overrides={"upstreams": {"fake": {"tls": "implicit"}}})
    assert res.code == 1
    tls = res.steps["tls"]
    assert tls["status"] == "fail"
    assert "TLS handshake with upstream" in tls["detail"]
    assert "the TLS handshake failed" in tls["fix"] and "STARTTLS" not in tls["fix"]


# --- Entra ID and the token -----------------------------------------------------------------

@pytest.mark.parametrize(("credential", "code", "advice", "step"), [
    ({"client_secret": {"value": "the-secret-id-not-its-value"}}, "AADSTS7000215",
     "use the secret's *Value*", "step 2: Credential"),
    ({"tenant_id": "no-such-tenant.onmicrosoft.com"}, "AADSTS90002", "the tenant was not found",
     "step 1: App registration"),
    ({"client_id": "no-such-app"}, "AADSTS700016", "client) id was not found",
     "step 1: App registration"),
], ids=["wrong-secret", "unknown-tenant", "unknown-app"])
async def test_entra_errors_are_explained(env: Env, credential: dict[str, Any], code: str,
                                          advice: str, step: str) -> None:
    res = await env.run(overrides={"credentials": {"main": credential}})
    assert res.code == 1
    token = res.steps["token"]
    assert token["status"] == "fail"
    assert token["detail"].startswith("Entra ID said: ") and code in token["detail"]
    assert advice in token["fix"] and step in token["fix"]
    assert res.status() | {"token": "-"} == {
        "config": "ok", "dns": "ok", "connect": "ok", "tls": "ok", "token": "-",
        "claims": "skip", "login": "skip", "envelope": "skip", "expiry": "info"}
    assert "the-secret-id-not-its-value" not in res.out


async def test_missing_role_is_only_a_warning_with_rbac_for_applications(env: Env) -> None:
    env.sandbox.entra.add_app(TENANT, CLIENT, secret=SECRET, roles=())
    env.sandbox.exchange.require_send_as_role = False       # RBAC for Applications
    res = await env.run(json_output=False)
    assert res.code == 0, res.out
    assert re.search(r"^  \[WARN\] claims +no SMTP\.SendAsApp role in the token", res.out, re.M)
    assert "fix: add API permission Office 365 Exchange Online > Application permissions" \
        in res.out
    assert "RBAC for Applications" in res.out
    assert re.search(r"^  \[ OK \] login", res.out, re.M)
    assert "no failures, 1 warning(s)" in res.out


async def test_missing_role_without_rbac_fails_at_login(env: Env) -> None:
    env.sandbox.entra.add_app(TENANT, CLIENT, secret=SECRET, roles=())
    res = await env.run()
    assert res.code == 1
    assert res.steps["claims"]["status"] == "warn"
    login = res.steps["login"]
    assert login["status"] == "fail" and "535 5.7.3" in login["detail"]
    assert "The token also has no SMTP.SendAsApp role" in login["fix"]


async def test_wrong_audience(env: Env) -> None:
    res = await env.run(overrides={"credentials": {"main": {
        "scope": "https://graph.microsoft.com/.default"}}})
    assert res.code == 1
    claims = res.steps["claims"]
    assert claims["status"] == "fail"
    assert ("the token is for https://graph.microsoft.com, but Exchange Online (global cloud) "
            "needs https://outlook.office365.com") in claims["detail"]
    assert "set credentials.main.scope to https://outlook.office365.com/.default" \
        in claims["fix"]
    assert res.steps["login"]["detail"] == "not run: the token cannot work (see claims)"
    assert env.sandbox.exchange.auth_attempts == []


async def test_wrong_tenant(env: Env) -> None:
    env.sandbox.entra.extra_claims = {"tid": "fabrikam-tenant"}
    res = await env.run()
    assert res.code == 1
    claims = res.steps["claims"]
    assert claims["status"] == "fail"
    assert ("the token's tenant (tid) is fabrikam-tenant, not the configured tenant_id "
            f"{TENANT}") in claims["detail"]
    assert "credentials.main.tenant_id" in claims["fix"]
    assert res.steps["login"]["status"] == "skip"


async def test_delegated_token(env: Env) -> None:
    env.sandbox.entra.extra_claims = {"scp": "SMTP.Send", "roles": None}
    res = await env.run()
    assert res.code == 1
    claims = res.steps["claims"]
    assert claims["status"] == "fail"
    assert "a delegated token (scp: SMTP.Send)" in claims["detail"]
    assert "*Application* permissions > SMTP.SendAsApp" in claims["fix"]
    assert "step 3: API permission" in claims["fix"]
    assert res.steps["login"]["status"] == "skip"


# --- Exchange ------------------------------------------------------------------------------

async def test_535_5_7_3_mailbox_not_granted(env: Env) -> None:
    env.sandbox.exchange.grant("someone-else@contoso.com")
    res = await env.run()
    assert res.code == 1
    login = res.steps["login"]
    assert login["status"] == "fail"
    assert login["detail"].startswith("535 5.7.3 Authentication unsuccessful")
    fix = login["fix"]
    assert "Exchange rejected the app's token for this mailbox" in fix    # the classifier's
    m = re.search(rf"New-ServicePrincipal -AppId {CLIENT} -ObjectId ([0-9a-f-]{{36}})\n", fix)
    assert m, fix
    assert (f"Add-MailboxPermission -Identity {MAILBOX} -User {m.group(1)} "
            "-AccessRights FullAccess") in fix
    assert "step 4: Service principal in Exchange" in fix
    assert "SMTP.SendAsApp role" not in fix               # the token has the role
    assert res.steps["envelope"]["status"] == "skip"


async def test_535_5_7_139_smtp_auth_disabled_text(env: Env) -> None:
    env.sandbox.exchange.fail_next(
        "auth", 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                     "disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled")
    res = await env.run(json_output=False)
    assert res.code == 1
    assert re.search(r"^  \[FAIL\] login +535 5\.7\.139 Authentication unsuccessful", res.out,
                     re.M)
    lines = res.out.splitlines()
    fix = next(i for i, line in enumerate(lines) if line.startswith("         fix: SMTP AUTH"))
    block = "\n".join(lines[fix:fix + 7])
    assert (f"              Set-CASMailbox -Identity {MAILBOX} "
            "-SmtpClientAuthenticationDisabled $false") in block
    assert "Set-TransportConfig -SmtpClientAuthenticationDisabled $false" in block
    assert "Security defaults" in block and "step 5: SMTP AUTH enabled" in block
    assert re.search(r"^  \[SKIP\] envelope +not run: no login", res.out, re.M)


async def test_temporary_refusal_at_login(env: Env) -> None:
    env.sandbox.exchange.fail_next("auth", 454, "4.7.0 Temporary authentication failure")
    res = await env.run()
    assert res.code == 1
    login = res.steps["login"]
    assert login["status"] == "fail"
    assert login["detail"] == "454 4.7.0 Temporary authentication failure"
    assert "the upstream did not complete the login" in login["fix"]


@pytest.mark.parametrize(("stage", "reply", "explained"), [
    ("mail", "5.7.60 SMTP; Client does not have permissions to send as this sender",
     "lacks Send As permission"),
    ("rcpt", "5.1.1 RESOLVER.ADR.RecipNotFound; not found", "does not exist"),
])
async def test_mail_or_rcpt_refused(env: Env, stage: str, reply: str, explained: str) -> None:
    env.sandbox.exchange.fail_next(stage, 550, reply)
    res = await env.run()
    assert res.code == 1
    envelope = res.steps["envelope"]
    command = "MAIL FROM" if stage == "mail" else "RCPT TO"
    assert envelope["status"] == "fail"
    assert envelope["detail"] == f"{command}: 550 {reply}"
    assert explained in envelope["fix"]
    assert "DATA" not in env.sandbox.exchange.commands
    assert env.sandbox.exchange.messages == []


async def test_send_to_delivers_one_message(env: Env) -> None:
    res = await env.run("--send-to", "you@example.com")
    assert res.code == 0, res.out
    assert list(res.steps) == [*CHAIN[:-1], "send", "expiry"]
    assert res.steps["send"]["status"] == "ok"
    assert "to you@example.com accepted: 250 2.0.0 OK" in res.steps["send"]["detail"]
    [msg] = env.sandbox.exchange.messages
    assert msg.mailbox == MAILBOX and msg.mail_from == MAILBOX
    assert msg.rcpt_tos == ["you@example.com"]
    assert f"From: {MAILBOX}\r\n".encode() in msg.data
    assert b"sent by `smtp-oauth-relay doctor`" in msg.data


async def test_send_to_is_skipped_after_a_failure(env: Env) -> None:
    env.sandbox.exchange.fail_next("rcpt", 550, "5.1.1 not found")
    res = await env.run("--send-to", "you@example.com")
    assert res.code == 1
    assert res.steps["send"]["status"] == "skip"
    assert env.sandbox.exchange.messages == []


# --- expiry --------------------------------------------------------------------------------

@pytest.mark.parametrize(("days", "status", "code", "text"), [
    (10, "warn", 0, "the client secret expires in 10 days ({when})"),
    (0, "warn", 0, "the client secret expires today ({when})"),
    (-1, "fail", 1, "the client secret expired ({when})"),
    (400, "ok", 0, "the client secret is valid until {when} (400 days)"),
])
async def test_secret_expiry(env: Env, days: int, status: str, code: int, text: str) -> None:
    when = dt.date.today() + dt.timedelta(days=days)
    res = await env.run(overrides={"credentials": {"main": {
        "secret_expires": when.isoformat()}}})
    assert res.code == code
    expiry = res.steps["expiry"]
    assert expiry["status"] == status
    assert expiry["detail"] == text.format(when=when.isoformat())
    if status != "ok":
        assert "create a new client secret" in expiry["fix"]
        assert "credentials.main.secret_expires" in expiry["fix"]
    assert res.steps["login"]["status"] == "ok"           # a date changes nothing else


def _certificate(directory: Path, not_after: dt.datetime) -> tuple[Path, Path, Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay app")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=365)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    files = directory / "app.key", directory / "app.pem", directory / "app.pfx"
    files[0].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    files[1].write_bytes(pem)
    files[2].write_bytes(pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass")))
    return *files, pem


async def test_certificate_close_to_expiry_warns(env: Env) -> None:
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1)
    key_file, pem_file, _, pem = _certificate(env.tmp_path, not_after)
    env.sandbox.entra.add_app(TENANT, "cert-app", certificate_pem=pem)
    res = await env.run(overrides={"credentials": {"main": {
        "client_id": "cert-app", "client_secret": None,
        "certificate": {"private_key_file": str(key_file),
                        "public_certificate_file": str(pem_file)}}}})
    assert res.code == 0, res.out
    assert res.steps["token"]["status"] == "ok"
    expiry = res.steps["expiry"]
    assert expiry["status"] == "warn"
    assert expiry["detail"].startswith("the certificate expires in 10 days (")
    assert "create a new certificate" in expiry["fix"]


async def test_expired_pfx_certificate_fails(env: Env) -> None:
    not_after = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    _, _, pfx_file, pem = _certificate(env.tmp_path, not_after)
    env.sandbox.entra.add_app(TENANT, "cert-app", certificate_pem=pem)
    res = await env.run(overrides={"credentials": {"main": {
        "client_id": "cert-app", "client_secret": None,
        "certificate": {"pfx_file": str(pfx_file), "passphrase": {"value": "pfx-pass"}}}}})
    assert res.code == 1
    expiry = res.steps["expiry"]
    assert expiry["status"] == "fail"
    assert expiry["detail"] == f"the certificate expired ({not_after:%Y-%m-%d %H:%M} UTC)"


async def test_unreadable_pfx_is_named(env: Env) -> None:
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=100)
    _, _, pfx_file, pem = _certificate(env.tmp_path, not_after)
    env.sandbox.entra.add_app(TENANT, "cert-app", certificate_pem=pem)
    res = await env.run(overrides={"credentials": {"main": {
        "client_id": "cert-app", "client_secret": None,
        "certificate": {"pfx_file": str(pfx_file), "passphrase": {"value": "wrong-pass"}}}}})
    assert res.code == 1
    assert res.steps["expiry"]["detail"].startswith(
        "cannot open credentials.main.certificate.pfx_file")
    assert "wrong-pass" not in res.out


# --- as a user runs it ---------------------------------------------------------------------

def test_subprocess_sandbox_run(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "profiles": {"system": {"mailbox": MAILBOX, "credential": "main"}},
        "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "app",
                                 "client_secret": {"env": "SECRET_THAT_IS_NOT_SET"},
                                 "secret_expires": (dt.date.today() + dt.timedelta(days=5))
                                 .isoformat()}}}))
    res = subprocess.run(
        [sys.executable, "-m", "relay", "doctor", "--config", str(config), "--sandbox",
         "--sandbox-dir", str(tmp_path / "sb")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr      # a warning alone: exit 0
    assert re.search(r"^  \[ OK \] login +XOAUTH2 login accepted for relay@contoso\.com$",
                     res.stdout, re.M)
    # the expiry date comes from the real credential, which the sandbox replaces
    assert re.search(r"^  \[WARN\] expiry +the client secret expires in 5 days", res.stdout,
                     re.M)
    assert res.stderr == ""
