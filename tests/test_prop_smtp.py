"""Properties of the SMTP dialogue, against a real Receiver on a loopback socket.

Each example starts a receiver (a fresh one, so that AUTH penalties and lockouts of one
example do not decide the next), plays a generated session through a raw client and
checks what any client may count on, whatever it sends:

- every reply is well formed: three digits, one code for all its lines, no control
  character inside a line, no Python exception name and no traceback; a 4xx or 5xx carries
  an enhanced status code of its own class;
- one reply per command line, one per message: the session stays in step (it ends with
  QUIT answered 221), never hangs (every reply within a bound) and the server survives
  (a new client still gets its banner);
- a 250 for a message names a message that was handed to submit, and each message handed
  over got one; what was handed over is canonical (CRLF lines, no NUL), its sender fields
  obey the profile's policy as the email package reads them, and under ``keep`` it is the
  message as sent, byte for byte (after the line model);
- no log line at ERROR or with a traceback, and nothing of a password in any log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from relay.accept.headers import RawMessage
from relay.accept.policy import is_permitted
from relay.core.log import _NOISY, JsonFormatter
from relay.receive.server import Receiver
from tests.conftest import PASSWORDS, build_config
from tests.strategies import (
    NOT_PERMITTED,
    PERMITTED,
    POLICIES,
    SEND_AS,
    canonical,
    forbidden_senders,
    is_canonical,
    messages,
    read_upstream,
    scaled,
    stuff,
    with_final_crlf,
)
from tests.test_receive import FakeSubmit, data_of, make_receiver

pytestmark = pytest.mark.fuzz

# 1000 (the least allowed) makes the reader's buffer 1001 bytes: cheap to overrun.
MAX_LINE = 1000
REPLY_WAIT = 10.0          # the longest any reply may take (AUTH penalties are 10-40 ms)
SESSION_WAIT = 60.0

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})( |$)")
_EXCEPTION = re.compile(rb"Traceback|File \"|\b[A-Z][A-Za-z]*(Error|Exception)\b")


# --- what a session is made of ------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """One command line, sent as it is (no LF inside) with CRLF after it."""

    data: bytes


@dataclass(frozen=True)
class Auth:
    """AUTH with an initial response or none, then answers to the 334 challenges."""

    command: bytes
    answers: tuple[bytes, ...]
    secrets: tuple[bytes, ...]       # what must never appear in a log line
    # Sends its answers without waiting for the 334s (a client out of step: they arrive
    # as commands when AUTH is refused).
    blind: bool = False


@dataclass(frozen=True)
class Data:
    """DATA with a message: ``stuffed`` as smtplib sends it, or raw (any dots and line
    breaks, the smuggling forms among them, made only so that the end is where it is)."""

    payload: bytes
    stuffed: bool

    def wire(self) -> bytes:
        if self.stuffed:
            return stuff(with_final_crlf(self.payload)) + b".\r\n"
        body = re.sub(rb"(?<=\r\n)\.(?=\r\n)", b"..", self.payload)
        if body.startswith(b".\r\n"):
            body = b"x" + body
        if body == b"." or body.endswith(b"\r\n."):
            body += b"x"
        return body + b"\r\n.\r\n"

    def expected(self) -> bytes | None:
        """The message as the relay should keep it (before the policy), if known."""
        return canonical(with_final_crlf(self.payload)) if self.stuffed else None


Step = Line | Auth | Data

_VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY",
          b"EXPN", b"HELP", b"AUTH", b"STARTTLS", b"BDAT", b"ehlo", b"mail from:", b""]
_no_lf = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
command_lines = st.one_of(
    st.builds(lambda verb, sep, arg: verb + sep + arg, st.sampled_from(_VERBS),
              st.sampled_from([b" ", b"", b"  ", b"\t"]), _no_lf),
    _no_lf,
    st.builds(lambda n, c: b"NOOP " + c * n, st.sampled_from([990, 1001, 1500, 5000]),
              st.sampled_from([b"x", b"\r", b"\xff"])),
).map(Line)

hostile_addresses = st.one_of(
    st.sampled_from(["<>", *NOT_PERMITTED]),
    st.text(alphabet='ab@.<> "\\\x00\x01\r\x7fé日,:;[]', max_size=30),
    st.just("a" * 300 + "@example.com"),
)
# Mostly addresses a transaction gets through with, so that messages reach DATA.


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five (one_of alone leans to the richer strategy)."""
    return st.sampled_from([True, True, True, True, False]).flatmap(
        lambda ok: good if ok else bad)


senders = mostly(st.sampled_from(["", *PERMITTED, "app@example.com", "root"]),
                 hostile_addresses)
