"""DATA as it arrives: one line model, bounded memory, the header section apart.

aiosmtpd would collect the whole message in memory (and copy it twice) before its
handler sees a byte; at 35 MB per message and a hundred connections that is gigabytes.
:class:`DataReader` reads the client's lines instead and hands them on in two parts: the
header section, whole and bounded (the sender policy needs it), then the body in chunks,
which the caller writes to the spool. Memory per message is the header section and one
chunk, and :class:`MemoryBudget` caps the sum over all connections.

The line model (see relay.core.message): every line break becomes CRLF, a bare LF (what
legacy Unix programs send) and a bare CR alike, because that is how aiosmtplib and
Exchange read them; the header section is split by :func:`relay.accept.headers.line_kind` on
those canonical lines. So a header hidden behind a bare CR (``Subject: x\\rFrom: ceo@...``)
is a header to the sender policy exactly as it will be one at Exchange. Transparency dots
are removed from every line start. Only the standard ``CRLF . CRLF`` ends the data: a dot
line with a bare LF next to it (the "SMTP smuggling" forms) is content, not an end, and
goes upstream dot-stuffed, so no one downstream can read it as an end either.

What is refused, with the reply given after the end of the data (RFC 5321 4.2.5): a line
longer than ``max_line_length``, more than ``max_message_size`` bytes, a header section
over ``max_header_size`` bytes or ``max_header_fields`` fields, more than
``max_received_headers`` Received fields (a mail loop), and a NUL byte anywhere (no
standard allows it outside BINARYMIME, and parsers disagree on what follows one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from relay.accept.headers import LineKind, field_name, line_kind
from relay.config import Server
from relay.core.message import CHUNK, LINE_BREAK
from relay.core.reply import Reply
from relay.receive import replies

__all__ = ["DataReader", "Limits", "MemoryBudget", "Received", "Sink"]



@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_line_length: int
    max_header_size: int
    max_header_fields: int
    max_received_headers: int

    @classmethod
    def of(cls, server: Server) -> Limits:
        return cls(server.max_message_size, server.max_line_length, server.max_header_size,
                   server.max_header_fields, server.max_received_headers)

    @property
    def reservation(self) -> int:
        """Memory one message may hold at once: its header section and a chunk of body
        (plus the line that takes the chunk over its size)."""
        return self.max_header_size + CHUNK + self.max_line_length


class Sink(Protocol):
    """Where the message goes: the caller's spool writer, behind its policy."""

    async def headers(self, section: bytes) -> None:
        """The whole header section, canonical; called once, before any body."""

    async def body(self, data: bytes) -> None:
        """The next part of the body (from its first line, the empty one if any)."""


@dataclass
class Received:
    """How the DATA went. ``refusal``: the reply that refuses the message, if one does;
    ``tail``: the last body bytes, not yet handed to the sink (so that the caller can
    write them and make the file durable in one step)."""

    size: int = 0                # bytes as the client sent them (the SIZE limit counts these)
    eight_bit: bool = False
    refusal: Reply | None = None
    tail: bytes = b""


