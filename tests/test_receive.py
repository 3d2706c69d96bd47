"""The SMTP receiving side over real loopback sockets, with a recording ``submit``.

Most tests talk raw SMTP through asyncio streams so that every reply line can be checked;
smtplib (in a thread) covers STARTTLS, implicit TLS and its AUTH implementations.
A "remote" client is played by giving the receiver a loopback check that says no.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.accept.route import Router
from relay.config import Config, ConfigError, ServerTLS
from relay.core.log import message_id
from relay.core.message import Content, Outbound
from relay.core.reply import Reply
from relay.receive.addresses import address_problem
from relay.receive.passwords import PasswordVerifier
from relay.receive.server import Receiver
from relay.receive.tls import server_context
from relay.sandbox.pki import LocalPKI, create_pki
from relay.spool.store import Spool
from tests.conftest import PASSWORDS, build_config

MESSAGE = (b"From: Relay <relay@contoso.com>\r\n"
           b"To: customer@example.com\r\n"
           b"Subject: Invoice\r\n"
           b"\r\n"
           b"Please find the invoice.\r\n")
SYSTEM = "relay@contoso.com"
REFUSED_NETWORK = {"server": {"relay_networks": ["192.0.2.0/24"]}}


def never_loopback(_ip: str) -> bool:
    return False


# --- test doubles and helpers ---------------------------------------------------------------

class FakeSubmit:
    """Records each Outbound, checks what the receiver promises, answers ``reply``."""

    def __init__(self) -> None:
        self.messages: list[Outbound] = []
        self.finished: list[Outbound] = []
        self.reply: Reply | Callable[[Outbound], Reply] = Reply(250, "2.0.0 Ok")
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.delay = 0.0

    async def __call__(self, msg: Outbound) -> Reply:
        assert msg.id and msg.profile and msg.mail_from and msg.rcpt_tos
        assert msg.mail_from != "<>"
        # What the receiver streamed to the spool: kept in memory here, the file removed.
        assert msg.content.path is not None and msg.content.path.parent.name == "tmp"
        data = await msg.content.read_all()
        assert len(data) == msg.content.size
        msg.content.unlink()
        msg.content = Content(data=data)
        assert data.startswith(b"Received: ") and f"id {msg.id}".encode() in data
        self.messages.append(msg)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        self.finished.append(msg)
        return self.reply(msg) if callable(self.reply) else self.reply


@dataclass
class Harness:
    receiver: Receiver
    submit: FakeSubmit
    config: Config

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.receiver.bound[0]
        return host, port


Start = Callable[..., Awaitable[Harness]]


def data_of(msg: Outbound) -> bytes:
    """The bytes a FakeSubmit received for ``msg``."""
    data = msg.content.in_memory
    assert data is not None
    return data


def make_receiver(config: Config, submit: FakeSubmit, spool_dir: Path, *,
                  verifier: PasswordVerifier | None = None, **kwargs: Any) -> Receiver:
    """A receiver with ``config``'s users, writing messages to a spool in ``spool_dir``."""
    if verifier is None:
        verifier = PasswordVerifier({n: u.password_hash for n, u in config.users.items()})
    spool = Spool(spool_dir)
    spool.open(on_tmpfs="warn")
    kwargs.setdefault("writer", spool.writer)
    return Receiver(config, router=Router(config), verifier=verifier, submit=submit, **kwargs)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    receivers: list[Receiver] = []

    async def start(overrides: dict[str, Any] | None = None, **kwargs: Any) -> Harness:
        config = build_config(overrides)
        submit = FakeSubmit()
        receiver = make_receiver(config, submit, tmp_path / f"spool{len(receivers)}",
                                 **kwargs)
        await receiver.start()
        receivers.append(receiver)
        return Harness(receiver, submit, config)

    yield start
    for receiver in receivers:
        await receiver.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return create_pki(tmp_path_factory.mktemp("pki"))


def tls_section(pki: LocalPKI) -> dict[str, str]:
    return {"certificate_file": str(pki.cert_file), "key_file": str(pki.key_file)}


class Client:
    """A raw SMTP client: one command, one (possibly multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.banner: tuple[int, str] = (0, "")

    @classmethod
    async def connect(cls, address: tuple[str, int], **kwargs: Any) -> Client:
        reader, writer = await asyncio.open_connection(*address, **kwargs)
        client = cls(reader, writer)
        _open_clients.append(client)
        client.banner = await client.reply()
        return client

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            text = line.decode("utf-8").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def ehlo(self) -> list[str]:
        code, text = await self.cmd("EHLO app.test")
        assert code == 250
        return text.split("\n")[1:]

    async def data(self, data: bytes) -> tuple[int, str]:
        code, text = await self.cmd("DATA")
        assert code == 354, text
        stuffed = b"".join(b"." + ln if ln.startswith(b".") else ln
                           for ln in data.splitlines(keepends=True))
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, sender: str, rcpts: list[str], data: bytes = MESSAGE,
                   mail_options: str = "") -> tuple[int, str]:
        code, text = await self.cmd(f"MAIL FROM:<{sender}>{mail_options}")
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, text
        return await self.data(data)

    async def closed(self) -> bool:
        """True once the server has closed the connection (after any pending lines)."""
        try:
            while await asyncio.wait_for(self.reader.readline(), 2):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


_open_clients: list[Client] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open_clients:
        await _open_clients.pop().close()


async def connect(h: Harness, **kwargs: Any) -> Client:
    client = await Client.connect(h.address, **kwargs)
    assert client.banner[0] == 220
    return client


async def until(condition: Callable[[], bool]) -> None:
    """Poll briefly for something another task does; fail after 2 s."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def queued_id(text: str) -> str:
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


