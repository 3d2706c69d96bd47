"""Properties of the header path: DATA's line model, header splitting and the sender policy.

Each message goes the way the relay takes it (relay.receive.data.DataReader over a stream,
then relay.receive.handler.prepare_headers with the profile's policy, then the Received
field before it), and the bytes that would go upstream are judged by the email package
(tests/strategies.py): under ``rewrite`` and ``reject`` every address in every From,
Sender, Resent-From and Resent-Sender it finds is one the profile permits (or ``reject``
refused the message), ``keep`` changes nothing, and the relay's view of which fields the
message has is the email package's.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.accept.cleanup import BLIND_COPY_FIELDS, prepare_headers
from relay.accept.headers import RawMessage
from relay.accept.policy import PolicyRejected, PolicyResult, is_permitted
from relay.accept.trace import received_header
from relay.receive.data import DataReader, Limits, Received
from relay.receive.replies import HAS_NUL
from tests.strategies import (
    MAILBOX,
    NOT_PERMITTED,
    PERMITTED,
    POLICIES,
    PROFILES,
    canonical,
    forbidden_senders,
    is_canonical,
    messages,
    read_upstream,
    stuff,
    with_final_crlf,
)

pytestmark = pytest.mark.fuzz

LIMITS = Limits(max_message_size=35 * 1024 * 1024, max_line_length=65536,
                max_header_size=256 * 1024, max_header_fields=1000, max_received_headers=50)
MAX_ADDRESSES = 100
envelope_senders = st.sampled_from(["<>", *PERMITTED, *NOT_PERMITTED[:4]])


class _Sink:
    def __init__(self) -> None:
        self.section: bytes | None = None
        self.body: list[bytes] = []

    async def headers(self, section: bytes) -> None:
        assert self.section is None and not self.body
        self.section = section

    async def body(self, data: bytes) -> None:
        assert self.section is not None
        self.body.append(data)


def read_data(wire: bytes) -> tuple[Received, bytes, bytes]:
    """DATA (the bytes after the 354, end line included) through the relay's reader:
    the outcome, the header section and the body."""

    async def run() -> tuple[Received, _Sink]:
        reader = asyncio.StreamReader(limit=LIMITS.max_line_length + 1)
        reader.feed_data(wire)
        reader.feed_eof()
        sink = _Sink()
        received = await asyncio.wait_for(DataReader(LIMITS).read(reader, sink), 10)
        return received, sink

    received, sink = asyncio.run(run())
    return received, sink.section or b"", b"".join(sink.body) + received.tail


def upstream_bytes(result: PolicyResult, body: bytes) -> bytes:
    """What the relay would send on: its Received field, the policy's output, the body."""
    trace = received_header(client_helo="app.test", client_ip="127.0.0.1",
                            hostname="relay.test", protocol="ESMTP", message_id="PROPTEST1",
                            recipient="a@example.com", when=dt.datetime.now(dt.UTC))
    return trace + result.data + body


@given(messages())
@example(b"Subject: a\rFrom: ceo@contoso.com\r\n\r\nbody")
@example(b"From: a@b.c\r\n.\r\n..\r\n\r\n.\n")
def test_line_model(message: bytes) -> None:
    """What the reader hands on is the message, dots unstuffed and every line break made
    CRLF; the header section is a prefix of it; a NUL refuses the message."""
    data = with_final_crlf(message)
    received, section, body = read_data(stuff(data) + b".\r\n")
    if b"\0" in data:
        assert received.refusal == HAS_NUL
        return
    assert received.refusal is None
    assert section + body == canonical(data)
    assert is_canonical(section + body)
    assert received.eight_bit == (not data.isascii())


@given(messages(), st.sampled_from(POLICIES), envelope_senders)
@example(b"Subject: a\rFrom: ceo@contoso.com\r\n\r\nbody", "reject", MAILBOX)
@example(b"From: relay@contoso.com\r\nFrom x\r\nFrom: ceo@contoso.com\r\n\r\nbody", "reject",
         MAILBOX)
@example(b"From x\r\nFrom: ceo@contoso.com\r\n\r\nbody", "rewrite", MAILBOX)
@example(b"From: relay@contoso.com\r\n:x\r\nSender: ceo@contoso.com\r\n\r\nbody", "reject",
         MAILBOX)