recipients = mostly(st.sampled_from(["a@example.com", "b@example.org", "zoë@example.com"]),
                    hostile_addresses)
mail_params = mostly(st.sampled_from(["", " SMTPUTF8", " BODY=8BITMIME", " SIZE=100"]),
                     st.sampled_from([" SIZE=999999999999", " FOO=bar", " SIZE=x",
                                      " BODY=BINARYMIME"]))


def _mail(address: str, params: str) -> Line:
    return Line(f"MAIL FROM:<{address}>{params}".encode("utf-8", "surrogateescape"))


def _rcpt(address: str) -> Line:
    return Line(f"RCPT TO:<{address}>".encode("utf-8", "surrogateescape"))


users = st.one_of(st.sampled_from(["alice", "bob", "mallory", ""]), st.text(max_size=12))
passwords = st.one_of(st.sampled_from(list(PASSWORDS.values())),
                      st.text(max_size=12).map(lambda s: "S3cr3t-" + s.replace("\0", "")))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    mechanism = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"login", b"CRAM-MD5",
                                      b"XOAUTH2", b""]))
    user = draw(users).replace("\0", "").encode("utf-8", "surrogateescape")
    password = draw(passwords).encode("utf-8", "surrogateescape")
    secrets = (password, b64(password))
    if mechanism.upper() == b"LOGIN":
        answers = [b64(user), b64(password)]
    else:
        authzid = draw(st.sampled_from([b"", user, b"admin"]))
        blob = authzid + b"\0" + user + b"\0" + password
        secrets += (b64(blob),)
        answers = [b64(blob)]
    # Mangle: answers typed in clear (a password is then its own secret), garbage, "*".
    how = draw(st.sampled_from(["ok"] * 4 + ["clear", "garbage", "abort", "long"]))
    if how == "clear":
        answers = [a if i + 1 < len(answers) else password for i, a in enumerate(answers)]
    elif how == "garbage":
        answers[-1] = draw(_no_lf)
    elif how == "abort":
        answers[-1] = b"*"
    elif how == "long":
        answers[-1] = b64(password) * (3000 // max(1, len(b64(password))) + 1)
    command = b"AUTH " + mechanism
    if answers and draw(st.booleans()):     # the first answer as the initial response
        command += b" " + answers.pop(0)
    return Auth(command, tuple(answers), secrets, blind=draw(st.integers(0, 3)) == 0)


payloads = st.one_of(
    messages(),
    messages(),
    st.binary(max_size=300),
    st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b"\x01", b"\xff",
                              b" ", b"x", b"From: ceo@contoso.com", b"Subject: s",
                              b"From: relay@contoso.com", "ö".encode()]),
             max_size=30).map(b"".join),
)
# A NUL refuses the whole message: most payloads go without, so that the rest is tested.
datas = st.builds(Data, mostly(payloads.map(lambda p: p.replace(b"\0", b"")), payloads),
                  st.booleans())


@st.composite
def transactions(draw: st.DrawFn) -> list[Step]:
    """MAIL, RCPT and DATA as a well-behaved client orders them, with hostile contents."""
    steps: list[Step] = [_mail(draw(senders), draw(mail_params))]
    steps += [_rcpt(a) for a in draw(st.lists(recipients, min_size=1, max_size=2))]
    steps.append(draw(datas))
    return steps


@st.composite
def sessions(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    if draw(st.integers(0, 9)):
        steps.append(Line(draw(st.sampled_from([b"EHLO app.test", b"HELO app.test",
                                                b"EHLO \xff\x01x"]))))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["transaction", "transaction", "line", "auth"]))
        if kind == "line":
            steps.append(draw(command_lines))
        elif kind == "auth":
            steps.append(draw(auths()))
        else:
            steps += draw(transactions())
    return steps


# --- the client -----------------------------------------------------------------------------

class Closed(Exception):
    """The server closed the connection (after a 421 or a QUIT)."""


@dataclass
class Transcript:
    replies: list[tuple[bytes, bytes]] = field(default_factory=list)   # (sent, reply)
    accepted: dict[str, Data | None] = field(default_factory=dict)     # id -> the message
    last: int = 0


