"""A message's header fields as the programs around the relay read them.

- :func:`parse_header`: the header section of a message (CRLF line ends), parsed;
- :func:`named_addresses`: the addresses its To, Cc (and, asked for, Bcc) fields name.

Microsoft Graph sends to the addresses the header names (relay.deliver.graph, and the
sandbox's fake of it), and ``sendmail -t`` takes its recipients from there
(relay.cli.sendmail): one reading for all three. The relay's own header work, which must
hold against hostile input and keep bytes as they are, is relay.accept.headers.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32


def parse_header(data: bytes) -> Message:
    """The header fields of ``data``, a whole message or its header section."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")


def named_addresses(header: Message, fields: tuple[str, ...] = ("To", "Cc")) -> list[str]:
    """The addresses ``fields`` name, in order, without display names or groups."""
    values = [str(v) for field in fields for v in header.get_all(field, [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]
