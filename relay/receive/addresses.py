"""Addresses as the receiving side sees them: the client's, and the envelope's.

- :func:`client_address`, :func:`is_loopback`, :func:`in_networks`: the client's IP as
  text (IPv4-mapped IPv6 unwrapped), whether it is this machine, whether it is in a list;
- :func:`address_problem`, :func:`sender_problem`: why an envelope recipient or sender
  cannot be used (the reply that says so), or None;
- :func:`loggable_user`, :func:`json_user`: a user name (or none) as every log line spells
  it, in text and in JSON;
- :data:`NULL_SENDER`: the null reverse-path, as carried in ``envelope.mail_from``.

Pure functions: everything a client sent is checked here before it reaches a log line, a
header, the spool or the upstream's MAIL FROM.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any

from relay.core.net import parse_ip
from relay.core.reply import Reply
from relay.receive import replies

# The null reverse-path of bounces and receipts, as carried in envelope.mail_from.
NULL_SENDER = "<>"

_MAX_ADDRESS = 254          # RFC 5321 4.5.3.1.3 path length, less the angle brackets
_MAX_LOCAL_PART = 64
# Longest user name written to the log; the rest is cut so a client cannot flood it.
_MAX_LOGGED_USER = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: Any) -> str:
    """The client's IP as text, with IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    return _address_text(str(host))


@functools.lru_cache(maxsize=1024)
def _address_text(host: str) -> str:
    """Kept: a connection's first step, and the same few clients make most of them."""
    ip = parse_ip(host)
    if ip is None:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_loopback(ip: str) -> bool:
    addr = parse_ip(ip)
    return addr is not None and addr.is_loopback


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    addr = parse_ip(ip)
    return addr is not None and any(addr in net for net in networks)


def _encoding_problem(address: str, smtputf8: bool) -> Reply | None:
    """Why ``address``'s characters cannot travel as they are (RFC 6531), or None."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return replies.ADDRESS_NOT_UTF8
    if not address.isascii() and not smtputf8:
        return replies.ADDRESS_NEEDS_SMTPUTF8
    return None


def address_problem(address: str, smtputf8: bool) -> Reply | None:
    """Why ``address`` cannot be a recipient, or None if it can (a mailbox@domain)."""
    if (problem := _encoding_problem(address, smtputf8)) is not None:
        return problem
    raw = address.encode("utf-8")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return replies.ADDRESS_NOT_NAME_AT_DOMAIN
    if len(raw) > _MAX_ADDRESS or len(local.encode("utf-8")) > _MAX_LOCAL_PART:
        return replies.ADDRESS_TOO_LONG
    if any(ord(ch) < 32 or ch == "\x7f" for ch in address):
        return replies.ADDRESS_CONTROL
    quoted = len(local) >= 2 and local.startswith('"') and local.endswith('"')
    if any(ch.isspace() for ch in (domain if quoted else address)):
        return replies.ADDRESS_SPACES
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1].removeprefix("IPv6:")
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return replies.ADDRESS_BAD_LITERAL
        return None
    for label in domain.rstrip(".").split("."):
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return replies.ADDRESS_BAD_DOMAIN
        if not all(ch.isalnum() or ch == "-" for ch in label):
            return replies.ADDRESS_BAD_DOMAIN
    return None


def sender_problem(address: str, smtputf8: bool) -> Reply | None:
    """Why ``address`` cannot be an envelope sender, or None.

    Looser than :func:`address_problem`: cron and other local programs send unqualified
    senders (``root``), and the null sender ``<>`` is a sender too. But a sender travels
    on into the upstream's MAIL FROM, the log and any delivery report, so nothing in it
    may break a line or a field (a CR there once made every report fail).
    """
    if address == NULL_SENDER:
        return None
    if (problem := _encoding_problem(address, smtputf8)) is not None:
        return problem
    if any(ord(ch) < 32 or ch == "\x7f" for ch in address):
        return replies.SENDER_CONTROL
    if len(address.encode("utf-8")) > _MAX_ADDRESS:
        return replies.SENDER_TOO_LONG
    if not address or any(ch.isspace() for ch in address.rpartition("@")[2]):
        return replies.SENDER_INVALID
    return None


def path(address: str) -> str:
    """An envelope address for a log line: ``<a@b>``, or ``<>`` for the null sender."""
    return NULL_SENDER if address == NULL_SENDER else f"<{address}>"


def json_user(user: str | bytes | None) -> str | None:
    """A user name as a JSON log field: the name of :func:`loggable_user` without its
    quotes, or null where that says ``-``."""
    if not user:
        return None
    if isinstance(user, bytes):
        user = user.decode("utf-8", errors="backslashreplace")
    return user[:_MAX_LOGGED_USER]


def loggable_user(user: str | bytes | None) -> str:
    """A user name as it appears in every text log line, ``user=`` this.

    Quoted and escaped, since a client chose it (a failed login's name may hold anything,
    ``client=`` included), and cut if very long; ``-`` when there is none: the client did
    not log in, or gave no name. One spelling, so that one pattern finds them all.
    """
    if not user:
        return "-"
    if isinstance(user, bytes):
        user = user.decode("utf-8", errors="backslashreplace")
    text = repr(user[:_MAX_LOGGED_USER])
    return text + "..." if len(user) > _MAX_LOGGED_USER else text
