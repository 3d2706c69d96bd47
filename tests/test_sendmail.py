"""``smtp-oauth-relay sendmail``: called the way PHP's mail(), cron and scripts call
/usr/sbin/sendmail, with the relay running (over SMTP to its listener) and stopped (into
its spool, delivered once it starts)."""

from __future__ import annotations

import asyncio
import copy
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli import sendmail
from relay.sandbox.service import Sandbox, spool_directory
from relay.spool.records import State
from relay.spool.store import Spool
from tests.conftest import BASE_CONFIG, RelayFactory, address, wait_until
from tests.relayproc import merge

ROOT = Path(__file__).resolve().parent.parent

PHP_MAIL = (b"To: customer@example.com\n"
            b"Subject: Your order\n"
            b"X-PHP-Originating-Script: 33:order.php\n"
            b"\n"
            b"Thank you for your order.\n"
            b".a line with a leading dot\n"
            b".\n"
            b"after a lone dot (-i: still the message)\n")


def config_file(tmp_path: Path, port: int, **overrides: Any) -> Path:
    data = copy.deepcopy(BASE_CONFIG)
    merge(data, {"server": {"listeners": [{"address": "127.0.0.1", "port": port}]},
                 "spool": {"directory": str(tmp_path / "spool"), "on_tmpfs": "warn"}})
    merge(data, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(argv: list[str], message: bytes,
              capsys: pytest.CaptureFixture[str] | None = None) -> int:
    return await asyncio.to_thread(sendmail.main, argv, io.BytesIO(message))


# --- the command line ------------------------------------------------------------------------

def test_sendmails_flags_as_programs_pass_them() -> None:
    o = sendmail.parse(["-t", "-i", "-fapp@contoso.com", "-F", "Cron Daemon", "-odi",
                        "-oem", "-v", "-N", "never", "-B8BITMIME", "-C", "/etc/r.yaml",
                        "a@example.com, b@example.com", "c@example.com"])
    assert o.from_headers and not o.dots_end
    assert (o.sender, o.full_name, str(o.config)) == ("app@contoso.com", "Cron Daemon",
                                                       "/etc/r.yaml")
    assert o.recipients == ["a@example.com", "b@example.com", "c@example.com"]
    assert not sendmail.parse(["-oi", "x@y"]).dots_end
    assert sendmail.parse(["-f", "s@x", "--", "-weird@x"]).recipients == ["-weird@x"]
    for bad, words in ((["-bs"], "-bs is not offered"), (["-q"], "-q is not offered"),
                       (["-Z"], "unknown option -Z"), (["-f"], "requires an argument")):
        with pytest.raises(sendmail.Usage, match=words):
            sendmail.parse(bad)


def test_the_message_gets_crlf_and_a_lone_dot_ends_it_without_i() -> None:
    data = b"Subject: x\n\nline\n.\nnot read\n"
    assert sendmail.read_message(io.BytesIO(data), True) == b"Subject: x\r\n\r\nline\r\n"
    assert sendmail.read_message(io.BytesIO(data), False).endswith(b".\r\nnot read\r\n")


def test_a_message_without_headers_gets_them_and_keeps_its_first_line_as_body() -> None:
    data = sendmail.read_message(io.BytesIO(b"hello: world is not a header here\n"), True)
    done, _ = sendmail.complete(b"backup done\r\n", "root@host", None)
    assert done.startswith(b"From: root@host\r\nDate: ")
    assert done.endswith(b"\r\n\r\nbackup done\r\n")
    done, _ = sendmail.complete(b"Subject: only headers\r\n", "root@host", "Root")
    assert done.startswith(b'From: Root <root@host>\r\n')
    assert done.endswith(b"Subject: only headers\r\n\r\n")
    assert data == b"hello: world is not a header here\r\n"
    # A field as the relay reads one (the obsolete space before the colon too) is a
    # header; a line that starts with a space is body, not a continuation of From.
    done, _ = sendmail.complete(b"Subject : old style\r\n\r\nx\r\n", "root@host", None)
    assert b"\r\nSubject : old style\r\n\r\nx\r\n" in done
    done, _ = sendmail.complete(b" indented\r\n", "root@host", None)
    assert done.endswith(b"\r\n\r\n indented\r\n")


# --- with the relay running ------------------------------------------------------------------

async def test_php_mail_through_the_running_relay(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    relay = await start_relay()
    _, port = address(relay)
    cfg = config_file(tmp_path, port)
    # PHP's mail(): sendmail_path = "sendmail -t -i", the message with LF line ends.
    code = await run(["-C", str(cfg), "-t", "-i", "-fwww-data@contoso.com"], PHP_MAIL)
    assert code == 0
    [got] = sandbox.exchange.messages
    assert got.rcpt_tos == ["customer@example.com"]
    assert b"Subject: Your order\r\n" in got.data
    assert b"\r\n.a line with a leading dot\r\n.\r\nafter a lone dot" in got.data
    # From and Date added where the message had none (the sender policy then applies).
    assert b"\r\nDate: " in got.data and b"From: relay@contoso.com" in got.data


async def test_cron_with_a_bcc_and_a_full_name(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    relay = await start_relay()
    cfg = config_file(tmp_path, address(relay)[1])
    report = (b"To: ops@contoso.com\nBcc: audit@contoso.com\n"
              b"Subject: Cron <root@host> backup\n\nbackup done\n")
    code = await run(["-C", str(cfg), "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-t",
                      "-froot@contoso.com"], report)
    assert code == 0
    [got] = sandbox.exchange.messages
    assert sorted(got.rcpt_tos) == ["audit@contoso.com", "ops@contoso.com"]
    assert b"Bcc" not in got.data and b"audit@contoso.com" not in got.data


async def test_refusals_become_sendmails_exit_codes(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    relay = await start_relay({"server": {"max_recipients": 1}})
    cfg = config_file(tmp_path, address(relay)[1])
    assert await run(["-C", str(cfg)], PHP_MAIL) == sendmail.EX_USAGE   # no recipient
    sandbox.exchange.fail_next("data", 550, "5.7.708 Access denied, traffic not accepted")
    assert await run(["-C", str(cfg), "a@example.com"], PHP_MAIL) == sendmail.EX_UNAVAILABLE
    sandbox.exchange.fail_next("data", 451, "4.3.2 Temporary server error")
    assert await run(["-C", str(cfg), "b@example.com"], PHP_MAIL) == 0    # queued: taken
    # One recipient over the limit: the other still gets it; the refused one is named.
    assert await run(["-C", str(cfg), "c@example.com", "d@example.com"], PHP_MAIL) == 0
    err = capsys.readouterr().err
    assert "<d@example.com>: 452" in err and "5.7.708" in err
    assert await run(["-C", str(tmp_path / "missing.yaml"), "x@y"], PHP_MAIL) == (
        sendmail.EX_CONFIG)


async def test_a_user_who_may_not_read_the_config_sends_to_the_default_listener(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """www-data and the config's 0640: the relay is looked for at 127.0.0.1:2525."""
    cfg = config_file(tmp_path, 1)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == cfg else real(p, m))
    relay = await start_relay()
    assert sendmail.DEFAULT_LISTENER == ("127.0.0.1", 2525)
    monkeypatch.setattr(sendmail, "DEFAULT_LISTENER", address(relay))
    assert await run(["-C", str(cfg), "-t", "-i"], PHP_MAIL) == 0
    [got] = sandbox.exchange.messages
    assert got.rcpt_tos == ["customer@example.com"]
    await relay.stop()
    assert await run(["-C", str(cfg), "-t", "-i"], PHP_MAIL) == sendmail.EX_TEMPFAIL
    assert "may not read its config" in capsys.readouterr().err


# --- with the relay stopped ------------------------------------------------------------------

async def test_with_the_relay_stopped_it_waits_in_the_spool_and_goes_out_at_start(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The spool of the relay that starts later (the sandbox puts it in its directory).
    spool_dir = spool_directory(sandbox.directory)
    cfg = config_file(tmp_path, closed_port(), spool={"directory": str(spool_dir)})
    code = await run(["-C", str(cfg), "-t", "-i"], PHP_MAIL)
    assert code == 0
    assert "is in its spool" in capsys.readouterr().err
    spool = Spool(spool_dir)
    [name] = list(spool.names(State.INCOMING))
    entry = spool.read(State.INCOMING, name)
    assert entry.rcpt_tos == ["customer@example.com"] and entry.profile == "system"
    assert sandbox.exchange.messages == []
    relay = await start_relay()
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    [got] = sandbox.exchange.messages
    assert got.data.startswith(b"Received: from localhost ([127.0.0.1])")
    assert b"Thank you for your order." in got.data
    assert relay.spool.count(State.INCOMING) == 0


async def test_with_the_relay_holding_its_spool_but_not_answering_it_is_a_try_again(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    await start_relay()
    cfg = config_file(tmp_path, closed_port(),
                      spool={"directory": str(spool_directory(sandbox.directory))})
    assert await run(["-C", str(cfg), "x@example.com"], PHP_MAIL) == sendmail.EX_TEMPFAIL
    assert "cannot take the message" in capsys.readouterr().err


# --- as an installed program -----------------------------------------------------------------

async def test_installed_under_the_name_sendmail(
        start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> None:
    """A link named sendmail to the command (as /usr/sbin/sendmail would be), run the way
    PHP runs it: a shell command line, the message on standard input."""
    relay = await start_relay()
    cfg = config_file(tmp_path, address(relay)[1])
    link = tmp_path / "sendmail"
    link.symlink_to(Path(sys.executable).parent / "smtp-oauth-relay")
    proc = await asyncio.create_subprocess_shell(
        f"{link} -t -i -C {cfg}", stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ})
    _, err = await asyncio.wait_for(proc.communicate(PHP_MAIL), 60)
    assert proc.returncode == 0, err.decode()
    await wait_until(lambda: len(sandbox.exchange.messages) == 1)
    usage = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relay",
                                                     "sendmail", "-bs"],
                                    capture_output=True, timeout=60)
    assert usage.returncode == sendmail.EX_USAGE
