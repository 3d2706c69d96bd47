"""What travels between the stages: an outbound message, SMTP replies, delivery results.

These types know nothing of aiosmtpd or aiosmtplib, so the receiving side, the delivery
step and (later) the spool can all pass them around and store them.
"""

from __future__ import annotations

import re
import secrets as _random
from dataclasses import dataclass, field

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
        lines = [ln for ln in self.text.replace("\r", "").split("\n") if ln] or [""]
        out = [f"{self.code}-{ln}" for ln in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}")
        return "\r\n".join(out)

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"


def new_message_id() -> str:
    """A short, unique, log-friendly id for one message (like Postfix's queue id)."""
    return _random.token_hex(6).upper()


@dataclass
class Outbound:
    """One message ready for delivery through one mailbox profile."""

    id: str
    profile: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    client: str = ""
    user: str | None = None
    # The mailbox the message is sent as, fixed when it is accepted: the sender policy
    # already wrote it into the headers, so a later config change must not alter it.
    mailbox: str | None = None
    # The envelope sender as the client gave it ("<>" for the null sender), when the
    # sender policy changed ``mail_from``: delivery reports go here, not to the mailbox.
    return_path: str | None = None
    # How long the submitting client may wait for the first attempt (listener setting);
    # None: answer as soon as the message is safely spooled.
    synchronous: float | None = None


@dataclass
class DeliveryResult:
    """The outcome of one delivery attempt.

    ``reply`` is the overall answer (what a waiting client is told); ``refused`` holds
    per-recipient rejections, so a partial failure can be handled per recipient.
    ``offered`` is False when the attempt ended before the upstream was asked (no token,
    profile gone): Exchange counted nothing, so neither do the mailbox's limits, and the
    upstream latency figures leave it out.
    """

    reply: Reply
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    offered: bool = True