def body_after_received(data: bytes) -> bytes:
    """The message without the prepended (possibly folded) Received field."""
    assert data.startswith(b"Received: ")
    _, rest = data.split(b"\r\n", 1)
    while rest.startswith((b" ", b"\t")):
        rest = rest.split(b"\r\n", 1)[1]
    return rest


# --- authorization ------------------------------------------------------------------------

async def test_relay_network_client_is_accepted_without_auth(start: Start) -> None:
    h = await start()
    c = await connect(h)
    assert c.banner[1].startswith("relay.test ")
    await c.ehlo()
    code, text = await c.send(SYSTEM, ["customer@example.com"])
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    [msg] = h.submit.messages
    assert queued_id(text) == msg.id
    assert (msg.profile, msg.mail_from, msg.rcpt_tos) == ("system", SYSTEM,
                                                          ["customer@example.com"])
    assert (msg.client, msg.user) == ("127.0.0.1", None)
    received = data_of(msg).split(b"\r\n\r\n")[0]
    assert b"from app.test (" in received and b"with ESMTP id " + msg.id.encode() in received
    assert body_after_received(data_of(msg)) == MESSAGE
    await c.close()


async def test_help_and_unknown_commands_find_the_commands_bound_on_lookup(
        start: Start) -> None:
    """The commands are bound when aiosmtpd looks one up (setuponce.CommandTable): HELP
    lists them and gives a command's syntax, an unknown one is still unknown."""
    h = await start()
    c = await connect(h)
    await c.ehlo()
    code, text = await c.cmd("HELP")
    assert code == 250 and {"DATA", "EHLO", "MAIL", "QUIT", "RCPT"} <= set(text.split())
    assert await c.cmd("HELP DATA") == (250, "Syntax: DATA")
    assert (await c.cmd("FROBNICATE"))[0] == 500
    await c.close()


async def test_refused_network_loopback_client_is_asked_to_authenticate(start: Start) -> None:
    h = await start(REFUSED_NETWORK)
    c = await connect(h)
    assert any(ext.startswith("AUTH ") for ext in await c.ehlo())
    assert await c.cmd("MAIL FROM:<relay@contoso.com>") == (
        530, "5.7.0 Authentication required")
    assert h.submit.messages == []


async def test_refused_network_remote_plaintext_client_gets_no_auth(start: Start) -> None:
    h = await start(REFUSED_NETWORK, loopback_check=never_loopback)
    c = await connect(h)
    assert not any(ext.startswith("AUTH") for ext in await c.ehlo())
    code, text = await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}")
    assert code == 538 and text.startswith("5.7.11 Encryption required")
    assert await c.cmd("MAIL FROM:<relay@contoso.com>") == (
        554, "5.7.1 Relay access denied for 127.0.0.1")


async def test_remote_client_in_relay_networks_needs_no_auth(start: Start) -> None:
    h = await start(loopback_check=never_loopback)
    c = await connect(h)
    await c.ehlo()
    assert (await c.send(SYSTEM, ["a@example.com"]))[0] == 250


# --- AUTH ---------------------------------------------------------------------------------

def smtplib_login_send(address: tuple[str, int], user: str, password: str,
                       mechanism: str) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("app.test")
        client.user, client.password = user, password
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert code == 235, text
        return client.sendmail("alice@contoso.com", ["x@example.com"], MESSAGE)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_success_with_smtplib(start: Start, mechanism: str) -> None:
    h = await start(REFUSED_NETWORK)
    refused = await asyncio.to_thread(smtplib_login_send, h.address, "alice",
                                      PASSWORDS["alice"], mechanism)
    assert refused == {}
    [msg] = h.submit.messages
    assert (msg.user, msg.profile) == ("alice", "alice")
    assert b"with ESMTPA id" in data_of(msg).split(b"\r\n\r\n")[0]


async def test_auth_plain_without_initial_response_and_login_with_initial(
        start: Start) -> None:
    h = await start(REFUSED_NETWORK)
    c = await connect(h)
    await c.ehlo()
    assert await c.cmd("AUTH PLAIN") == (334, "")
    assert (await c.cmd(plain("bob", PASSWORDS["bob"])))[0] == 235
    assert await c.cmd("AUTH PLAIN x") == (503, "5.5.1 Already authenticated")
    c2 = await connect(h)
    await c2.ehlo()
    assert await c2.cmd(f"AUTH LOGIN {b64('alice')}") == (334, b64("Password:"))
    assert (await c2.cmd(b64(PASSWORDS["alice"])))[0] == 235
    assert (await c2.send("alice@contoso.com", ["x@example.com"]))[0] == 250
    assert h.submit.messages[0].user == "alice"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_failure_is_535_and_logged_for_fail2ban(
        start: Start, mechanism: str, caplog: pytest.LogCaptureFixture) -> None:
    h = await start(REFUSED_NETWORK)
    c = await connect(h)
    await c.ehlo()
    if mechanism == "PLAIN":
        code, text = await c.cmd(f"AUTH PLAIN {plain('alice', 'wrong-password')}")
    else:
        assert await c.cmd("AUTH LOGIN") == (334, b64("Username:"))
        assert (await c.cmd(b64("alice")))[0] == 334
        code, text = await c.cmd(b64("wrong-password"))
    assert code == 535 and text.startswith("5.7.8")
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == [f"AUTH {mechanism} failed: client=127.0.0.1 user='alice'"]
    assert (await c.cmd("MAIL FROM:<alice@contoso.com>"))[0] == 530


async def test_unknown_user_and_authzid_mismatch_fail(start: Start) -> None:
    h = await start(REFUSED_NETWORK)
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"AUTH PLAIN {plain('mallory', 'x')}"))[0] == 535
    acting = b64(f"bob\0alice\0{PASSWORDS['alice']}")
    assert (await c.cmd(f"AUTH PLAIN {acting}"))[0] == 535
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', '')}"))[0] == 421   # 3rd: the default


