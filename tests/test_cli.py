"""The command line, run as a user would: real processes, real sockets, sandbox stand-ins."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import __version__
from relay.app import Relay
from relay.receive.passwords import PasswordVerifier
from relay.sandbox.service import Sandbox
from tests.conftest import PASSWORDS, address

ROOT = Path(__file__).resolve().parent.parent

SANDBOX_CONFIG = """
server:
  listeners: [{address: 127.0.0.1, port: 0}]
http: {port: 0}
profiles:
  system: {mailbox: relay@contoso.com, credential: main}
routing: {system_profile: system}
credentials:
  main:
    tenant_id: contoso
    client_id: app
    client_secret: {env: SECRET_THAT_IS_NOT_SET}
"""


def relay_cmd(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SECRET_THAT_IS_NOT_SET"}
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, **kw)  # type: ignore[call-overload]


@pytest.fixture
def sandbox_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(SANDBOX_CONFIG))
    return path


def test_version() -> None:
    res = relay_cmd("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"smtp-oauth-relay {__version__}"


def test_no_command_is_a_usage_error() -> None:
    res = relay_cmd()
    assert res.returncode == 2
    assert "usage:" in res.stderr


async def test_hash_password_roundtrip() -> None:
    res = relay_cmd("hash-password", "--stdin", input="correct horse battery\n")
    assert res.returncode == 0, res.stderr
    encoded = res.stdout.strip()
    assert encoded.startswith("$scrypt$")
    assert "correct horse" not in res.stdout
    verifier = PasswordVerifier({"u": encoded})
    assert await verifier.verify("u", b"correct horse battery")
    assert not await verifier.verify("u", b"correct horse battery!")


def test_hash_password_rejects_short() -> None:
    res = relay_cmd("hash-password", "--stdin", input="short\n")
    assert res.returncode == 1
    assert "at least 8" in res.stderr


def test_run_without_secret_fails_naming_the_setting(sandbox_config: Path) -> None:
    res = relay_cmd("run", "--config", str(sandbox_config))
    assert res.returncode == 78
    assert ("credentials.main.client_secret: environment variable SECRET_THAT_IS_NOT_SET "
            "is not set") in res.stderr
    assert "SANDBOX" not in res.stderr                  # never a silent fallback


def test_token_in_sandbox(sandbox_config: Path, tmp_path: Path) -> None:
    res = relay_cmd("token", "--config", str(sandbox_config), "--sandbox",
                    "--sandbox-dir", str(tmp_path / "sb"))
    assert res.returncode == 0, res.stderr
    assert re.search(r"audience:\s+https://outlook\.office365\.com", res.stdout)
    assert re.search(r"tenant:\s+contoso", res.stdout)
    assert re.search(r"roles:\s+SMTP\.SendAsApp", res.stdout)
    assert "expires_in" in res.stdout
    assert "warning" not in res.stderr


def test_token_json_in_sandbox(sandbox_config: Path, tmp_path: Path) -> None:
    import json

    res = relay_cmd("token", "--config", str(sandbox_config), "--sandbox", "--json",
                    "--sandbox-dir", str(tmp_path / "sb"))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["roles"] == ["SMTP.SendAsApp"]
    assert 3000 < info["expires_in"] <= 3600


def test_send_test_in_sandbox(sandbox_config: Path, tmp_path: Path) -> None:
    res = relay_cmd("send-test", "--config", str(sandbox_config), "--sandbox",
                    "--sandbox-dir", str(tmp_path / "sb"), "--to", "you@example.com")
    assert res.returncode == 0, res.stderr
    sent = re.search(r"^([0-9A-F]{12}): 250 ", res.stdout, re.M)
    assert sent, res.stdout
    [eml] = (tmp_path / "sb" / "mail").glob("*.eml")
    assert b"To: you@example.com" in eml.read_bytes()
    assert eml.name.endswith(f"-{sent.group(1)}.eml")       # the id send-test printed


def _sandbox_run(config: Path, sandbox_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "run", "--sandbox", "--config", str(config),
         "--sandbox-dir", str(sandbox_dir), *extra],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)


@contextlib.contextmanager
def running_sandbox(config: Path, sandbox_dir: Path, *extra: str,
                    ) -> Iterator[subprocess.Popen[str]]:
    """`run --sandbox` as `make run` starts it; SIGTERM at the end must stop it with 0."""
    proc = _sandbox_run(config, sandbox_dir, *extra)
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sandbox_run_delivers_and_stops_on_sigterm(sandbox_config: Path, tmp_path: Path) -> None:
    """What `make run` does: start in sandbox mode, take a message, keep it as a file."""
    with running_sandbox(sandbox_config, tmp_path / "sb") as proc:
        assert proc.stderr is not None
        banner = ""
        port = None
        for line in proc.stderr:
            banner += line
            if m := re.search(r"Send mail to the relay at 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port, banner
        assert "SANDBOX MODE" in banner
        assert str(tmp_path / "sb" / "mail") in banner
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("app@contoso.com")
            client.rcpt("someone@example.com")
            code, reply = client.data(b"Subject: hello\r\n\r\nfrom a legacy app\r\n")
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[1]     # "2.0.0 Ok: queued as ID"
        maildir = tmp_path / "sb" / "mail"
        deadline = time.monotonic() + 20
        while not list(maildir.glob("*.eml")) and time.monotonic() < deadline:
            time.sleep(0.05)
        [eml] = maildir.glob("*.eml")
        assert eml.read_bytes().endswith(b"from a legacy app\r\n")
        assert re.fullmatch(rf"\d{{8}}T\d{{6}}\.\d{{6}}Z-{queue_id}\.eml", eml.name), eml.name


@pytest.mark.parametrize("which", ["smtp", "http"])
def test_a_taken_port_in_sandbox_mode_says_how_to_pick_another(
        which: str, tmp_path: Path) -> None:
    """`make run` while Mailpit holds 8025 (or something else 2525): one line naming the
    port, and how to choose others; exit 69, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        text = textwrap.dedent(SANDBOX_CONFIG)
        config.write_text(text.replace("{address: 127.0.0.1, port: 0}",
                                       f"{{address: 127.0.0.1, port: {port}}}")
                          if which == "smtp" else text.replace("http: {port: 0}",
                                                               f"http: {{port: {port}}}"))
        proc = _sandbox_run(config, tmp_path / "sb")
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 69, stderr
    what = (f"cannot listen on 127.0.0.1:{port}" if which == "smtp" else
            f"cannot listen on 127.0.0.1:{port} for the HTTP endpoint (http.address, "
            "http.port; or http.enabled: false)")
    [line] = [x for x in stderr.splitlines() if "cannot start" in x]
    assert line.endswith(
        f"cannot start: {what}: Address already in use; in sandbox mode choose free ports "
        "with --smtp-port and --http-port (make run SMTP_PORT=2526 HTTP_PORT=8026), or "
        "another config (make run CONFIG=my-config.yaml)"), line
    assert "Traceback" not in stderr and "[Errno" not in stderr


