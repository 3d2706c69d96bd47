"""The command line, run as a user would: real processes, real sockets, sandbox stand-ins."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pty
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
from tests.relayproc import sandbox_process

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
    tenant_id: contoso.onmicrosoft.com
    client_id: app
    client_secret: {env: SECRET_THAT_IS_NOT_SET}
"""


def relay_cmd(*args: str, env: dict[str, str] | None = None,
              **kw: object) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with ``env`` added to this one's environment
    (without a proxy: the tests' services are on loopback)."""
    env = {**{k: v for k, v in os.environ.items()
              if k != "SECRET_THAT_IS_NOT_SET" and not k.lower().endswith("_proxy")},
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, **kw)  # type: ignore[call-overload]


def unreachable_entra(tmp_path: Path) -> tuple[Path, str]:
    """A config whose Entra ID refuses connections, and the one line that says so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(SANDBOX_CONFIG).replace(
        "{env: SECRET_THAT_IS_NOT_SET}", f"{{value: Xq8~x}}\n    authority: https://127.0.0.1:{port}"))
    return config, (f"credential 'main': cannot reach Entra ID at 127.0.0.1:{port} ([Errno 111] "
                    "Connection refused); check DNS and firewall; if outbound traffic must go "
                    "through a proxy, set HTTPS_PROXY (and NO_PROXY for exceptions) in the "
                    "relay's environment")


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


@pytest.mark.parametrize("args", [(), ("--stdin",)])
def test_hash_password_without_input_says_so(args: tuple[str, ...]) -> None:
    res = relay_cmd("hash-password", *args, stdin=subprocess.DEVNULL)
    assert (res.returncode, res.stdout) == (1, "")
    where = "" if args else " (it is not a terminal)"
    assert res.stderr == (f"error: no password on standard input{where}: pipe it in (printf "
                          "'%s\\n' \"$PASSWORD\" | smtp-oauth-relay hash-password --stdin), or "
                          "run the command in a terminal to be asked for it\n")


def test_hash_password_ctrl_d_at_the_prompt() -> None:
    """In a terminal: a new session without /dev/tty, so getpass asks on stderr and reads
    the terminal that is standard input."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "hash-password"], cwd=ROOT,
                                stdin=follower, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stderr is not None
        prompt = ""
        while not prompt.endswith("Password: "):
            prompt += proc.stderr.read(1) or pytest.fail(f"no prompt: {prompt!r}")
        os.write(leader, b"\x04")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert (proc.returncode, out, err) == (1, "", "\nerror: no password entered\n")


@pytest.mark.parametrize(("args", "line"), [
    (("token", "--profile", "nope"), "error: no profile named 'nope' (known: system)"),
    (("token", "--credential", "nope"), "error: no credential named 'nope' (known: main)"),
    (("send-test", "--profile", "nope", "--to", "you@example.com"),
     "error: no profile named 'nope' (known: system)"),
])
def test_a_profile_the_config_does_not_have(tmp_path: Path, args: tuple[str, ...],
                                            line: str) -> None:
    config, _ = unreachable_entra(tmp_path)
    res = relay_cmd(*args, "--config", str(config))
    assert (res.returncode, res.stdout, res.stderr) == (2, "", line + "\n")


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


@contextlib.contextmanager
def running_sandbox(config: Path, sandbox_dir: Path, *extra: str,
                    ) -> Iterator[subprocess.Popen[str]]:
    """`run --sandbox` as `make run` starts it; SIGTERM at the end must stop it with 0."""
    with sandbox_process(config, sandbox_dir, *extra, stderr=subprocess.PIPE) as proc:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_token_says_once_why_there_is_no_token(tmp_path: Path) -> None:
    """One line, not the provider's log line, urllib3's retry warning and the error."""
    config, why = unreachable_entra(tmp_path)
    res = relay_cmd("token", "--config", str(config))
    assert (res.returncode, res.stdout) == (75, "")
    assert res.stderr.splitlines() == [f"error: {why}"]


def test_send_test_says_once_why_there_is_no_token(tmp_path: Path) -> None:
    """The deliverer's line, which names the profile, and the reply the message got."""
    config, why = unreachable_entra(tmp_path)
    res = relay_cmd("send-test", "--config", str(config), "--to", "you@example.com")
    assert res.returncode == 75
    assert re.fullmatch(r"[0-9A-F]{12}: 451 4\.7\.0 Relay cannot obtain an OAuth token for "
                        r"profile system \(see the relay's log\); try again later\n", res.stdout)
    assert [line.split(" [-] ", 1)[1] for line in res.stderr.splitlines()] == [
        f"no OAuth token for credential main (profile system): {why}"]


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
    port, and how to choose others; exit 71 (EX_OSERR), no traceback."""
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
        with sandbox_process(config, tmp_path / "sb", stderr=subprocess.PIPE) as proc:
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 71, stderr
    what = (f"cannot listen on 127.0.0.1:{port}: Address already in use (another program "
            f"has it, `ss -ltnp 'sport = :{port}'` shows which: stop it, or change "
            "server.listeners.0.port)" if which == "smtp" else
            f"cannot listen on 127.0.0.1:{port} for the HTTP endpoint (http.address, "
            "http.port; or http.enabled: false): Address already in use")
    [line] = [x for x in stderr.splitlines() if "cannot start" in x]
    assert line.endswith(
        f"cannot start: {what}; in sandbox mode choose free ports "
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


def test_the_event_loop_is_uvloop_where_installed_and_asyncio_when_asked() -> None:
    """server.event_loop: auto takes uvloop when it is there (it comes with the package on
    Linux), and asyncio's own loop when asked or when uvloop is missing."""
    import uvloop

    from relay.app import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_uvloop_asked_for_and_missing_is_a_config_error(
        sandbox_config: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from relay import cli
    from relay.app import loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)        # as if not installed
    assert loop_factory("auto") is None
    sandbox_config.write_text(sandbox_config.read_text().replace(
        "server:\n", "server:\n  event_loop: uvloop\n"))
    assert cli.main(["run", "--sandbox", "--config", str(sandbox_config)]) == 78
    assert ("cannot start: server.event_loop: uvloop is not installed (pip install uvloop, "
            "or event_loop: auto to use asyncio's own loop without it)") in capsys.readouterr().err


def test_what_start_up_made_is_frozen_out_of_the_collectors_sight_once_it_is_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` freezes the objects alive when the relay is ready (gc.freeze), so that full
    collections under load do not walk the config and the libraries again; not before
    it is ready, since start-up may still fail and tidy up."""
    import gc

    from relay.cli import run as run_command

    ready: list[object] = []

    async def serve(self: Relay, reload: object = None, on_ready: object = None) -> None:
        assert gc.get_freeze_count() == 0       # nothing frozen while starting
        assert callable(on_ready)
        on_ready()
        ready.append(gc.get_freeze_count())

    monkeypatch.setattr(Relay, "serve", serve)
    monkeypatch.setattr(Relay, "__init__", lambda self, config: None)
    args = argparse.Namespace(sandbox=False, config="unused.yaml")
    try:
        assert asyncio.run(run_command._run(args, object())) == 0  # type: ignore[arg-type]
    finally:
        gc.unfreeze()
    assert ready and ready[0] > 0
