"""Byte-level header splitting and editing, parsing with the email package, trace fields."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re

import pytest

from relay.accept.headers import Address, HeaderError, RawMessage
from relay.accept.names import clean_display_name, header_factory
from relay.accept.trace import _date, received_header

LONG_LINE = b"<p>" + b"x" * 5000 + b"</p>"
EIGHT_BIT = "Grüße \u2013 €100 \u2014 日本語\r\n".encode()

# (message, field names found, body as split off)
SPLITS: list[tuple[bytes, list[str], bytes]] = [
    (b"From: a@b.c\r\nTo: d@e.f\r\n\r\nbody\r\n", ["From", "To"], b"body\r\n"),
    (b"From: a@b.c\nTo: d@e.f\n\nbody\n", ["From", "To"], b"body\n"),
    # folded field, tab and space continuations
    (b"Subject: one\r\n two\r\n\tthree\r\nTo: x@y.z\r\n\r\nb", ["Subject", "To"], b"b"),
    # no body: blank line at the very end, or no blank line at all, or no final newline
    (b"From: a@b.c\r\n\r\n", ["From"], b""),
    (b"From: a@b.c\r\nTo: d@e.f\r\n", ["From", "To"], b""),
    (b"From: a@b.c\r\nSubject: x", ["From", "Subject"], b""),
    (b"", [], b""),
    # first line is not a header (bare text): all of it is body
    (b"hello world\r\n", [], b"hello world\r\n"),
    # an mbox From_ line or a field without a name does not end the header section (the
    # email package reads on after both): the fields after it are fields
    (b"From someone Sat Jan  3 01:05:34 1996\r\nFrom: a@b.c\r\n\r\nx\r\n", ["", "From"],
     b"x\r\n"),
    (b"From: a@b.c\r\nFrom x\r\n:y\r\nSender: d@e.f\r\n\r\nx\r\n", ["From", "", "", "Sender"],
     b"x\r\n"),
    (b" leading continuation\r\nFrom: a@b.c\r\n", ["", "From"], b""),
    # header section ended by a non-header line, without a blank line
    (b"From: a@b.c\r\nthis is text\r\n", ["From"], b"this is text\r\n"),
    # obsolete "Name : value", a body that looks like headers, 8-bit and long lines
    (b"Subject : old\r\n\r\nFrom: not-a-header@x.y\r\n", ["Subject"],
     b"From: not-a-header@x.y\r\n"),
    (b"Subject: " + "Grüße".encode() + b"\r\n\r\n" + EIGHT_BIT + LONG_LINE + b"\r\n",
     ["Subject"], EIGHT_BIT + LONG_LINE + b"\r\n"),
    # a whitespace-only line inside the header section is a continuation (as in email)
    (b"Subject: a\r\n \r\nTo: x@y.z\r\n\r\nb", ["Subject", "To"], b"b"),
    # CR alone is not a line end; bytes are kept as they are
    (b"Subject: a\rb\r\n\r\nbody\r\r\n", ["Subject"], b"body\r\r\n"),
]


@pytest.mark.parametrize(("data", "names", "body"), SPLITS)
def test_split_and_round_trip(data: bytes, names: list[str], body: bytes) -> None:
    msg = RawMessage(data)
    assert msg.names() == names
    assert msg.body == body
    assert msg.to_bytes() == data
    assert not msg.changed


@pytest.mark.parametrize(("data", "eol"), [
    (b"From: a@b.c\r\n\r\n", b"\r\n"), (b"From: a@b.c\n\n", b"\n"),
    (b"From: a@b.c", b"\r\n"), (b"plain\ntext", b"\n")])
def test_line_ending_style(data: bytes, eol: bytes) -> None:
    assert RawMessage(data).eol == eol


def test_header_block_alias_and_parse() -> None:
    assert RawMessage.parse(b"To: a@b.c\r\n\r\n").names() == ["To"]


@pytest.mark.parametrize(("raw", "expected"), [
    (b"From: Billing <billing@contoso.com>", [("Billing", "billing@contoso.com")]),
    (b"From: \"Sales @ HQ\" <x@y.com>", [("Sales @ HQ", "x@y.com")]),
    (b"From: \"Billing\r\n Department\"\r\n <billing@contoso.com>",
     [("Billing Department", "billing@contoso.com")]),
    (b"From: =?utf-8?q?Zo=C3=AB_=C3=85ngstr=C3=B6m?= <zoe@contoso.com>",
     [("Zoë Ångström", "zoe@contoso.com")]),
    ("From: Zoë Ångström <zoe@contoso.com>".encode(), [("Zoë Ångström", "zoe@contoso.com")]),
    (b"From: a@b.c, \"B, Inc\" <b@c.d>", [("", "a@b.c"), ("B, Inc", "b@c.d")]),
    (b"FROM: a@b.c", [("", "a@b.c")]),
    # unquoted specials in a single name <addr>: the angle brackets decide
    (b"From: Sales @ HQ <x@y.com>", [("Sales @ HQ", "x@y.com")]),
    (b"From: Smith, John <js@example.com>", [("Smith, John", "js@example.com")]),
])
def test_addresses(raw: bytes, expected: list[tuple[str, str]]) -> None:
    msg = RawMessage(raw + b"\r\nTo: t@example.com\r\n\r\nbody\r\n")
    got = [(a.display_name, a.addr_spec) for a in msg.addresses("From")]
    assert got == expected


def test_addresses_across_several_fields_and_salvage_flag() -> None:
    msg = RawMessage(b"From: a@b.c\r\nFrom: Sales @ HQ <x@y.com>\r\n\r\n")
    parsed = msg.parse_addresses("from")
    assert [a.addr_spec for a in parsed.addresses] == ["a@b.c", "x@y.com"]
    assert parsed.salvaged
    assert not RawMessage(b"From: a@b.c\r\n\r\n").parse_addresses("From").salvaged
    assert RawMessage(b"To: a@b.c\r\n\r\n").addresses("From") == []


def test_salvaged_encoded_name_holding_a_line_break() -> None:
    # The registry gives up on it (no Address may hold CR or LF); the fallback must not
    # raise on it either.
    msg = RawMessage(b"From: =?utf-8?b?YQ0KRnJvbTogY2VvQGNvbnRvc28uY29t?= <relay@contoso.com>"
                     b"\r\n\r\n")
    parsed = msg.parse_addresses("From")
    assert [(a.display_name, a.addr_spec) for a in parsed.addresses] == [
        ("a From: ceo@contoso.com", "relay@contoso.com")]
    assert parsed.salvaged


def test_undecodable_bytes_are_kept_and_readable() -> None:
    data = b"From: Zo\xeb <zoe@contoso.com>\r\nSubject: caf\xe9\r\n\r\n\xff\xfe body\r\n"
    msg = RawMessage(data)
    [addr] = msg.addresses("From")
    assert addr.addr_spec == "zoe@contoso.com"
    assert clean_display_name(addr.display_name) == "Zoë"     # read as Windows-1252
    assert msg.to_bytes() == data


@pytest.mark.parametrize("value", [
    b"x@", b"root", b"root (Cron Daemon)", b"<>", b"a@b@c", b"\"unterminated <a@b.c>",
    b"Name <a@b.c> trailing", b"a@b.c, root"])
def test_unusable_address_lists_raise_header_error(value: bytes) -> None:
    msg = RawMessage(b"From: " + value + b"\r\n\r\n")
    with pytest.raises(HeaderError) as err:
        msg.addresses("From")
    assert "From" in str(err.value)


def test_get_all_returns_registry_headers() -> None:
    msg = RawMessage(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= Welt\r\n"
                     b"Received: a\r\nReceived: b\r\n\r\n")
    [subject] = msg.get_all("subject")
    assert str(subject) == "Grüße Welt"
    assert [str(h) for h in msg.get_all("Received")] == ["a", "b"]
    assert "received" in msg and "Reply-To" not in msg
    with pytest.raises(HeaderError):
        RawMessage(b"From: x@\r\n\r\n").get_all("From")
    with pytest.raises(HeaderError):
        RawMessage(b"Subject: x\r\n\r\n").addresses("Subject")


def test_set_replaces_in_place_and_keeps_other_bytes() -> None:
    head = b"Received: from x\r\n\tby y; Sun, 1 Jan 2026 00:00:00 +0000\r\n"
    tail = (b"To: \"Folded\r\n  Name\" <t@example.com>\r\nSubject: " + "ü".encode() +
            b"\r\n\r\n" + EIGHT_BIT + LONG_LINE + b"\r\n")
    data = head + b"From: Old <old@example.com>\r\n" + tail
    msg = RawMessage(data)
    msg.set("From", Address(display_name="Old", addr_spec="relay@contoso.com"))
    assert msg.changed
    assert msg.to_bytes() == head + b"From: Old <relay@contoso.com>\r\n" + tail


def test_set_removes_duplicates_and_appends_when_missing() -> None:
    msg = RawMessage(b"FROM: a@b.c\r\nTo: t@x.y\r\nfrom: d@e.f\r\n\r\nbody")
    msg.set("From", "relay@contoso.com")
    msg.set("Reply-To", [Address(addr_spec="a@b.c"), Address(addr_spec="d@e.f")])
    assert msg.to_bytes() == (b"From: relay@contoso.com\r\nTo: t@x.y\r\n"
                              b"Reply-To: a@b.c, d@e.f\r\n\r\nbody")


def test_set_follows_lf_line_endings() -> None:
    msg = RawMessage(b"From: a@b.c\nSubject: s\n\nbody\n")
    msg.set("From", Address(display_name="Zoë Ångström " * 6, addr_spec="relay@contoso.com"))
    out = msg.to_bytes()
    assert b"\r" not in out
    assert out.endswith(b"\nSubject: s\n\nbody\n")


def test_set_encodes_and_folds_non_ascii_names() -> None:
    name = "Zoë Ångström, Abteilung für sehr lange Anzeigenamen @ Hauptsitz Zürich"
    msg = RawMessage(b"From: a@b.c\r\n\r\nx")
    msg.set("From", Address(display_name=name, addr_spec="relay@contoso.com"))
    out = msg.to_bytes()
    field = out.split(b"\r\n\r\n")[0]
    assert field.isascii() and b"=?utf-8?" in field
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    reparsed = email.message_from_bytes(out, policy=email.policy.default)
    [addr] = reparsed["From"].addresses
    assert addr.addr_spec == "relay@contoso.com"
    assert addr.display_name.replace(" ", "") == name.replace(" ", "")
    # and our own reader agrees
    [again] = RawMessage(out).addresses("From")
    assert again.addr_spec == "relay@contoso.com"


def test_set_uses_utf8_for_international_addresses() -> None:
    msg = RawMessage(b"From: a@b.c\r\n\r\nx")
    msg.set("Reply-To", [Address(username="jürgen", domain="exämple.com")])
    assert "Reply-To: jürgen@exämple.com\r\n".encode() in msg.to_bytes()


def test_set_cannot_inject_fields() -> None:
    msg = RawMessage(b"From: a@b.c\r\n\r\nx")
    msg.set("Subject", "hi\r\nBcc: victim@example.com")
    out = msg.to_bytes()
    assert out.count(b"\r\n") == 3       # From, Subject, blank line
    assert b"\r\nBcc:" not in out
    with pytest.raises(ValueError, match="invalid header field name"):
        msg.set("Bad Name", "x")
    with pytest.raises(ValueError, match="invalid header field name"):
        msg.set("X-A:B", "x")


@pytest.mark.parametrize("text", [
    "=?utf-8?q?hi=0D=0ABcc=3A_victim=40example.com?=",      # an encoded word hiding CRLF
    "hi =?utf-8?b?DQpCY2M6IHZpY3RpbUBleGFtcGxlLmNvbQ==?= there",
    "Zoë \x00\x1b[31m =?x?", "x" * 300 + " =?utf-8?q?=0A?=", "root (Cron Daemon) " * 12])
def test_set_text_reads_back_as_the_text_it_was(text: str) -> None:
    msg = RawMessage(b"From: a@b.c\r\n\r\nx")
    msg.set("X-Note", text)
    out = msg.to_bytes()
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed.keys() == ["From", "X-Note"] and b"\nBcc" not in out
    assert parsed["X-Note"] == " ".join(re.sub(r"[\x00-\x1f]", " ", text).split())
    assert all(len(line) <= 78 for line in out.split(b"\r\n"))


def test_set_after_unterminated_last_field_adds_line_end() -> None:
    msg = RawMessage(b"From: a@b.c\nSubject: x")
    msg.set("Reply-To", "r@b.c")
    assert msg.to_bytes() == b"From: a@b.c\nSubject: x\nReply-To: r@b.c\n"


def test_set_on_message_without_headers_goes_before_the_text() -> None:
    msg = RawMessage(b"just text\r\n")
    msg.set("From", "relay@contoso.com")
    assert msg.to_bytes() == b"From: relay@contoso.com\r\njust text\r\n"


def test_remove() -> None:
    data = b"Sender: s@x.y\r\nFrom: a@b.c\r\nsender: t@x.y\r\n\r\nSender: body\r\n"
    msg = RawMessage(data)
    assert msg.remove("Sender") == 2
    assert msg.to_bytes() == b"From: a@b.c\r\n\r\nSender: body\r\n"
    assert msg.remove("Sender") == 0


def test_prepend_converts_line_endings() -> None:
    trace = b"Received: from a ([10.0.0.1])\r\n\tby b; Sun, 1 Jan 2026 00:00:00 +0000\r\n"
    lf = RawMessage(b"From: a@b.c\n\nbody\n")
    lf.prepend(trace)
    assert lf.to_bytes() == trace.replace(b"\r\n", b"\n") + b"From: a@b.c\n\nbody\n"
    crlf = RawMessage(b"From: a@b.c\r\n\r\nbody\r\n")
    crlf.prepend(trace.rstrip(b"\r\n"))
    crlf.prepend(b"X-First: 1\r\n")
    assert crlf.to_bytes() == b"X-First: 1\r\n" + trace + b"From: a@b.c\r\n\r\nbody\r\n"


# --- Received ----------------------------------------------------------------------------

WHEN = dt.datetime(2026, 11, 22, 6, 41, 2, tzinfo=dt.UTC)


def trace(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "client_helo": "helo", "client_ip": "10.1.2.3", "hostname": "relay.example.com",
        "protocol": "ESMTPSA", "message_id": "4F2A9C01B3D7", "recipient": "a@b.c",
        "when": WHEN}
    args.update(overrides)
    return received_header(**args)  # type: ignore[arg-type]


def unfold(field: bytes) -> str:
    return re.sub(r"\r\n[ \t]", " ", field.decode("ascii")).rstrip("\r\n")


def test_received_format() -> None:
    field = trace()
    assert field == (b"Received: from helo ([10.1.2.3]) by relay.example.com (smtp-oauth-relay)"
                     b"\r\n\twith ESMTPSA id 4F2A9C01B3D7 for <a@b.c>;"
                     b" Sun, 22 Nov 2026 06:41:02 +0000\r\n")
    assert unfold(field) == ("Received: from helo ([10.1.2.3]) by relay.example.com "
                             "(smtp-oauth-relay) with ESMTPSA id 4F2A9C01B3D7 for <a@b.c>; "
                             "Sun, 22 Nov 2026 06:41:02 +0000")


def test_received_parses_as_one_trace_field_with_date() -> None:
    msg = email.message_from_bytes(trace() + b"\r\n", policy=email.policy.default)
    assert list(msg.keys()) == ["Received"]
    date = str(msg["Received"]).rsplit(";", 1)[1]
    assert email.utils.parsedate_to_datetime(date) == WHEN


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"recipient": None}, "id 4F2A9C01B3D7; Sun, 22 Nov 2026"),
    ({"client_ip": "2001:db8::7"}, "from helo ([IPv6:2001:db8::7]) by"),
    ({"client_ip": "::ffff:10.0.0.1"}, "from helo ([10.0.0.1]) by"),
    ({"client_ip": ""}, "from helo (unknown) by"),
    ({"client_helo": ""}, "from unknown ([10.1.2.3])"),
    ({"protocol": "ESMTP"}, " with ESMTP id"),
    ({"when": dt.datetime(2026, 11, 22, 6, 41, 2)}, "Sun, 22 Nov 2026 06:41:02 +0000"),
    ({"when": dt.datetime(2026, 11, 22, 8, 41, 2, tzinfo=dt.timezone(dt.timedelta(hours=2)))},
     "Sun, 22 Nov 2026 08:41:02 +0200"),
])
def test_received_variants(overrides: dict[str, object], expected: str) -> None:
    text = unfold(trace(**overrides))
    assert expected in text
    if overrides.get("recipient", "x") is None:
        assert " for " not in text


@pytest.mark.parametrize("helo", [
    "evil\r\nX-Injected: yes", "a (by trusted.example.com) b", "x; Mon, 1 Jan 2001 00:00:00 +0000",
    "\\(\\)", "name\twith tab", "ünïcode.example", "a" * 5000])
def test_received_sanitises_helo(helo: str) -> None:
    field = trace(client_helo=helo)
    assert field.isascii()
    text = unfold(field)
    assert "\r" not in text and "\n" not in text
    from_part = text.split(" ([10.1.2.3]) ", 1)[0]
    assert not set(from_part) & set("()\\;\t")
    assert text.count("(") == text.count(")") == 2
    assert text.count(";") == 1
    assert len(from_part) <= len("Received: from ") + 100
    assert all(len(line) <= 998 for line in field.split(b"\r\n"))


def test_received_sanitises_recipient_and_other_fields() -> None:
    text = unfold(trace(recipient="a@b.c>\r\n; evil (x)", hostname="relay (fake)",
                        protocol="ESMTP\r\nS", message_id="ID;\r\n1"))
    assert "for <a@b.c?evil?x>;" not in text  # characters removed, not replaced
    assert "for <a@b.c;" not in text
    assert text.count(";") == 1 and text.count("(") == text.count(")") == 2
    assert "by relay??fake?" in text and "with ESMTPS id ID1" in text


def test_received_lines_are_short_for_normal_input() -> None:
    field = trace(client_ip="2001:db8:1234:5678:9abc:def0:1234:5678",
                  recipient="someone.with.a.long.name@subdomain.example.com")
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert field.endswith(b"+0000\r\n")


@pytest.mark.parametrize(("value", "expected"), [
    ("relay@contoso.com", ("", "relay", "contoso.com")),
    ("<relay@contoso.com>", ("", "relay", "contoso.com")),
    ("CRM System <crm@contoso.com>", ("CRM System", "crm", "contoso.com")),
    ("a.b+tag@mail.contoso.com", ("", "a.b+tag", "mail.contoso.com")),
])
def test_plain_address_values_take_the_shortcut(value: str,
                                                expected: tuple[str, str, str]) -> None:
    """What applications write is read without the email package (the property test in
    test_prop_headers checks that it reads the same); anything else is left to it."""
    from relay.accept.names import plain_address

    plain = plain_address(value)
    assert plain is not None
    assert (plain.display_name, plain.username, plain.domain) == expected


@pytest.mark.parametrize("value", [
    '"CRM" <crm@contoso.com>', "crm@contoso.com (CRM)", "=?utf-8?q?CRM?= <crm@contoso.com>",
    "a@contoso.com, b@contoso.com", "<crm@contoso.com", "Dr. Who <who@contoso.com>",
    "a..b@contoso.com", "crm@contoso..com",
])
def test_other_address_values_go_to_the_email_package(value: str) -> None:
    from relay.accept.names import plain_address

    assert plain_address(value) is None


def test_the_received_date_is_each_messages_own() -> None:
    """The text of the last second is reused only for the same second in the same zone."""
    utc = dt.datetime(2026, 12, 7, 11, 24, 50, 100, tzinfo=dt.UTC)
    berlin = utc.astimezone(dt.timezone(dt.timedelta(hours=1)))
    assert _date(utc) == "Mon, 07 Dec 2026 11:24:50 +0000"
    assert _date(utc.replace(microsecond=999_999)) == "Mon, 07 Dec 2026 11:24:50 +0000"
    assert _date(berlin) == "Mon, 07 Dec 2026 12:24:50 +0100"      # the same instant
    assert _date(utc + dt.timedelta(seconds=1)) == "Mon, 07 Dec 2026 11:24:51 +0000"
    assert _date(utc.replace(tzinfo=None)) == "Mon, 07 Dec 2026 11:24:50 +0000"


@pytest.mark.parametrize(("name", "value"), [
    ("From", "Ann Example <ann@example.com>"), ("Reply-To", "a@example.com, b@example.com"),
    ("Subject", "=?utf-8?q?caf=C3=A9?= menu"), ("Sender", "bad@@example")])
def test_the_header_factory_makes_each_kind_of_field_once_and_reads_as_emails_own(
        name: str, value: str) -> None:
    """relay.accept.names.header_factory keeps the class it makes for a kind of field (the
    email package's makes a new one per header object); what it reads and renders is the
    email package's, to the byte."""
    ours, theirs = header_factory(name, value), email.policy.SMTP.header_factory(name, value)
    assert type(ours) is type(header_factory(name.upper(), value))
    assert type(theirs) is not type(email.policy.SMTP.header_factory(name, value))
    assert (str(ours), [type(d) for d in ours.defects]) == (
        str(theirs), [type(d) for d in theirs.defects])
    assert ours.fold(policy=email.policy.SMTP) == theirs.fold(policy=email.policy.SMTP)