def test_sandbox_ports_from_the_command_line(sandbox_config: Path, tmp_path: Path) -> None:
    """--smtp-port and --http-port (what `make run SMTP_PORT=... HTTP_PORT=...` passes)
    replace the config's ports in sandbox mode, also across a reload."""
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        smtp_port, http_port = s1.getsockname()[1], s2.getsockname()[1]
    with running_sandbox(sandbox_config, tmp_path / "sb",
                         "--smtp-port", str(smtp_port), "--http-port", str(http_port)) as proc:
        assert proc.stderr is not None
        seen = ""
        for line in proc.stderr:
            seen += line
            if "Send mail to the relay at" in line:
                break
        assert f"Send mail to the relay at 127.0.0.1:{smtp_port} " in seen, seen
        assert f"http endpoint on http://127.0.0.1:{http_port} " in seen, seen
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            seen += line
            if "configuration reloaded" in line:
                break
        assert f"configuration reloaded; SMTP listeners: 127.0.0.1:{smtp_port}" in seen
        # The same file again: nothing changed, so the sandbox's credential is the same
        # one, with its token (it used to get a new secret, and fetch anew, each time).
        assert "reload: no setting changed" in seen
        assert "credential main changed" not in seen


def test_sandbox_ports_are_for_the_sandbox_only(sandbox_config: Path) -> None:
    res = relay_cmd("run", "--config", str(sandbox_config), "--smtp-port", "2526")
    assert res.returncode == 2
    assert res.stderr == ("error: --smtp-port and --http-port are for --sandbox: a relay "
                          "for real listens where its config says\n")


