"""The trace fields the relay adds: ``Received`` to every message it accepts (RFC 5321
4.4), and the text of the sender policy's (relay.accept.policy).

- :func:`received_header`: the ``Received:`` field, CRLF-terminated and folded at 78
  columns, with everything the client chose cleaned so it cannot end the field, open or
  close a comment, or fake the ``;`` before the date;
- :func:`local_received`: the same field for a message the relay makes itself;
- :func:`text_field`: a field of plain text (``X-Original-Sender: <text>``) that every
  reader reads back as exactly that text, whatever the text holds.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import ipaddress
import re
from collections.abc import Iterable
from email.header import Header

from relay.core.net import parse_ip
from relay.core.text import one_line, truncate

_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;<>\"]")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PATH_UNSAFE = re.compile(r"[^\x21-\x7e]|[<>()\\;]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_HELO = 100
_MAX_PATH = 256


@functools.lru_cache(maxsize=1024)
def _ip_literal(client_ip: str) -> str:
    """The address literal of the ``from`` clause; kept, as most mail comes from a few
    clients and formatting an address costs more than the lookup."""
    ip = parse_ip(client_ip)
    if ip is None:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 client on a dual-stack socket
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def _fold_tokens(head: str, tokens: Iterable[str], limit: int = 78) -> str:
    lines = [head]
    for token in tokens:
        if len(lines[-1]) + 1 + len(token) > limit and lines[-1].strip() not in ("", head):
            lines.append("\t" + token)
        else:
            lines[-1] += " " + token
    return "\r\n".join(lines) + "\r\n"


def received_header(*, client_helo: str, client_ip: str, hostname: str, protocol: str,
                    message_id: str, recipient: str | None, when: dt.datetime) -> bytes:
    """An RFC 5321 section 4.4 trace field, CRLF-terminated and folded at 78 columns.

    Everything the client chose (HELO name, recipient) is cleaned so it cannot end the
    field, open or close a comment, or fake the ``;`` before the date. ``recipient`` is
    only given for single-recipient messages: a ``for`` clause listing every envelope
    recipient would reveal Bcc recipients to all of them.
    """
    helo = truncate(_HELO_UNSAFE.sub("?", client_helo), _MAX_HELO) or "unknown"
    proto = _TOKEN_UNSAFE.sub("", protocol) or "SMTP"
    tokens = [f"from {helo}", f"({_ip_literal(client_ip)})", *_by(hostname),
              f"with {proto}", _id(message_id)]
    if recipient is not None:
        rcpt = truncate(_PATH_UNSAFE.sub("", recipient), _MAX_PATH)
        tokens.append(f"for <{rcpt}>;")
    else:
        tokens[-1] += ";"
    return _field([*tokens, _date(when)])


def local_received(*, hostname: str, message_id: str, when: dt.datetime) -> bytes:
    """The trace field of a message the relay makes itself (a delivery report, a test
    message), as Postfix writes one for its own: ``Received: by HOST (smtp-oauth-relay)
    id ID; DATE``, with no ``from``, so that it too carries its queue id."""
    return _field([*_by(hostname), _id(message_id) + ";", _date(when)])


def _by(hostname: str) -> list[str]:
    host = truncate(_HELO_UNSAFE.sub("?", hostname), _MAX_HELO) or "localhost"
    return [f"by {host}", "(smtp-oauth-relay)"]


def _id(message_id: str) -> str:
    return f"id {_TOKEN_UNSAFE.sub('', message_id) or 'unknown'}"


_last_date: tuple[tuple[dt.datetime, dt.timedelta | None], str] | None = None


def _date(when: dt.datetime) -> str:
    """RFC 5322's date of ``when`` (UTC if it has no zone); the last second's text is
    kept, since the messages of a second share it (format_datetime cost 0.7 % of the
    relay's CPU)."""
    global _last_date
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    key = (when.replace(microsecond=0), when.utcoffset())
    cached = _last_date
    if cached is None or cached[0] != key:
        cached = _last_date = (key, email.utils.format_datetime(key[0]))
    return cached[1]


def _field(tokens: list[str]) -> bytes:
    return _fold_tokens("Received:", tokens).encode("ascii", "replace")


def text_field(name: str, text: str, eol: bytes = b"\r\n") -> bytes:
    """``name: text`` as one field, folded at 78 columns, lines ending in ``eol``.

    Control characters become spaces, so the text cannot end the field. Text with an
    encoded word (``=?utf-8?q?...?=``, which a reader decodes, to a line break too) or
    with characters beyond ASCII is written as encoded words whole: a reader decodes them
    once, and gets the text back as it was, never a field of its own.
    """
    text = one_line(_CONTROL.sub(" ", text))
    if not text.isascii() or "=?" in text:
        words = Header(text, "utf-8", header_name=name).encode(linesep="\r\n")
        field = f"{name}: {words}\r\n"
    else:
        # Folded before a space, which unfolding keeps: the text reads back unchanged.
        field = _fold_tokens(f"{name}:", text.split(" ")).replace("\r\n\t", "\r\n ")
    return field.encode("ascii").replace(b"\r\n", eol)