def check_reply(lines: list[bytes]) -> int:
    """The code of a reply read as ``lines`` (without their CRLF); asserts it is well formed."""
    code = lines[0][:3]
    for i, line in enumerate(lines):
        assert re.match(rb"^[2-5]\d\d[ -]", line), lines
        assert line[:3] == code, lines
        assert (line[3:4] == b" ") == (i == len(lines) - 1), lines
        # RFC 5321 4.2: reply text is HT and printable characters (8-bit after SMTPUTF8).
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line), f"control character in {line!r}"
        assert not _EXCEPTION.search(line), f"exception text in {line!r}"
        if code[:1] in b"45":
            m = _ENHANCED.match(line[4:])
            assert m is not None, f"no enhanced status code: {line!r}"
            assert m.group(1) == code[:1], f"enhanced code of another class: {line!r}"
    return int(code)


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> tuple[RawClient, int]:
        reader, writer = await asyncio.open_connection(*address, limit=1 << 20)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> int:
        lines: list[bytes] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), REPLY_WAIT)
            if not raw:
                if lines:
                    raise AssertionError(f"connection closed inside a reply: {lines!r}")
                raise Closed
            assert raw.endswith(b"\r\n"), f"reply line without CRLF: {raw!r}"
            lines.append(raw[:-2])
            if raw[3:4] != b"-":
                self.last_text = b"\n".join(lines)
                return check_reply(lines)

    async def send(self, data: bytes) -> int:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def queued_id(text: bytes) -> str | None:
    m = re.search(rb"queued as ([0-9A-Za-z_-]+)$", text)
    return m.group(1).decode() if m else None


async def play(client: RawClient, steps: list[Step], transcript: Transcript) -> None:
    """Run ``steps``; every line sent gets exactly one reply (DATA's lines one in all)."""

    async def line(data: bytes, message: Data | None = None) -> int:
        code = await client.send(data + b"\r\n")
        transcript.replies.append((data, client.last_text))
        if code == 354:            # DATA was accepted: send the message (or an empty one)
            wire = message.wire() if message is not None else b".\r\n"
            code = await client.send(wire)
            transcript.replies.append((b"<data>", client.last_text))
            if code == 250:
                mid = queued_id(client.last_text)
                assert mid is not None, client.last_text
                transcript.accepted[mid] = message
        transcript.last = code
        if code == 421 or (code == 221 and data.upper().startswith(b"QUIT")):
            raise Closed
        return code

    for step in steps:
        if isinstance(step, Line):
            await line(step.data)
        elif isinstance(step, Data):
            await line(b"DATA", step)
        else:
            code = await line(step.command)
            for answer in step.answers:
                if code != 334 and not step.blind:
                    break
                code = await line(answer)
    if transcript.last == 334:
        await line(b"*")            # an AUTH exchange still open: end it
    await line(b"QUIT")


# --- running it -----------------------------------------------------------------------------