def test_make_run_passes_the_ports_and_the_config() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    res = subprocess.run(["make", "-n", "-s", "-o", ".venv/.installed", "run",
                          "SMTP_PORT=2526", "HTTP_PORT=8026", "CONFIG=my.yaml"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(
        "smtp-oauth-relay run --sandbox --config my.yaml --smtp-port 2526 --http-port 8026")


@pytest.mark.client
@pytest.mark.skipif(shutil.which("swaks") is None,
                    reason="swaks is not installed (apt-get install swaks; .ci/run does)")
async def test_swaks_with_auth_login(relay: Relay, sandbox: Sandbox) -> None:
    host, port = address(relay)
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{host}:{port}", "--ehlo", "swaks.test",
        "--from", "alice@contoso.com", "--to", "to@example.com",
        "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
        "--header", "Subject: sent by swaks",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    transcript = out.decode(errors="replace")
    assert proc.returncode == 0, transcript
    assert "235 " in transcript
    [got] = sandbox.exchange.messages
    assert got.mailbox == "alice@contoso.com"
    assert got.rcpt_tos == ["to@example.com"]
    assert b"Subject: sent by swaks" in got.data


@pytest.mark.parametrize(("claims", "warnings"), [
    ({}, []),
    ({"roles": None}, ["no SMTP.SendAsApp role", "RBAC for Applications"]),
    ({"roles": None, "scp": "SMTP.Send"}, ["delegated token", "no SMTP.SendAsApp role"]),
])
async def test_token_warns_about_what_exchange_will_refuse(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str], claims: dict[str, object],
        warnings: list[str]) -> None:
    """`token` says so when the token lacks the app role (or is delegated), exit 0 still:
    with RBAC for Applications a token without the role is right."""
    from relay.cli import token
    from tests.conftest import build_config

    sandbox.entra.extra_claims = dict(claims)
    args = argparse.Namespace(credential=None, profile=None, json=False, config="c.yaml")
    assert await token.show(args, sandbox.apply(build_config())) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^audience:\s+https://outlook\.office365\.com$", out, re.M)
    for text in warnings:
        assert text in err
    assert ("warning" in err) == bool(warnings)


def test_run_refuses_a_spool_on_tmpfs_without_a_traceback(tmp_path: Path) -> None:
    from relay.spool.disk import filesystem_type

    if filesystem_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs on this machine")
    spool = Path(tempfile.mkdtemp(prefix="relay-spool-", dir="/dev/shm"))
    try:
        config = tmp_path / "config.yaml"
        text = textwrap.dedent(SANDBOX_CONFIG).replace("{env: SECRET_THAT_IS_NOT_SET}",
                                                       "{value: not-used}")
        config.write_text(text + f"spool: {{directory: {spool}}}\n")
        res = relay_cmd("run", "--config", str(config))
        assert res.returncode == 78, res.stderr
        assert "tmpfs" in res.stderr and "spool.on_tmpfs: warn" in res.stderr
        assert "Traceback" not in res.stderr
        assert list(spool.iterdir()) == []          # not one directory left behind
    finally:
        shutil.rmtree(spool, ignore_errors=True)
