"""Hypothesis strategies and oracles shared by the property-based tests (test_prop_*.py).

The strategies build what hostile or merely broken clients send: header fields with
arbitrary folding and line breaks, quoted names holding ``@`` and commas, encoded words,
groups, several sender fields, 8-bit bytes that are UTF-8 and bytes that are not; message
data with every mix of CR, LF and CRLF, dots, NUL and control bytes.

The oracles judge the result the way the receiving end would: the bytes that go upstream
are parsed with the ``email`` package, an implementation the relay does not share its
header splitting with, and every sender field it finds must be one the profile permits.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import re
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st

from relay.accept.headers import SENDER_FIELDS, RawMessage
from relay.accept.policy import is_permitted
from relay.config import Profile, parse_config
from relay.core.message import LINE_BREAK

MAILBOX = "relay@contoso.com"
SEND_AS = ["*@alerts.contoso.com", "noreply@contoso.com"]
POLICIES = ("keep", "rewrite", "reject")

_CONFIG = parse_config({
    "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                             "client_secret": {"value": "x"}}},
    "profiles": {name: {"mailbox": MAILBOX, "credential": "main", "sender_policy": name,
                        "send_as": SEND_AS} for name in POLICIES},
}, check_secrets=False, check_files=False)
PROFILES: dict[str, Profile] = dict(_CONFIG.profiles)


def scaled(fraction: float, minimum: int = 5) -> settings:
    """The loaded profile's example count times ``fraction``: for properties whose
    examples cost real sockets, so that the bounded run stays quick and ``make fuzz``
    still tries many."""
    return settings(max_examples=max(minimum, int(settings().max_examples * fraction)))


# --- addresses and header values --------------------------------------------------------

PERMITTED = ["relay@contoso.com", "Relay@Contoso.COM", "cron@alerts.contoso.com",
             "noreply@contoso.com", "NoReply@CONTOSO.com"]
NOT_PERMITTED = ["ceo@contoso.com", "evil@example.com", "relay@contoso.com.evil.example",
                 "noreply@contoso.co", "x@alerts.contoso.com.evil", "relay@[127.0.0.1]",
                 '"relay@contoso.com"@evil.example', "relay", "@contoso.com", "relay@",
                 "zoë@contoso.com", "a@b@contoso.com", "relay@contoso.com@evil.example"]

_ATOM = st.text(alphabet="abcxyz019.-_+", min_size=1, max_size=8)
addr_specs = st.one_of(
    st.sampled_from(PERMITTED),           # as likely as the rest, so that reject passes too
    st.sampled_from(NOT_PERMITTED),
    st.builds(lambda local, domain: f"{local}@{domain}", _ATOM,
              st.sampled_from(["contoso.com", "alerts.contoso.com", "example.com", "x"])),
)

# Characters that mean something in an address list, plus blanks, 8-bit text and controls.
_NAME_CHARS = ' abcXYZ@,;:.<>"()\\\'\t=?é日\u00a0\x01\x7f'
_plain_names = st.text(alphabet=_NAME_CHARS, max_size=16)
_quoted_names = st.builds(lambda s: '"' + s + '"',
                          st.text(alphabet=' abc@,;:<>.\\"é', max_size=16))


def _encoded(text: str, b: bool) -> str:
    import base64
    import quopri

    raw = text.encode("utf-8")
    if b:
        return "=?utf-8?b?" + base64.b64encode(raw).decode() + "?="
    return "=?utf-8?q?" + quopri.encodestring(raw, header=True).decode() + "?="


_encoded_names = st.builds(
    _encoded,
    st.one_of(st.sampled_from(["ceo@contoso.com", "<ceo@contoso.com>",
                               "Ceo, Big <ceo@contoso.com>", "a\r\nFrom: ceo@contoso.com"]),
              st.text(max_size=10)),
    st.booleans())
display_names = st.one_of(st.just(""), _plain_names, _quoted_names, _encoded_names)

mailboxes = st.one_of(
    addr_specs,
    st.builds(lambda name, spec: f"{name} <{spec}>", display_names, addr_specs),
    st.builds(lambda spec, comment: f"{spec} ({comment})", addr_specs, _plain_names),
    st.builds(lambda name, spec: f"{name}<{spec}>", display_names, addr_specs),
)
groups = st.builds(lambda name, members: f"{name}: {', '.join(members)};",
                   st.sampled_from(["undisclosed-recipients", "Team", "a@b"]),
                   st.lists(mailboxes, max_size=3))
address_lists = st.lists(st.one_of(mailboxes, groups), min_size=1, max_size=3).map(
    lambda parts: ", ".join(parts))
_junk = st.text(alphabet='<>@,;:"()\\ \t=?.abcXYZé\x00[]\r\n', max_size=30)


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """A field value as bytes: an address list or junk, as UTF-8 or a legacy charset,
    with folds and bare line breaks at arbitrary places."""
    text = draw(st.one_of(address_lists, address_lists, _junk))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "latin-1"]))
    raw = text.encode(encoding, "replace")
    if draw(st.booleans()):
        raw += draw(st.binary(max_size=4))                  # stray bytes, invalid UTF-8
    # Folds (a break then a blank) and breaks with no blank after them (which make the
    # rest of the value a line of its own, a field to some readers).
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        brk = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
        blank = draw(st.sampled_from([b" ", b"\t", b"", b"  "]))
        raw = raw[:at] + brk + blank + raw[at:]
    return raw


FIELD_NAMES = ["From", "Sender", "Resent-From", "Resent-Sender", "from", "SENDER",
               "resent-from", "RESENT-SENDER", "To", "Cc", "Reply-To", "Subject",
               "Received", "Message-ID", "X-Mailer", "Content-Type"]


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    """One header line (with its folds), without its final line break."""
    kind = draw(st.sampled_from(["field"] * 8 + ["obsolete", "nameless", "mbox", "text"]))
    if kind == "mbox":             # an mbox separator where a field belongs
        return b"From " + draw(st.sampled_from([b"app@example.com Mon Jan  1 00:00:00 2024",
                                                 b"", b"x"]))
    if kind == "text":
        return draw(st.binary(max_size=12)).replace(b"\n", b"").replace(b"\r", b"")
    value = draw(header_values())
    if kind == "nameless":
        return b":" + value
    name = draw(st.sampled_from(FIELD_NAMES)).encode()
    if kind == "obsolete":        # RFC 5322 4.5.x: blanks between the name and the colon
        return name + draw(st.sampled_from([b" ", b"\t", b"  "])) + b":" + value
    return name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value


eols = st.sampled_from([b"\r\n"] * 6 + [b"\n"] * 2 + [b"\r"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A whole message as an application might send it (before SMTP's dot-stuffing)."""
    lines = draw(st.lists(header_lines(), max_size=8))
    out = b"".join(line + draw(eols) for line in lines)
    separator = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
    body = draw(st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"From: ceo@contoso.com\r\n\r\nhi\r\n", b".\r\n..\r\n.x\n.\n",
                         "Grüße\r\n".encode()]),
    ))
    return out + separator + body