async def test_too_many_auth_failures_close_the_session(start: Start) -> None:
    h = await start({"server": {"max_auth_failures": 2}})
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'bad1')}"))[0] == 535
    assert await c.cmd(f"AUTH PLAIN {plain('alice', 'bad2')}") == (
        421, "4.7.0 Too many authentication failures")
    assert await c.closed()


async def test_auth_syntax_errors_are_answered(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd("AUTH PLAIN !!!notbase64"))[0] == 501
    assert (await c.cmd(f"AUTH PLAIN {b64('no-nul-bytes')}"))[0] == 501
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert (await c.cmd("*"))[0] == 501
    assert (await c.cmd("AUTH CRAM-MD5"))[0] == 504
    assert "AUTH LOGIN PLAIN" in await c.ehlo()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records at ERROR or with a traceback: a client must never cause one."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info is not None]


TOO_LONG_AUTH = (500, "5.5.6 Authentication exchange line is too long")


@pytest.mark.parametrize(("mechanism", "answer"), [
    ("LOGIN", "A" * 5000),                   # a 5000-byte user name
    ("PLAIN", b64(b"x" * 3000)),             # a 4 kB base64 continuation response
])
async def test_overlong_auth_answer_is_refused_and_counted(
        start: Start, mechanism: str, answer: str,
        caplog: pytest.LogCaptureFixture) -> None:
    h = await start(REFUSED_NETWORK)
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"AUTH {mechanism}"))[0] == 334
    assert await c.cmd(answer) == TOO_LONG_AUTH
    assert await c.cmd("NOOP") == (250, "2.0.0 OK")           # still in step
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == [f"AUTH {mechanism} failed: client=127.0.0.1 user=- "
                        "reason=answer line too long"]
    assert errors_logged(caplog) == []
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}"))[0] == 235
    assert (await c.send("alice@contoso.com", ["x@example.com"]))[0] == 250


async def test_auth_answer_beyond_the_stream_limit_is_dropped_whole(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    # Longer than the reader's buffer (max_line_length + 1) several times over, and sent
    # in pieces: all of it must be dropped, none taken as the next command.
    h = await start({"server": {"max_line_length": 1000, "max_auth_failures": 3,
                                **REFUSED_NETWORK["server"]}})
    c = await connect(h)
    await c.ehlo()
    assert await c.cmd(f"AUTH LOGIN {b64('alice')}") == (334, b64("Password:"))
    for _ in range(10):
        c.writer.write(b"QUIT " * 2000)
        await c.writer.drain()
    assert await c.cmd(b"RSET") == TOO_LONG_AUTH
    assert await c.cmd("NOOP") == (250, "2.0.0 OK")
    assert "user='alice' reason=answer line too long" in caplog.text
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    assert await c.cmd(b"=" * 1500) == TOO_LONG_AUTH
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert await c.cmd(b"=" * 3000) == (421, "4.7.0 Too many authentication failures")
    assert await c.closed()
    assert errors_logged(caplog) == []


async def test_password_never_logged(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")
    h = await start(REFUSED_NETWORK)
    secret, wrong = PASSWORDS["alice"], "Wr0ng-but-secret-too"
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', wrong)}"))[0] == 535
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert (await c.cmd(b64("alice")))[0] == 334
    assert (await c.cmd(wrong))[0] == 501                  # typed in clear: not base64
    assert (await c.cmd(f"AUTH LOGIN {b64('alice')}"))[0] == 334
    assert (await c.cmd(b64(secret)))[0] == 235
    await asyncio.to_thread(smtplib_login_send, h.address, "alice", secret, "PLAIN")
    text = caplog.text
    assert "AUTH LOGIN ok: client=127.0.0.1 user='alice'" in text
    assert "deprecated" not in text             # aiosmtpd's login_data warning is avoided
    for value in (secret, wrong, b64(secret), b64(wrong), plain("alice", secret),
                  plain("alice", wrong)):
        assert value not in text


# --- limits -------------------------------------------------------------------------------

async def test_size_is_advertised_and_enforced(start: Start) -> None:
    h = await start({"server": {"max_message_size": 10_000}})
    c = await connect(h)
    assert "SIZE 10000" in await c.ehlo()
    code, text = await c.cmd(f"MAIL FROM:<{SYSTEM}> SIZE=20000")
    assert code == 552 and text.startswith("5.3.4")
    code, text = await c.send(SYSTEM, ["a@example.com"], MESSAGE + b"x" * 20_000 + b"\r\n")
    assert code == 552 and text.startswith("5.3.4")
    assert (await c.send(SYSTEM, ["a@example.com"], mail_options=" SIZE=500"))[0] == 250
    [msg] = h.submit.messages
    assert f"SIZE={len(data_of(msg))}" in msg.mail_options      # corrected for the header


async def test_too_many_recipients(start: Start) -> None:
    h = await start({"server": {"max_recipients": 2}})
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"MAIL FROM:<{SYSTEM}>"))[0] == 250
    assert (await c.cmd("RCPT TO:<a@example.com>"))[0] == 250
    assert (await c.cmd("RCPT TO:<A@Example.com>"))[0] == 250       # duplicate: counted once
    assert (await c.cmd("RCPT TO:<b@example.com>"))[0] == 250
    assert await c.cmd("RCPT TO:<c@example.com>") == (452, "4.5.3 Too many recipients")
    assert (await c.data(MESSAGE))[0] == 250
    assert h.submit.messages[0].rcpt_tos == ["a@example.com", "b@example.com"]


