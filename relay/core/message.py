"""What travels between the stages: the message's bytes, the outbound message, results.

- :class:`Content`: a message's bytes, in memory or in a spool file, read in chunks;
- :func:`canonical`, :data:`LINE_BREAK`, :data:`CHUNK`: the line model and the I/O size;
- :class:`Envelope`: one message's SMTP envelope and where it came from, the part that the
  spool's record of a message (relay.spool.records.Entry) and :class:`Outbound` share;
- :class:`Outbound`: one message ready for delivery through one mailbox profile;
- :class:`DeliveryResult`: what one attempt did, per recipient;
- :func:`new_message_id`: the relay's queue id.

These types know nothing of aiosmtpd or aiosmtplib, so the receiving side, the delivery
step and the spool can all pass them around and store them.

The line model lives here too, because every stage must agree on it: a message's bytes are
*canonical* once accepted - every line ends in CRLF, a bare CR and a bare LF each count as a
line break (that is how the upstream reads them, and how aiosmtplib would send them) - so
that what the sender policy inspects is exactly what Exchange will parse.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets as _random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from relay.core import diskio
from relay.core.reply import Reply

# A line break as SMTP peers read one: CRLF, or a bare LF, or a CR not followed by LF.
LINE_BREAK = re.compile(rb"\r\n|\n|\r(?!\n)")
# Read and write size for message bytes on disk and on the wire: large enough that a 30 MB
# message takes a hundred or so steps, small enough that many at once stay cheap.
CHUNK = 256 * 1024
# A message up to this size keeps a copy of its bytes in memory from its arrival to its
# first delivery attempt (see Content): at most the queue's window of them at once.
KEEP_SMALL = 64 * 1024


def canonical(data: bytes) -> bytes:
    """``data`` with every line break made CRLF and a final CRLF (see the module docstring)."""
    data = LINE_BREAK.sub(b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def new_message_id() -> str:
    """A short, unique, log-friendly id for one message (like Postfix's queue id)."""
    return _random.token_hex(6).upper()


class Content:
    """A message's bytes: in memory (short messages the relay makes itself) or in a file
    of the spool, read a chunk at a time so that a large message never sits in memory whole.

    A spool file may come with a ``copy`` of its bytes, which the receiving side keeps when
    the message is small (at most :data:`KEEP_SMALL`): the delivery that follows at once
    then sends from memory instead of reading back what it has just written. The copy is
    only ever the file's bytes; the file stays the truth, and a Content read back from
    the spool later has none.

    The bytes are canonical (see the module docstring) and immutable once accepted.
    """

    __slots__ = ("_copy", "_data", "path", "size")

    def __init__(self, *, data: bytes | None = None, path: Path | None = None,
                 size: int = 0, copy: bytes | None = None) -> None:
        if (data is None) == (path is None):
            raise ValueError("give exactly one of data and path")
        if copy is not None and (path is None or len(copy) != size):
            raise ValueError("a copy goes with a file, and has its size")
        self._data = data
        self._copy = copy
        self.path = path
        self.size = len(data) if data is not None else size

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        return cls(data=canonical(data))

    @classmethod
    def from_file(cls, path: Path, size: int, copy: bytes | None = None) -> Content:
        return cls(path=path, size=size, copy=copy)

    def moved(self, path: Path) -> Content:
        """The same bytes, now in the file at ``path`` (placed there by the spool); what
        was held in memory is kept as the file's copy if it is small."""
        held = self._data if self._data is not None else self._copy
        return Content(path=path, size=self.size,
                       copy=held if held is not None and self.size <= KEEP_SMALL else None)

    @property
    def in_memory(self) -> bytes | None:
        """The bytes, if they are held in memory (None for a spool file)."""
        return self._data

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"Content({where}, {self.size} bytes)"

    async def chunks(self, size: int = CHUNK) -> AsyncGenerator[bytes, None]:
        """The bytes, ``size`` at a time; file reads happen on a disk thread."""
        held = self._data if self._data is not None else self._copy
        if held is not None:
            for start in range(0, len(held), size):
                yield held[start:start + size]
            return
        assert self.path is not None
        if self.size <= size:
            # The usual case: the whole message in one step of the disk thread.
            if data := await diskio.run(self.path.read_bytes):
                yield data
            return
        fd = await diskio.run(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := await diskio.run(os.read, fd, size):
                yield chunk
        finally:
            os.close(fd)

    async def read_all(self) -> bytes:
        """Every byte, in memory: only for messages known to be small (and for tests)."""
        held = self._data if self._data is not None else self._copy
        if held is not None:
            return held
        assert self.path is not None
        return await diskio.run(self.path.read_bytes)

    def prefix(self, limit: int) -> bytes:
        """The first ``limit`` bytes (for the header section: relay.accept.headers splits it).

        Blocking when the bytes are only in a file: call it from a worker thread.
        """
        held = self._data if self._data is not None else self._copy
        if held is not None:
            return held[:limit]
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read(limit)

    def unlink(self) -> None:
        """Remove the file behind a content that will not be kept (no-op in memory)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@dataclass(kw_only=True)
class Envelope:
    """One message's SMTP envelope and origin, defined once for every record of the message.

    The spool keeps it (with the delivery history) in each message's metadata file, and
    every delivery attempt sends it (with the bytes) as an :class:`Outbound`; a record of
    one kind is made from the other with :meth:`envelope`, so no field is copied by hand.
    """

    id: str
    profile: str
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str] = field(default_factory=list)
    client: str = ""
    user: str | None = None
    # The mailbox the message is sent as, fixed when it is accepted: the sender policy
    # already wrote it into the headers, so a later config change must not alter it.
    mailbox: str | None = None
    # The envelope sender as the client gave it ("<>" for the null sender), when the
    # sender policy changed ``mail_from``: delivery reports go here, not to the mailbox.
    return_path: str | None = None
    # The From header's address(es) as the client wrote them, when the sender policy
    # replaced the From (relay.accept.policy): with return_path, which application sent it.
    original_from: str | None = None

    def envelope(self) -> dict[str, Any]:
        """The envelope's fields by name (lists copied), to build another record of the
        same message: ``Outbound(**entry.envelope(), content=...)``."""
        return {name: (list(v) if isinstance(v := getattr(self, name), list) else v)
                for name in _ENVELOPE_FIELDS}


# Read once: dataclasses.fields() builds its tuple anew on every call, twice per message.
_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))


@dataclass(kw_only=True)
class Outbound(Envelope):
    """One message ready for delivery through one mailbox profile."""

    content: Content
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
    upstream latency figures leave it out. ``authenticated`` is True when the attempt got
    as far as a session whose login the upstream had accepted (the transaction may still
    have failed): what tells a profile's working login from one that is refused.
    ``retry_after``: how long the upstream asked the whole mailbox to wait, which the
    queue applies to every message of the mailbox, not only this one.
    """

    reply: Reply
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    offered: bool = True
    authenticated: bool = False
    # Seconds the upstream asked this mailbox to send nothing (Graph's Retry-After).
    retry_after: float | None = None