@example(b" \r\nFrom: 0@contoso.com\r\n\r\n", "rewrite", "<>")
@example(b"From :relay@contoso.com\r\n\r\n", "rewrite", "<>")
@example(b"From: =?utf-8?b?YQ0KRnJvbTogY2VvQGNvbnRvc28uY29t?= <relay@contoso.com>\r\n\r\n",
         "rewrite", "<>")
@example(b"From: ceo@contoso.com <relay@contoso.com>\r\n\r\n", "reject", MAILBOX)
@example(b"From: relay@contoso.com\r\nSender: x@y <relay@contoso.com>\r\n\r\n", "rewrite", MAILBOX)
@example(b"From: relay@contoso.com\r\nSender: Smith, John <relay@contoso.com>\r\n\r\n", "reject",
         MAILBOX)
@example(b"Bcc:\r\n\r\n", "keep", "<>")
def test_sender_policy_holds_for_what_goes_upstream(message: bytes, policy: str,
                                                    mail_from: str) -> None:
    received, section, body = read_data(stuff(with_final_crlf(message)) + b".\r\n")
    if received.refusal is not None:
        assert received.refusal == HAS_NUL
        return
    profile = PROFILES[policy]
    try:
        result = prepare_headers(policy, profile, mail_from, section, MAX_ADDRESSES)
    except PolicyRejected as exc:
        assert exc.reply.code in (550, 552), exc.reply
        assert policy == "reject" or exc.reply.code == 552
        assert "\r" not in exc.reply.text and "\n" not in exc.reply.text
        return
    upstream = upstream_bytes(result, body)
    assert is_canonical(upstream)
    seen = read_upstream(upstream)
    assert seen.relay_names == seen.names
    if policy == "keep":
        # Nothing changed but what cleanup does to every message: 8-bit text made UTF-8
        # and the blind-copy fields removed.
        expected = RawMessage(section)
        expected.recode_8bit()
        expected.remove(*BLIND_COPY_FIELDS)
        assert result.data == expected.to_bytes()
        return
    assert is_permitted(profile, result.mail_from)
    assert forbidden_senders(profile, seen) == []
    if policy == "rewrite" and seen.complete:
        # reject passes a message on unchanged: a From only the relay reads is no harm
        # there, as long as nothing else the email package reads is forbidden.
        assert seen.senders.get("From"), "no From address upstream"


_atoms = st.text(alphabet="aZ9.-_=?!#'`{}~+/", min_size=1, max_size=6)


@st.composite
def plain_looking(draw: st.DrawFn) -> str:
    """Address field values near the plain forms: words, dots, angle brackets, atext
    specials and pieces of encoded words, the way applications and attackers write them."""
    local = draw(_atoms)
    domain = draw(st.sampled_from(["contoso.com", "b", "a-b.example", "x..y", "-a.b", "c."]))
    addr = f"{local}@{domain}"
    name = draw(st.lists(_atoms, max_size=3))
    form = draw(st.sampled_from(["bare", "angle", "named", "broken"]))
    if form == "bare":
        return addr
    if form == "angle":
        return f"<{addr}>"
    if form == "named":
        return " ".join(name) + f" <{addr}>"
    return draw(st.sampled_from([f"{addr}>", f"<{addr}", f"{' '.join(name)} {addr}",
                                 f"=?utf-8?q?{local}?= <{addr}>", f"{addr}, {addr}"]))


@given(plain_looking())
@example("relay@contoso.com")
@example("CRM System <crm@contoso.com>")
@example("=?utf-8?q?Hi?= <a@b.com>")
def test_plain_address_values_are_read_as_the_email_package_reads_them(value: str) -> None:
    """The shortcut for plain From values (relay.accept.headers.plain_address) gives what
    the email package, Exchange's stand-in here, gives, or stands aside."""
    from email.policy import default

    from relay.accept.names import plain_address

    plain = plain_address(value)
    if plain is None:
        return
    header = default.header_factory("From", value)
    assert not header.defects, (value, header.defects)
    assert list(header.addresses) == [plain]   # type: ignore[attr-defined]