async def test_long_lines_get_an_error_and_the_session_goes_on(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    # 1000 makes the reader's buffer 1001 bytes: these lines overrun it (aiosmtpd drops
    # the rest of the line), not only the command and line length checks.
    h = await start({"server": {"max_line_length": 1000}})
    c = await connect(h)
    await c.ehlo()
    assert await c.cmd("NOOP " + "x" * 5000) == (500, "5.5.2 Command line too long")
    assert await c.cmd("NOOP " + "x" * 200_000) == (500, "5.5.2 Command line too long")
    assert await c.cmd("NOOP " + "x" * 600) == (500, "5.5.2 Command line too long")
    long_body = MESSAGE + b"y" * 3000 + b"\r\nend\r\n"
    code, text = await c.send(SYSTEM, ["a@example.com"], long_body)
    assert (code, text) == (500, "5.5.2 Line too long (limit 1000 octets)")
    huge_body = MESSAGE + b"y" * 200_000 + b"\r\nend\r\n"
    code, text = await c.send(SYSTEM, ["a@example.com"], huge_body)
    assert (code, text) == (500, "5.5.2 Line too long (limit 1000 octets)")
    assert h.submit.messages == []
    assert await c.cmd("NOOP") == (250, "2.0.0 OK")
    ok_body = MESSAGE + b"z" * 990 + b"\r\n"
    assert (await c.send(SYSTEM, ["a@example.com"], ok_body))[0] == 250
    assert body_after_received(data_of(h.submit.messages[0])) == ok_body
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("length", [1001, 1300, 5000, 200_000])
async def test_an_overlong_last_line_is_answered_at_once(start: Start, length: int) -> None:
    # The data's end follows the over-long line straight away: its CR and LF may come in
    # different pieces of the drop, and the end must still be seen (else the client
    # waits for its reply until a timeout).
    h = await start({"server": {"max_line_length": 1000}})
    c = await connect(h)
    await c.ehlo()
    code, text = await c.send(SYSTEM, ["a@example.com"], MESSAGE + b"y" * length + b"\r\n")
    assert (code, text) == (500, "5.5.2 Line too long (limit 1000 octets)")
    assert await c.cmd("NOOP") == (250, "2.0.0 OK")
    assert h.submit.messages == []


async def test_idle_timeout_closes_with_421(start: Start) -> None:
    h = await start({"server": {"idle_timeout": "0.3s"}})
    c = await connect(h)
    await c.ehlo()
    code, text = await c.reply()          # unsolicited, after 0.3 s of silence
    assert code == 421 and text.startswith("4.4.2")
    assert await c.closed()
    assert h.receiver.sessions == 0


async def test_activity_moves_the_idle_timeout_and_silence_still_ends_it(
        start: Start) -> None:
    """The idle timer is moved forward lazily (relay.receive.idletimer): commands every
    0.1 s for three idle periods keep the session, the silence after them ends it."""
    h = await start({"server": {"idle_timeout": "0.3s"}})
    c = await connect(h)
    await c.ehlo()
    for _ in range(9):
        await asyncio.sleep(0.1)
        assert (await c.cmd("NOOP"))[0] == 250
    silent = time.monotonic()
    code, text = await c.reply()
    assert code == 421 and text.startswith("4.4.2")
    assert 0.25 <= time.monotonic() - silent < 2
    assert await c.closed()


async def test_slow_submission_does_not_count_as_idle(start: Start) -> None:
    h = await start({"server": {"idle_timeout": "0.3s"}})
    h.submit.delay = 0.6
    c = await connect(h)
    await c.ehlo()
    assert (await c.send(SYSTEM, ["a@example.com"]))[0] == 250


TIMEOUT_421 = (421, "4.4.2 relay.test Error: timeout exceeded")


async def trickle(c: Client, data: bytes, interval: float) -> None:
    """Send ``data`` one byte every ``interval`` s: never idle, never a complete line."""
    for i in range(len(data)):
        c.writer.write(data[i:i + 1])
        await c.writer.drain()
        await asyncio.sleep(interval)


@pytest.mark.parametrize("phase", ["command", "auth", "data"])
async def test_trickled_line_is_cut_at_line_timeout(
        start: Start, phase: str, caplog: pytest.LogCaptureFixture) -> None:
    # A byte every 0.05 s keeps a 0.25 s idle timer from ever firing; the line deadline
    # ends it 0.5 s after the line's first byte.
    h = await start({"server": {"idle_timeout": "0.25s", "line_timeout": "0.5s"}})
    c = await connect(h)
    if phase != "command":
        await c.ehlo()
    if phase == "auth":
        assert (await c.cmd("AUTH LOGIN"))[0] == 334
    if phase == "data":
        for line in (f"MAIL FROM:<{SYSTEM}>", "RCPT TO:<a@example.com>", "DATA"):
            assert (await c.cmd(line))[0] in (250, 354)
    loop = asyncio.get_running_loop()
    began = loop.time()
    sender = asyncio.create_task(trickle(c, b"NOOP " + b"x" * 200, 0.05))
    try:
        assert await c.reply() == TIMEOUT_421
    finally:
        sender.cancel()
    assert 0.5 <= loop.time() - began < 1.5
    assert await c.closed()
    await until(lambda: h.receiver.sessions == 0)
    assert h.submit.messages == []
    assert "line timeout: client=127.0.0.1" in caplog.text


async def test_slow_message_of_quick_lines_is_not_cut(start: Start) -> None:
    # The line deadline is per line: a message that takes several line_timeouts in all
    # (a large message on a slow link) goes through.
    h = await start({"server": {"idle_timeout": "0.25s", "line_timeout": "0.15s"}})
    c = await connect(h)
    await c.ehlo()
    for line in (f"MAIL FROM:<{SYSTEM}>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await c.cmd(line))[0] in (250, 354)
    lines = MESSAGE.splitlines(keepends=True) + [b"line %d\r\n" % i for i in range(8)]
    for line in lines:
        c.writer.write(line[:3])                # lines in two pieces, as TCP may split them
        await asyncio.sleep(0.02)
        c.writer.write(line[3:])
        await asyncio.sleep(0.03)
    c.writer.write(b".\r\n")
    assert (await c.reply())[0] == 250
    assert body_after_received(data_of(h.submit.messages[0])) == b"".join(lines)


async def test_session_timeout_ends_a_session_of_complete_lines(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    # Each NOOP is quick, so neither idle_timeout nor line_timeout ever fires.
    h = await start({"server": {"idle_timeout": "0.2s", "line_timeout": "0.2s",
                                "session_timeout": "0.6s"}})
    loop = asyncio.get_running_loop()
    began = loop.time()
    c = await connect(h)
    answers = []
    for _ in range(30):                         # 1.5 s at most, even if nothing cuts it
        answers.append(await c.cmd("NOOP"))
        if answers[-1] == TIMEOUT_421:
            break
        await asyncio.sleep(0.05)
    assert answers.pop() == TIMEOUT_421
    assert 0.6 <= loop.time() - began < 1.5
    assert len(answers) >= 5 and set(answers) == {(250, "2.0.0 OK")}
    assert await c.closed()
    assert "session timeout: client=127.0.0.1" in caplog.text


async def test_session_timeout_does_not_count_the_relays_own_work(start: Start) -> None:
    # The hand-over takes longer than the whole session budget: the client still gets
    # its reply, and the 421 only once its own time is used up.
    h = await start({"server": {"session_timeout": "0.3s"}})
    h.submit.delay = 0.45
    c = await connect(h)
    await c.ehlo()
    assert (await c.send(SYSTEM, ["a@example.com"]))[0] == 250
    assert await c.reply() == TIMEOUT_421
    assert await c.closed()
    assert len(h.submit.finished) == 1


async def test_session_deadline_during_hand_over_is_answered_first(
        start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deadline falls due while the received message is being prepared (the event
    # loop is held, as by a slow policy check), so it is noticed only once the hand-over
    # has begun: the message's reply must still come before the 421, or the client
    # would send it again.
    import relay.receive.incoming as handler_module
    original = handler_module.received_header

    def slow_received_header(**kwargs: Any) -> bytes:
        time.sleep(0.4)                                # blocks the loop past the deadline
        return original(**kwargs)

    monkeypatch.setattr(handler_module, "received_header", slow_received_header)
    h = await start({"server": {"session_timeout": "0.3s"}})
    c = await connect(h)
    await c.ehlo()
    code, text = await c.send(SYSTEM, ["a@example.com"])
    assert code == 250 and queued_id(text) == h.submit.messages[0].id
    assert await c.reply() == TIMEOUT_421
    assert await c.closed()


def test_timeout_defaults_and_validation() -> None:
    server = build_config().server
    assert (server.idle_timeout, server.line_timeout, server.session_timeout) == (
        300, 300, 3600)
    assert build_config({"server": {"line_timeout": "2m",
                                    "session_timeout": "2h"}}).server.session_timeout == 7200
    for key, value, problem in [
            ("line_timeout", 0, "must be greater than zero"),
            ("session_timeout", "0s", "must be greater than zero"),
            ("session_timeout", "-5m", "expected a duration such as 30s, 5m, 1h or 5d"),
            ("line_timeout", "soon", "expected a duration such as 30s, 5m, 1h or 5d")]:
        with pytest.raises(ConfigError) as err:
            build_config({"server": {key: value}})
        assert f"server.{key}: {problem}" in str(err.value)


async def test_max_connections(start: Start) -> None:
    # All from 127.0.0.1: the per-address limit (half by default) is lifted to the total.
    h = await start({"server": {"max_connections": 2, "max_connections_per_client": 2}})
    first, second = await connect(h), await connect(h)
    third = await Client.connect(h.address)
    assert third.banner == (421, "4.7.0 Too many connections, try again later")
    assert await third.closed()
    assert (await first.cmd("QUIT"))[0] == 221
    await until(lambda: h.receiver.sessions < 2)
    fourth = await connect(h)
    await fourth.ehlo()
    assert (await second.cmd("NOOP"))[0] == 250


# --- TLS ----------------------------------------------------------------------------------

def client_context(pki: LocalPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def starttls_send(address: tuple[str, int], ctx: ssl.SSLContext
                  ) -> tuple[list[str], dict[str, tuple[int, bytes]]]:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("app.test")
        client.starttls(context=ctx)
        client.ehlo("app.test")
        extensions = sorted(client.esmtp_features)
        client.login("alice", PASSWORDS["alice"])
        return extensions, client.sendmail("alice@contoso.com", ["x@example.com"], MESSAGE)


async def test_starttls_required(start: Start, pki: LocalPKI) -> None:
    h = await start({"server": {
        "tls": tls_section(pki), **REFUSED_NETWORK["server"],
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "starttls",
                       "require_tls": True}]}})
    c = await connect(h)
    ehlo = await c.ehlo()
    assert "STARTTLS" in ehlo and not any(e.startswith("AUTH") for e in ehlo)
    must = (530, "5.7.0 Must issue a STARTTLS command first")
    assert await c.cmd(f"MAIL FROM:<{SYSTEM}>") == must
    assert await c.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}") == must
    extensions, refused = await asyncio.to_thread(starttls_send, h.address,
                                                  client_context(pki))
    assert refused == {} and "auth" in extensions and "starttls" not in extensions
    [msg] = h.submit.messages
    assert msg.user == "alice"
    assert b"with ESMTPSA id" in data_of(msg).split(b"\r\n\r\n")[0]


def implicit_send(address: tuple[str, int], ctx: ssl.SSLContext, login: bool) -> None:
    with smtplib.SMTP_SSL(*address, timeout=10, context=ctx) as client:
        client.ehlo("app.test")
        assert client.has_extn("auth")
        if login:
            client.login("alice", PASSWORDS["alice"])
        client.sendmail("alice@contoso.com", ["x@example.com"], MESSAGE)


async def test_implicit_tls_offers_auth_to_remote_clients(start: Start, pki: LocalPKI) -> None:
    h = await start({"server": {
        "tls": tls_section(pki), **REFUSED_NETWORK["server"],
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "implicit"}]}},
        loopback_check=never_loopback)
    await asyncio.to_thread(implicit_send, h.address, client_context(pki), True)
    [msg] = h.submit.messages
    assert b"with ESMTPSA id" in data_of(msg).split(b"\r\n\r\n")[0]
    reader, writer = await asyncio.open_connection(*h.address)    # plaintext: no session
    writer.write(b"EHLO app.test\r\n")
    assert b"220" not in await asyncio.wait_for(reader.read(), 5)
    writer.close()


def starttls_untrusted(address: tuple[str, int], ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("app.test")
        client.starttls(context=ctx)


async def test_failed_starttls_handshake_leaves_the_server_working(
        start: Start, pki: LocalPKI, tmp_path: Path) -> None:
    h = await start({"server": {
        "tls": tls_section(pki),
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "starttls"}]}})
    stranger = client_context(create_pki(tmp_path / "stranger"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(starttls_untrusted, h.address, stranger)
    await until(lambda: h.receiver.sessions == 0)
    _, refused = await asyncio.to_thread(starttls_send, h.address,
                                       client_context(pki))
    assert refused == {} and len(h.submit.messages) == 1


async def test_reload_switches_certificate_of_bound_implicit_listener(
        start: Start, pki: LocalPKI, tmp_path: Path) -> None:
    h = await start({"server": {
        "tls": tls_section(pki),
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "implicit"}]}})
    bound = list(h.receiver.bound)
    renewed = create_pki(tmp_path / "renewed")
    config = build_config({"server": {
        "tls": tls_section(renewed),
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "implicit"}]}})
    h.receiver.update(config, Router(config), PasswordVerifier({}))
    assert h.receiver.bound == bound
    await asyncio.to_thread(implicit_send, h.address, client_context(renewed), False)
    assert len(h.submit.messages) == 1


