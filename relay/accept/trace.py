"""The trace field the relay adds to every message it accepts (RFC 5321 4.4).

- :func:`received_header`: the ``Received:`` field, CRLF-terminated and folded at 78
  columns, with everything the client chose cleaned so it cannot end the field, open or
  close a comment, or fake the ``;`` before the date;
- :func:`local_received`: the same field for a message the relay makes itself.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import re
from collections.abc import Iterable

from relay.core.text import truncate

_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;<>\"]")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PATH_UNSAFE = re.compile(r"[^\x21-\x7e]|[<>()\\;]")
_MAX_HELO = 100
_MAX_PATH = 256


def _ip_literal(client_ip: str) -> str:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
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


def _date(when: dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return email.utils.format_datetime(when)


def _field(tokens: list[str]) -> bytes:
    return _fold_tokens("Received:", tokens).encode("ascii", "replace")