class MemoryBudget:
    """Bytes of message data the relay holds in memory at once, over all connections.

    Each DATA takes its share before the ``354`` and gives it back when it ends; when the
    budget is spent, a new DATA waits (FIFO) for a share, and is refused with a 452 if
    none comes in time. So memory stays bounded whatever the number of connections.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def update(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    @contextlib.asynccontextmanager
    async def share(self, amount: int, *, wait: float) -> AsyncIterator[bool]:
        """Hold ``amount`` bytes of the budget; yields False if none came within ``wait``."""
        amount = min(amount, self.limit)
        got = await self._take(amount, wait)
        try:
            yield got
        finally:
            if got:
                self.used -= amount
                self._wake()

    async def _take(self, amount: int, wait: float) -> bool:
        if not self._waiters and self.used + amount <= self.limit:
            self.used += amount
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            # Granted in the very moment the wait ran out: it is ours, keep it.
            return self._leave(entry)
        except BaseException:
            if self._leave(entry):
                self.used -= amount
                self._wake()
            raise
        return True

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> bool:
        """Stop waiting; True if the share had been granted already."""
        if entry in self._waiters:
            self._waiters.remove(entry)
        waiter = entry[1]
        granted = waiter.done() and not waiter.cancelled()
        if not waiter.done():
            waiter.cancel()
        return granted

    def _wake(self) -> None:
        while self._waiters:
            amount, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.pop(0)
                continue
            if self.used + amount > self.limit:
                return
            self.used += amount
            self._waiters.pop(0)
            waiter.set_result(None)


class DataReader:
    """Reads one message's DATA from an aiosmtpd session's stream (see the module
    docstring); the stream's limit must be ``max_line_length`` + 1 or more."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._received = Received()
        self._head: list[bytes] | None = []     # None once the header section is over
        self._head_size = 0
        self._fields = 0
        self._hops = 0
        self._batch: list[bytes] = []
        self._batch_size = 0

    async def read(self, reader: asyncio.StreamReader, sink: Sink) -> Received:
        """Read up to and including the end-of-data line; never raises for content."""
        result = self._received
        limits = self.limits
        after_crlf = True           # the previous line ended in CRLF (or DATA's own)
        in_line = False             # the last read ended inside an over-long line
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # Longer than the stream's limit: drop it in pieces (nothing of an
                # over-long line can end the data), and refuse the message at the end.
                line = await reader.read(exc.consumed)
                result.size += len(line)
                self._refuse(replies.line_too_long(limits.max_line_length))
                # A piece may stop between the line's CR and its LF.
                in_line, after_crlf = True, line.endswith(b"\r")
                continue
            except asyncio.IncompleteReadError as exc:
                # The client closed the connection in the middle of DATA.
                raise ConnectionResetError("connection closed during DATA") from exc
            if in_line:
                # The rest of an over-long line.
                result.size += len(line)
                in_line = False
                after_crlf = line.endswith(b"\r\n") or (line == b"\n" and after_crlf)
                continue
            if after_crlf and line == b".\r\n":
                break
            after_crlf = line.endswith(b"\r\n")
            result.size += len(line)
            if result.refusal is not None:
                continue            # draining: the message is refused already
            if result.size > limits.max_message_size:
                self._refuse(replies.TOO_BIG)
                continue
            if len(line) > limits.max_line_length + 2:
                self._refuse(replies.line_too_long(limits.max_line_length))
                continue
            if line[:1] == b"." and line not in (b".\r\n", b".\n"):
                line = line[1:]     # transparency (RFC 5321 4.5.2)
            if not line.endswith(b"\r\n") or line.count(b"\r") != 1:
                line = LINE_BREAK.sub(b"\r\n", line)
            if self._head is None:
                # A body line, as nearly all are: kept here rather than in a coroutine
                # call per line.
                self._batch.append(line)
                self._batch_size += len(line)
                if self._batch_size >= CHUNK:
                    await self._flush(sink)
            else:
                await self._take(self._head, line, sink)
        if result.refusal is None:
            if self._head is not None:
                await self._end_of_headers(sink)    # a message without a body
            tail = b"".join(self._batch)
            self._check(tail)
            result.tail = tail if result.refusal is None else b""
        self._batch, self._head = [], None
        return result

    # --- one canonical line ---------------------------------------------------------------

    async def _take(self, head: list[bytes], line: bytes, sink: Sink) -> None:
        """A line of the header section ``head`` (a bare CR may have made it several
        lines), or the empty line that ends it."""
        start = 0
        while start < len(line):
            end = line.index(b"\r\n", start) + 2
            kind = line_kind(line, start, in_field=self._fields > 0)
            if kind is LineKind.END:
                await self._end_of_headers(sink)
                rest = line[start:]
                if self._received.refusal is None:
                    self._batch.append(rest)
                    self._batch_size += len(rest)
                return
            piece = line[start:end]
            if kind is LineKind.FIELD:
                self._fields += 1
                if field_name(piece).lower() == "received":
                    self._hops += 1
            head.append(piece)
            self._head_size += len(piece)
            start = end
        self._limit_headers()

    def _limit_headers(self) -> None:
        limits = self.limits
        if self._head_size > limits.max_header_size:
            self._refuse(Reply(552, f"5.3.4 Header section too large (limit "
                                    f"{limits.max_header_size} octets)"))
        elif self._fields > limits.max_header_fields:
            self._refuse(Reply(552, f"5.3.4 Too many header fields (limit "
                                    f"{limits.max_header_fields})"))
        elif self._hops > limits.max_received_headers:
            self._refuse(Reply(554, f"5.4.6 Too many hops ({self._hops} Received header "
                                    "fields): a mail loop?"))

    async def _end_of_headers(self, sink: Sink) -> None:
        assert self._head is not None
        section = b"".join(self._head)
        self._head = None
        self._check(section)
        if self._received.refusal is None:
            await sink.headers(section)

    async def _flush(self, sink: Sink) -> None:
        data = b"".join(self._batch)
        self._batch, self._batch_size = [], 0
        self._check(data)
        if self._received.refusal is None:
            await sink.body(data)

    def _check(self, data: bytes) -> None:
        if b"\0" in data:
            self._refuse(replies.HAS_NUL)
        if not data.isascii():
            self._received.eight_bit = True

    def _refuse(self, reply: Reply) -> None:
        """Refuse the message (the first reason stands); what is held is dropped now."""
        if self._received.refusal is None:
            self._received.refusal = reply
        self._batch, self._batch_size = [], 0
        if self._head is not None:
            self._head = []