class LogCapture(logging.Handler):
    """Every record, at every level, of every logger, as the relay's JSON formatter (with
    extra fields and tracebacks) would write it, undecoded by JSON."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                          if k not in JsonFormatter._STD)
        text = f"{record.getMessage()} {extras}"
        if record.exc_info:
            text += self._json.formatException(record.exc_info)
        self.texts.append(text)


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    """The log as ``logging.level: debug`` makes it (relay.core.log.setup_logging): every
    level of the relay's own loggers, the libraries' protocol loggers from WARNING up."""
    capture = LogCapture()
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in _NOISY)]
    levels = [logger.level for logger in loggers]
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for logger in loggers[1:]:
        logger.setLevel(logging.WARNING)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def run_session(steps: list[Step], policy: str, open_relay: bool, spool: Path
                      ) -> tuple[Transcript, FakeSubmit, Receiver]:
    overrides = {
        "server": {"max_line_length": MAX_LINE,
                   **({} if open_relay else {"relay_networks": ["192.0.2.0/24"]})},
        "profiles": {"system": {"sender_policy": policy, "send_as": SEND_AS},
                     "alice": {"sender_policy": policy, "send_as": SEND_AS}},
    }
    config = build_config(overrides)
    submit = FakeSubmit()
    receiver = make_receiver(config, submit, spool)
    await receiver.start()
    transcript = Transcript()
    try:
        async with asyncio.timeout(SESSION_WAIT):
            client, banner = await RawClient.connect(receiver.bound[0])
            assert banner == 220
            try:
                await play(client, steps, transcript)
            except Closed:
                pass
            finally:
                await client.close()
            # The server survived: a new client is served.
            fresh, banner = await RawClient.connect(receiver.bound[0])
            assert banner == 220
            assert await fresh.send(b"QUIT\r\n") == 221
            await fresh.close()
    finally:
        await receiver.stop()
    return transcript, submit, receiver


def check_submitted(transcript: Transcript, submit: FakeSubmit, receiver: Receiver,
                    policy: str) -> None:
    # A 250 for exactly the messages handed over.
    assert set(transcript.accepted) == {m.id for m in submit.messages}
    for msg in submit.messages:
        data = data_of(msg)
        assert is_canonical(data), data
        profile = receiver.settings.config.profiles[msg.profile]
        seen = read_upstream(data)
        assert seen.relay_names == seen.names
        sent = transcript.accepted[msg.id]
        # A DATA among the arbitrary command lines was sent an empty message.
        expected = sent.expected() if sent is not None else b""
        if policy == "keep":
            if expected is not None:
                kept = RawMessage(expected)
                kept.recode_8bit()
                # The message as sent, after the Received field (which a first line that
                # begins with a blank continues, to every reader).
                trace = data[:len(data) - len(kept.to_bytes())]
                assert data.endswith(kept.to_bytes())
                assert trace.startswith(b"Received: ") and trace.endswith(b"\r\n")
                assert RawMessage(trace).names() == ["Received"]
            continue
        assert is_permitted(profile, msg.mail_from)
        assert forbidden_senders(profile, seen) == []


def run(steps: list[Step], policy: str, open_relay: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, captured_logs() as logs:
        transcript, submit, receiver = asyncio.run(run_session(steps, policy, open_relay,
                                                               Path(tmp)))
    check_submitted(transcript, submit, receiver, policy)
    # What the examples reached, for --hypothesis-show-statistics.
    event(f"messages accepted: {min(len(submit.messages), 2)}")
    for sent, reply in transcript.replies:
        if sent == b"<data>":
            event(f"message answered {reply[:9].decode()}")
    problems = [t for r, t in zip(logs.records, logs.texts, strict=True)
                if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert problems == [], problems
    secrets = [s for step in steps if isinstance(step, Auth) for s in step.secrets]
    for secret in secrets:
        # Case-blind: aiosmtpd upper-cases what it quotes of a command.
        text = secret.decode("utf-8", "surrogateescape").casefold()
        leaked = [t for t in logs.texts if text in t.casefold()]
        assert leaked == [], f"secret {text!r} logged: {leaked}"


@given(sessions(), st.sampled_from(POLICIES), st.sampled_from([True, True, True, False]))
@scaled(1.0)
@example([Line(b"EHLO app.test"), _mail("relay@contoso.com", ""), _rcpt("a@example.com"),
          Data(b"Subject: a\rFrom: ceo@contoso.com\r\n\r\n.\n.\r\nx\n.\r\n", False)],
         "reject", True)
@example([Line(b"EHLO app.test"), _mail("", " BODY=8BITMIME"), _rcpt("a@example.com"),
          Data(b"From x\r\nFrom: Ceo <ceo@contoso.com>\r\n\r\n.hi\r\n..\n\r.\r\n", True),
          _mail("relay@contoso.com", ""), _rcpt("b@example.org"),
          Data("Subject: Grüße\nFrom: a@b.c\r\n\nbody\r".encode() + b"\xff", True)],
         "rewrite", True)
@example([Line(b"EHLO app.test"), _mail("relay@contoso.com", ""), _rcpt("a@example.com"),
          Data(b"Subject: \xe9t\xe9\r\nFrom: relay@contoso.com\r\n\r\n.\r\nx", True)],
         "keep", True)
@example([Line(b"EHLO app.test"), _mail("", ""), _rcpt("a@example.com"), Data(b" ", True)],
         "keep", True)
@example([Line(b"\x00"), Line(b"X\rY\x7f")], "keep", True)
@example([Line(b"VRFY >\x80")], "keep", True)
@example([Line(b"EHLO app.test"), Line(b"VRFY \x00@"), Line(b"MAIL FROM:\x00@"),
          _mail("a@example.com", ""), Line(b"RCPT TO:\x00@")], "keep", True)
@example([Line(b"EHLO app.test"), _mail("relay@contoso.com", " FOO=bar"), Line(b"HELO"),
          Line(b"EXPN x"), Line(b"STARTTLS")], "keep", True)
@example([Line(b"EHLO app.test"),
          Auth(b"AUTH LOGIN", (b64(b"alice"), b"S3cr3t-typed-in-clear"),
               (b"S3cr3t-typed-in-clear",))], "rewrite", False)
@example([Line(b"EHLO app.test"), Line(b"AUTH PLAIN"), Line(b"*"),
          Auth(b"AUTH  " + b64(b"\0alice\0alice-password-1"), (),
               (b"alice-password-1", b64(b"\0alice\0alice-password-1")))], "keep", False)
@example([Auth(b"AUTH LOGIN", (b64(b"alice"), b"S3cr3t-out-of-step"),
               (b"S3cr3t-out-of-step",), blind=True)], "keep", True)
def test_smtp_dialogue(steps: list[Step], policy: str, open_relay: bool) -> None:
    run(steps, policy, open_relay)
