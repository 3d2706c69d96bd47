"""``smtp-oauth-relay init`` as an installer runs it: real processes in a scratch directory,
answers as flags or piped in, doctor against the sandbox stand-ins; then ``check``, run
on its own as the service's ``ExecStartPre=`` would, takes what it wrote."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay.cli.init import microsoft_steps
from relay.ops.install import Answers

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Sup3r~Secret.Value-xyz"
TENANT, CLIENT = "00000000-0000-0000-0000-000000000000", "11111111-1111-1111-1111-111111111111"
USER = pwd.getpwuid(os.geteuid()).pw_name
GROUP = grp.getgrgid(os.getegid()).gr_name
# What check says of the default spool when run as root, as init usually is.
ROOT_NOTE = ([] if os.geteuid() else [
    "note: spool.directory /var/lib/smtp-oauth-relay/spool was checked as root, who may "
    "write anywhere; the user the relay runs as must be able to write it too (under "
    "systemd, StateDirectory= sees to it; or run check as that user)"])
FLAGS = ["--tenant-id", TENANT, "--client-id", CLIENT, "--mailbox", "relay@contoso.com",
         "--group", GROUP]


def relay(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    res = subprocess.run([sys.executable, "-m", "relay", *args], input=stdin,
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert SECRET not in res.stdout + res.stderr  # never, whatever happened
    return res


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "smtp-oauth-relay"


def test_scripted_init_writes_checks_and_doctors(etc: Path, tmp_path: Path) -> None:
    config = etc / "config.yaml"
    res = relay("init", "--config", str(config), *FLAGS, "--client-secret-stdin",
                "--non-interactive", "--sandbox", "--sandbox-dir", str(tmp_path / "sb"),
                stdin=SECRET + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == [f"created {etc} (0750, group {GROUP})",
                         f"wrote {config} (0640 {USER}:{GROUP})",
                         f"wrote {etc / 'client-secret'} (0600 {USER}:{GROUP})"]
    assert f"{config}: OK — 1 profile(s), 0 user(s), 1 credential(s), 1 listener(s)" in lines
    assert "  [ OK ] login     XOAUTH2 login accepted for relay@contoso.com" in lines
    assert "all checks passed for 1 profile(s)" in lines
    assert "Still to do on Microsoft's side" not in res.stdout  # doctor says it is done
    assert res.stderr.splitlines() == ROOT_NOTE
    assert (mode(etc), mode(config), mode(etc / "client-secret")) == (0o750, 0o640, 0o600)
    assert (etc / "client-secret").read_text() == SECRET + "\n"
    assert SECRET not in config.read_text()
    written = yaml.safe_load(config.read_text())
    assert written["credentials"]["main"]["client_secret"] == {"credential": "client-secret"}

    # The service's own check (ExecStartPre=), and an operator's by hand: the secret is
    # read from beside the config when systemd has not set CREDENTIALS_DIRECTORY.
    res = relay("check", "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{config}: OK — 1 profile(s)")


def test_piped_answers_are_asked_again_until_right(etc: Path) -> None:
    answers = [TENANT, "not-a-guid", CLIENT,
               "22222222-2222-2222-2222-222222222222",   # the secret's ID, not its Value
               SECRET, "2027-01-31", "relay.contoso.com", "relay@contoso.com",
               "0.0.0.0:2525", "10.1.0.0/16, 192.168.1.0/24", "crm", "short",
               "a long enough password", ""]
    config = etc / "config.yaml"
    res = relay("init", "--config", str(config), "--group", GROUP, "--no-doctor",
                stdin="\n".join(answers) + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.splitlines() == [
        f"Directory (tenant) ID: {TENANT}",
        "Application (client) ID: not-a-guid",
        "  the Application (client) ID is a GUID such as 11111111-1111-1111-1111-111111111111",
        f"Application (client) ID: {CLIENT}",
        "Client secret Value (hidden; empty to use a certificate): ",
        "  that is the secret's ID; give its Value (Entra admin center > Certificates & "
        "secrets, shown once when it is created)",
        "Client secret Value (hidden; empty to use a certificate): ",
        "Client secret expires on (YYYY-MM-DD, empty if unknown): 2027-01-31",
        "Mailbox the mail is sent as: relay.contoso.com",
        "  'relay.contoso.com' is not an e-mail address (expected name@domain)",
        "Mailbox the mail is sent as: relay@contoso.com",
        "Listen on [127.0.0.1:2525]: 0.0.0.0:2525",
        "Networks that may send without a login, besides this host: "
        "10.1.0.0/16, 192.168.1.0/24",
        "Local account for AUTH (empty: no more): crm",
        "Password for crm: ",
        "  use a password of at least 8 characters",
        "Password for crm: ",
        "Local account for AUTH (empty: no more): ",
        *ROOT_NOTE,
    ]
    assert "doctor: not run (--no-doctor); run `smtp-oauth-relay doctor` to check the way "\
           "to Microsoft" in res.stdout.splitlines()
    assert f"    New-ServicePrincipal -AppId {CLIENT} -ObjectId <object id of the app's "\
           "Enterprise application>" in res.stdout.splitlines()
    written = yaml.safe_load(config.read_text())
    assert written["server"]["listeners"] == [{"address": "0.0.0.0", "port": 2525}]
    assert written["server"]["relay_networks"] == ["127.0.0.0/8", "::1/128", "10.1.0.0/16",
                                                   "192.168.1.0/24"]
    assert written["users"]["crm"]["password_hash"].startswith("$scrypt$")
    assert written["credentials"]["main"]["secret_expires"] == "2027-01-31"
    assert (etc / "client-secret").read_text() == SECRET + "\n"
    assert relay("check", "--config", str(config)).returncode == 0


def test_existing_files_are_kept_unless_forced(etc: Path) -> None:
    config = etc / "config.yaml"
    args = ["init", "--config", str(config), *FLAGS, "--client-secret-stdin",
            "--non-interactive", "--no-doctor"]
    assert relay(*args, stdin=SECRET + "\n").returncode == 0
    before = config.read_text()
    res = relay(*args, "--mailbox", "other@contoso.com", stdin="Another~Secret-Value\n")
    assert res.returncode == 73
    assert res.stderr == (f"init: {config}, {etc / 'client-secret'} already exist(s); "
                          "nothing was written (--force replaces them)\n")
    assert config.read_text() == before
    res = relay(*args, "--mailbox", "other@contoso.com", "--force",
                stdin="Another~Secret-Value\n")
    assert res.returncode == 0, res.stderr
    assert "other@contoso.com" in config.read_text()
    assert (etc / "client-secret").read_text() == "Another~Secret-Value\n"
    assert (mode(config), mode(etc / "client-secret")) == (0o640, 0o600)


@pytest.mark.parametrize(("args", "stdin", "code", "message"), [
    (["--tenant-id", TENANT, "--client-id", CLIENT, "--client-secret-stdin"], SECRET, 2,
     "init: --mailbox is needed (no questions with --non-interactive)"),
    ([*FLAGS], "", 2,
     "init: --client-secret-stdin or --private-key is needed (no questions with "
     "--non-interactive)"),
    ([*FLAGS, "--client-secret-stdin"], "22222222-2222-2222-2222-222222222222", 2,
     "init: --client-secret-stdin: that is the secret's ID; give its Value (Entra admin "
     "center > Certificates & secrets, shown once when it is created)"),
    ([*FLAGS, "--client-secret-stdin", "--listen", "127.0.0.1:99999"], SECRET, 2,
     "init: --listen: Input should be less than or equal to 65535"),
    ([*FLAGS, "--client-secret-stdin", "--group", "no-such-group-here"], SECRET, 67,
     "init: there is no group 'no-such-group-here': create the service's user first "
     "(systemd-sysusers, see the README), or name its group with --group"),
])
def test_wrong_or_missing_answers(etc: Path, args: list[str], stdin: str, code: int,
                                  message: str) -> None:
    res = relay("init", "--config", str(etc / "config.yaml"), "--non-interactive",
                "--no-doctor", *args, stdin=stdin + "\n")
    assert (res.returncode, res.stderr) == (code, message + "\n")
    assert not etc.exists()


def test_a_certificate_instead_of_a_secret(etc: Path, tmp_path: Path) -> None:
    key = tmp_path / "app.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    config = etc / "config.yaml"
    res = relay("init", "--config", str(config), *FLAGS, "--private-key", str(key),
                "--thumbprint", "a1:b2" * 8 + "c3d4e5f6", "--non-interactive", "--no-doctor")
    assert res.returncode == 0, res.stderr
    assert f"wrote {etc / 'app.key'} (0640 {USER}:{GROUP})" in res.stdout.splitlines()
    assert not (etc / "client-secret").exists()
    cert = yaml.safe_load(config.read_text())["credentials"]["main"]["certificate"]
    assert cert == {"private_key_file": "app.key", "thumbprint": "A1B2" * 8 + "C3D4E5F6"}
    assert (etc / "app.key").read_bytes() == key.read_bytes()
    assert mode(etc / "app.key") == 0o640


def test_microsoft_steps_name_the_real_ids() -> None:
    answers = Answers(TENANT, CLIENT, "relay@contoso.com")
    oid = "33333333-3333-3333-3333-333333333333"
    assert microsoft_steps(answers, oid).splitlines() == [
        'Still to do on Microsoft\'s side unless done (README "Microsoft-side setup"):',
        f"  step 3: Entra admin center > App registrations > {CLIENT} >",
        "          API permissions > Add > Office 365 Exchange Online >",
        "          Application permissions > SMTP.SendAsApp; Grant admin consent",
        "  steps 4 and 5, in Exchange Online PowerShell (Connect-ExchangeOnline):",
        f"    New-ServicePrincipal -AppId {CLIENT} -ObjectId {oid}",
        f"    Add-MailboxPermission -Identity relay@contoso.com -User {oid} "
        "-AccessRights FullAccess",
        "    Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled "
        "$false",
        "  Then check again: smtp-oauth-relay doctor",
    ]