def test_server_context_errors_name_the_file(tmp_path: Path, pki: LocalPKI) -> None:
    other = create_pki(tmp_path / "other")
    assert server_context(ServerTLS(certificate_file=pki.cert_file,
                                    key_file=pki.key_file)).minimum_version \
        == ssl.TLSVersion.TLSv1_2
    cases = {
        "does not match": ServerTLS(certificate_file=pki.cert_file, key_file=other.key_file),
        "cannot read": ServerTLS(certificate_file=tmp_path / "missing.pem",
                                 key_file=pki.key_file),
        "holds no PEM certificate": ServerTLS(certificate_file=pki.key_file,
                                              key_file=pki.key_file),
        "holds no usable PEM private key": ServerTLS(certificate_file=pki.cert_file,
                                                     key_file=pki.cert_file),
    }
    for expected, tls in cases.items():
        with pytest.raises(ConfigError) as err:
            server_context(tls)
        assert expected in str(err.value)
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(pki.key_file.read_bytes(), None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass")))
    with pytest.raises(ConfigError, match="is encrypted"):
        server_context(ServerTLS(certificate_file=pki.cert_file, key_file=encrypted))


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_available(), reason="IPv6 loopback (::1) is not available")
async def test_ipv6_listener(start: Start) -> None:
    h = await start({"server": {"listeners": [{"address": "::1", "port": 0},
                                              {"address": "127.0.0.1", "port": 0}]}})
    assert [host for host, _ in h.receiver.bound] == ["::1", "127.0.0.1"]
    c = await connect(h)
    await c.ehlo()
    assert (await c.send(SYSTEM, ["a@example.com"]))[0] == 250
    [msg] = h.submit.messages
    assert msg.client == "::1"
    assert data_of(msg).startswith(b"Received: from app.test ([IPv6:::1])")