# --- the wire: dot-stuffing and the relay's line model ------------------------------------

def with_final_crlf(data: bytes) -> bytes:
    """What smtplib sends: the data, with a CRLF added unless it ends with one."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def stuff(data: bytes) -> bytes:
    """``data`` (ending with CRLF) as DATA on the wire, without its end: every line (as
    the relay reads lines: up to LF) that starts with a dot gets one more."""
    lines = data.split(b"\n")
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def canonical(data: bytes) -> bytes:
    """The line model (relay.receive.data): every CR, LF and CRLF becomes CRLF."""
    return LINE_BREAK.sub(b"\r\n", data)


def is_canonical(data: bytes) -> bool:
    """Every line ends CRLF; no bare CR or LF; no NUL."""
    return (data.endswith(b"\r\n") and b"\0" not in data
            and b"\r" not in data.replace(b"\r\n", b"")
            and b"\n" not in data.replace(b"\r\n", b""))


# --- the oracle: what the email package makes of the bytes that go upstream ---------------

_PARSER = email.parser.BytesParser(policy=email.policy.default)
# Where the email package's feed parser reads a header section differently from the relay
# (and from Postfix, whose rule the relay follows), on purpose and on the safe side: the
# relay takes both for fields and applies its policy to them, the email package does not.
# A blank between a field name and its colon (RFC 5322's obsolete syntax) ends the email
# package's header section; a line starting "From " (mbox's separator, but also
# "From : x") is skipped by it as a misplaced envelope line.
_OBSOLETE_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]+:")
_ENVELOPE_LINE = b"From "


@dataclass
class Upstream:
    """The email package's reading of a message, next to the relay's."""

    names: list[str]                   # the fields the email package sees, in order
    relay_names: list[str]             # the fields RawMessage sees, up to the same point
    # addr-specs of each sender field as email reads them; UNPARSABLE for a field whose
    # parsing raised (the email package's header registry does, on some malformed input)
    senders: dict[str, list[str]]
    # False when the email package's header section ended before the relay's did (a field
    # in the obsolete syntax): then it sees fewer fields, and perhaps no From at all.
    complete: bool = True


UNPARSABLE = "(unparsable)"


def read_upstream(data: bytes) -> Upstream:
    """Parse ``data`` as Exchange would be given it."""
    msg = _PARSER.parsebytes(data, headersonly=True)
    names = list(msg.keys())
    relay = RawMessage(data)
    relay_names: list[str] = []
    complete = True
    for field in relay._fields:
        if field.raw.startswith(_ENVELOPE_LINE) or not field.name:
            continue                    # skipped by the email package; no field to either
        if _OBSOLETE_FIELD.match(field.raw):
            complete = False
            break
        relay_names.append(field.name)
    senders: dict[str, list[str]] = {}
    for name in SENDER_FIELDS:
        for raw in _raw_values(msg, name):
            try:
                header = email.policy.default.header_fetch_parse(name, raw)
            except Exception:
                senders.setdefault(name, []).append(UNPARSABLE)
                continue
            senders.setdefault(name, []).extend(a.addr_spec for a in header.addresses)
    return Upstream(names, relay_names, senders, complete)


def _raw_values(msg: email.message.Message, name: str) -> list[str]:
    """The unparsed values of every field called ``name`` (get_all would parse them)."""
    key = name.lower()
    return [v for k, v in msg.raw_items() if k.lower() == key]


def forbidden_senders(profile: Profile, upstream: Upstream) -> list[tuple[str, str]]:
    """Every (field, address) in a sender field that the profile does not permit."""
    return [(name, addr) for name, addrs in upstream.senders.items() for addr in addrs
            if not is_permitted(profile, addr)]
