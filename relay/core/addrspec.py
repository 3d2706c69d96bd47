"""``local@domain`` as nearly every client writes it, recognised without a parser.

- :data:`ATEXT`, :data:`PLAIN_LOCAL`, :data:`PLAIN_DOMAIN`: the pieces, as regular
  expression text: a dot-atom local part and a domain of plain labels (RFC 5321 4.1.2);
- :func:`is_plain`: whether a whole address is of that form.

An address of this form means the same to every reader: aiosmtpd's reading of MAIL FROM,
the email package's of a header, aiosmtplib's quoting of a command. So each stage takes it
as it is and keeps the libraries' parsers (a class and a token tree per address) for the
rest: quotes, comments, literals, UTF-8. The tests compare each shortcut with the parser
it stands in for.
"""

from __future__ import annotations

import re

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_LOCAL = rf"{ATEXT}(?:\.{ATEXT})*"
PLAIN_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN = re.compile(rf"{PLAIN_LOCAL}@{PLAIN_DOMAIN}")


def is_plain(address: str) -> bool:
    """True if ``address`` is a plain ``local@domain`` and nothing else."""
    return _PLAIN.fullmatch(address) is not None