# --- the message --------------------------------------------------------------------------

async def test_bcc_only_recipients_all_reach_submit(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    rcpts = ["customer@example.com", "hidden1@example.org", "hidden2@example.net"]
    assert (await c.send(SYSTEM, rcpts))[0] == 250
    [msg] = h.submit.messages
    assert msg.rcpt_tos == rcpts
    assert b"hidden" not in data_of(msg)                       # no "for <...>" with several


async def test_utf8_8bit_message_is_byte_identical(start: Start) -> None:
    h = await start({"profiles": {"system": {"sender_policy": "keep"}}})
    data = ("From: Zoë Ångström <zoe@contoso.com>\r\n"
            "To: Jürgen <jürgen@example.com>\r\n"
            "Subject: Grüße \u2013 €100 \u2014 日本語\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            "Größe: 5 \u00d7 3 ≠ 15 ✓\r\n"
            ".leading dot line\r\n"
            "..two dots\r\n"
            "line with trailing spaces   \r\n"
            "\x01\x7f control bytes\r\n"
            + "x" * 5000 + "\r\n").encode("utf-8")
    c = await connect(h)
    assert "SMTPUTF8" in await c.ehlo()
    code, _ = await c.send("zoë@contoso.com", ["jürgen@example.com"], data,
                           mail_options=" SMTPUTF8")
    assert code == 250
    [msg] = h.submit.messages
    assert msg.mail_from == "zoë@contoso.com" and msg.rcpt_tos == ["jürgen@example.com"]
    assert body_after_received(data_of(msg)) == data
    assert "SMTPUTF8" in msg.mail_options and "BODY=8BITMIME" in msg.mail_options


async def test_non_ascii_addresses_need_smtputf8(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    code, text = await c.cmd("MAIL FROM:<zoë@contoso.com>")
    assert code == 553 and text.startswith("5.6.7")
    assert (await c.cmd(f"MAIL FROM:<{SYSTEM}>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<jürgen@example.com>")
    assert code == 553 and text.startswith("5.6.7")


@pytest.mark.parametrize(("address", "ok"), [
    ("a@example.com", True), ("first.last+tag@sub.example.co.uk", True),
    ('"quoted name"@example.com', True), ("a@[192.0.2.1]", True),
    ("a@[IPv6:2001:db8::1]", True), ("nodomain", False), ("@example.com", False),
    ("a@", False), ("a@exa mple.com", False), ("a@-bad.com", False),
    ("a@exa_mple.com", False), ("a@[300.1.1.1]", False), ("x" * 65 + "@example.com", False),
    ("<>", False),
])
def test_address_syntax(address: str, ok: bool) -> None:
    assert (address_problem(address, smtputf8=False) is None) == ok


async def test_bad_recipient_syntax_is_refused(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd(f"MAIL FROM:<{SYSTEM}>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<nodomain>")
    assert code == 553 and text.startswith("5.1.3")
    assert (await c.cmd("RCPT TO:<>"))[0] == 553


async def test_null_sender_is_accepted_and_sent_as_the_mailbox(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    assert (await c.cmd("MAIL FROM:<>"))[0] == 250
    assert (await c.cmd("RCPT TO:<a@example.com>"))[0] == 250
    assert (await c.data(MESSAGE))[0] == 250
    assert h.submit.messages[0].mail_from == SYSTEM


async def test_helo_session_and_undeclared_8bit(start: Start) -> None:
    h = await start()
    c = await connect(h)
    assert (await c.cmd("HELO old-app"))[0] == 250
    body = MESSAGE + "Grüße\r\n".encode()
    assert (await c.send(SYSTEM, ["a@example.com"], body))[0] == 250
    [msg] = h.submit.messages
    assert b"from old-app (" in data_of(msg) and b"with SMTP id" in data_of(msg)
    assert msg.mail_options == ["BODY=8BITMIME"]


# --- routing and policy -------------------------------------------------------------------

async def test_unroutable_sender_gets_550(start: Start) -> None:
    h = await start({"routing": {"system_profile": None}})
    c = await connect(h)
    await c.ehlo()
    code, text = await c.cmd(f"MAIL FROM:<{SYSTEM}>")
    assert code == 550 and "No mailbox profile" in text


async def test_policy_rejections_at_mail_and_data(start: Start) -> None:
    h = await start({"profiles": {"system": {"sender_policy": "reject"}}})
    c = await connect(h)
    await c.ehlo()
    code, text = await c.cmd("MAIL FROM:<billing@contoso.com>")
    assert code == 550 and "not permitted" in text
    forged = MESSAGE.replace(b"relay@contoso.com", b"ceo@contoso.com")
    code, text = await c.send(SYSTEM, ["a@example.com"], forged)
    assert code == 550 and "ceo@contoso.com" in text
    assert h.submit.messages == []


async def test_rewritten_sender_reaches_submit(start: Start) -> None:
    h = await start()
    c = await connect(h)
    await c.ehlo()
    body = MESSAGE.replace(b"relay@contoso.com", b"billing@contoso.com")
    assert (await c.send("billing@contoso.com", ["a@example.com"], body))[0] == 250
    [msg] = h.submit.messages
    assert msg.mail_from == SYSTEM and b"Reply-To: billing@contoso.com" in data_of(msg)


# --- replies from submit and errors -------------------------------------------------------

@pytest.mark.parametrize("reply", [
    Reply(451, "4.4.1 Upstream unreachable, try again later"),
    Reply(554, "5.2.252 SendAsDenied; relay@contoso.com not allowed"),
])
async def test_submit_reply_reaches_the_client(start: Start, reply: Reply) -> None:
    h = await start()
    h.submit.reply = reply
    c = await connect(h)
    await c.ehlo()
    code, text = await c.send(SYSTEM, ["a@example.com"])
    mid = h.submit.messages[0].id
    assert (code, text) == (reply.code, f"{reply.text} (id {mid})")


async def test_submit_text_naming_the_id_passes_through(start: Start) -> None:
    h = await start()
    h.submit.reply = lambda msg: Reply(250, f"2.0.0 Ok: delivered as {msg.id}")
    c = await connect(h)
    await c.ehlo()
    code, text = await c.send(SYSTEM, ["a@example.com"])
    assert (code, text) == (250, f"2.0.0 Ok: delivered as {h.submit.messages[0].id}")


async def test_submit_raising_is_451_and_the_server_keeps_serving(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    ids: list[tuple[str, logging.LogRecord]] = []

    class IdCapture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            ids.append((message_id.get(), record))

    capture = IdCapture(logging.ERROR)
    logging.getLogger("relay").addHandler(capture)
    try:
        h = await start()
        h.submit.error = RuntimeError("boom: internal detail")
        c = await connect(h)
        await c.ehlo()
        code, text = await c.send(SYSTEM, ["a@example.com"])
        mid = h.submit.messages[0].id
        assert (code, text) == (451, f"4.3.0 Internal error, try again later (id {mid})")
        assert "boom" not in text
        assert [(i, r.exc_info is not None) for i, r in ids] == [(mid, True)]
        h.submit.error = None
        assert (await c.send(SYSTEM, ["b@example.com"]))[0] == 250
        c2 = await connect(h)
        await c2.ehlo()
        assert (await c2.send(SYSTEM, ["c@example.com"]))[0] == 250
    finally:
        logging.getLogger("relay").removeHandler(capture)


async def test_exception_in_a_hook_is_451_with_id(start: Start) -> None:
    h = await start()

    class BrokenRouter(Router):
        def select(self, *, user: str | None, sender: str, client_ip: str) -> str:
            raise KeyError("routing table corrupted")

    h.receiver.update(h.config, BrokenRouter(h.config), PasswordVerifier({}))
    c = await connect(h)
    await c.ehlo()
    code, text = await c.cmd(f"MAIL FROM:<{SYSTEM}>")
    assert code == 451 and text.startswith("4.3.0 Internal error, try again later (id ")
    assert "corrupted" not in text
    assert (await c.cmd("NOOP"))[0] == 250


async def test_client_leaving_during_submission_does_not_cancel_it(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    h = await start()
    h.submit.gate = asyncio.Event()
    c = await connect(h)
    await c.ehlo()
    for line in (f"MAIL FROM:<{SYSTEM}>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await c.cmd(line))[0] in (250, 354)
    c.writer.write(MESSAGE + b".\r\n")
    await c.writer.drain()
    await until(lambda: bool(h.submit.messages))
    c.writer.transport.abort()
    await asyncio.sleep(0.05)
    h.submit.gate.set()
    await until(lambda: len(h.submit.finished) == 1)
    await until(lambda: "hand-over finished after the client went away" in caplog.text)


# --- reload and shutdown ------------------------------------------------------------------

async def test_update_applies_to_new_sessions_only(start: Start) -> None:
    h = await start()
    bound = list(h.receiver.bound)
    old = await connect(h)
    await old.ehlo()
    config = build_config({"server": {"relay_networks": ["192.0.2.0/24"],
                                      "hostname": "new.test"}})
    h.receiver.update(config, Router(config), PasswordVerifier({}))
    assert h.receiver.bound == bound
    new = await connect(h)
    assert new.banner[1].startswith("new.test ")
    await new.ehlo()
    assert (await new.cmd(f"MAIL FROM:<{SYSTEM}>"))[0] == 530
    assert (await old.send(SYSTEM, ["a@example.com"]))[0] == 250


async def test_reload_keeps_unchanged_sockets(start: Start) -> None:
    h = await start()
    [first] = h.receiver.bound
    listeners = [{"address": "127.0.0.1", "port": 0}, {"address": "127.0.0.1", "port": 0}]
    config = build_config({"server": {"listeners": listeners}})
    c = await connect(h)                        # a session on the kept listener survives
    change = await h.receiver.prepare(config, Router(config), PasswordVerifier({}))
    await h.receiver.commit(change)
    assert h.receiver.bound[0] == first and len(h.receiver.bound) == 2
    assert (await c.cmd("NOOP"))[0] == 250
    c2 = await Client.connect(h.receiver.bound[1])
    assert c2.banner[0] == 220


async def test_stop_closes_sessions_and_listeners(start: Start) -> None:
    h = await start()
    address = h.address
    c = await connect(h)
    await c.ehlo()
    await h.receiver.stop()
    assert await c.reply() == (421, "4.3.2 Service shutting down")
    assert await c.closed()
    assert h.receiver.bound == [] and h.receiver.sessions == 0
    with pytest.raises(OSError):
        await Client.connect(address)


async def test_drain_refuses_new_sessions_and_finishes_transactions(start: Start) -> None:
    h = await start()
    h.submit.gate = asyncio.Event()
    busy, idle = await connect(h), await connect(h)
    await busy.ehlo()
    await idle.ehlo()
    sending = asyncio.create_task(busy.send(SYSTEM, ["a@example.com"]))
    await until(lambda: bool(h.submit.messages))
    draining = asyncio.create_task(h.receiver.drain(5))
    assert await idle.reply() == (421, "4.3.2 Service shutting down")
    late = await Client.connect(h.address)
    assert late.banner == (421, "4.3.2 Service shutting down")
    h.submit.gate.set()
    assert (await sending)[0] == 250
    assert await busy.reply() == (421, "4.3.2 Service shutting down")
    assert await draining is True
    assert h.submit.finished and h.receiver.sessions == 0


async def test_start_failure_leaves_nothing_bound(start: Start, tmp_path: Path) -> None:
    h = await start()
    port = h.address[1]
    config = build_config({"server": {"listeners": [{"address": "127.0.0.1", "port": 0},
                                                    {"address": "127.0.0.1", "port": port}]}})
    receiver = make_receiver(config, FakeSubmit(), tmp_path / "other")
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
        await receiver.start()
    assert receiver.bound == [] and receiver._bound == []


async def test_replies_are_not_held_back_for_the_clients_ack(start: Start) -> None:
    """Nagle's algorithm is off on every client connection (TCP_NODELAY), as asyncio sets
    it on sockets that say they are TCP: with it on, every line of a multi-line reply
    after the first (EHLO's) waited for the client's delayed ACK, 40 ms per connection."""
    h = await start()
    reader, writer = await asyncio.open_connection(*h.address)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        [session] = list(h.receiver._sessions)
        sock = session.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_multi_line_reply_leaves_in_one_write(start: Start) -> None:
    """aiosmtpd pushes EHLO's reply a line at a time; the session writes it once, as one
    TCP segment instead of six, whole and in order."""
    h = await start()
    reader, writer = await asyncio.open_connection(*h.address)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        [session] = list(h.receiver._sessions)
        writes: list[bytes] = []
        real_write = session._writer.write

        def write(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        session._writer.write = write
        writer.write(b"EHLO client.example\r\n")
        lines = [await reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await reader.readline())
        assert len(lines) >= 4 and lines[-1].startswith(b"250 ")
        assert writes == [b"".join(lines)]
        writer.write(b"NOOP\r\n")
        assert (await reader.readline()).startswith(b"250 ")
        assert len(writes) == 2                 # nothing held back from the one before
    finally:
        writer.close()
        await writer.wait_closed()
