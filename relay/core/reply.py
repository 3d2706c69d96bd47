"""SMTP replies as values: what every stage answers, hears and stores.

- :class:`Reply`: a three-digit code and its text (which may start with an enhanced
  status code, RFC 3463), with its class (``ok``/``transient``/``permanent``), a rendering
  for aiosmtpd (:meth:`Reply.as_smtp`) and for one log line (``str``);
- :meth:`Reply.parse`: the reverse of ``str``, for replies kept as text (spool records).

A reply is data, not a string with a convention: the queue decides on it, the spool keeps
it, the client is told it, the log prints it, and all of them mean the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: three-digit code and text (which may start with an enhanced code)."""

    code: int
    text: str

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.text)
        return m.group(0) if m else None

    def as_smtp(self) -> str:
        """Render for aiosmtpd: multi-line replies use ``code-text`` continuation lines."""
        if "\n" not in self.text and "\r" not in self.text and self.text:
            return f"{self.code} {self.text}"       # one line, as nearly every reply is
        lines = [ln for ln in self.text.replace("\r", "").split("\n") if ln] or [""]
        out = [f"{self.code}-{ln}" for ln in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}")
        return "\r\n".join(out)

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"

    @classmethod
    def parse(cls, text: str) -> Reply:
        """A reply from its one-line form (``str(reply)``), as spool records keep them.
        Text without a code (written by something else) becomes a 550 carrying it.
        Whitespace is made single spaces, as ``str`` does, so parse and ``str`` round-trip."""
        line = " ".join(text.split())
        code, _, rest = line.partition(" ")
        if len(code) == 3 and code.isascii() and code.isdigit():
            return cls(int(code), rest)
        return cls(550, line)
