"""DATA as it arrives: one line model, bounded memory, the header section apart.

aiosmtpd would collect the whole message in memory (and copy it twice) before its
handler sees a byte; at 35 MB per message and a hundred connections that is gigabytes.
:class:`DataReader` reads the stream itself instead (the header section a line at a time,
the body in blocks) and hands the message on in two parts: the header section, whole and
bounded (the sender policy needs it), then the body in chunks, which the caller writes to
the spool. Memory per message is the header section and one chunk, and
:class:`relay.receive.budget.MemoryBudget` caps the sum over all connections.

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
import re
from dataclasses import dataclass
from typing import Protocol

from relay.accept.headers import LineKind, field_name, line_kind
from relay.config import Server
from relay.core.message import CHUNK, LINE_BREAK
from relay.core.reply import Reply
from relay.receive import replies

__all__ = ["DataReader", "Limits", "Received", "Sink"]

# The end of the data: a line of one dot, after a line that ended in CRLF.
_END = b"\r\n.\r\n"
_DOT_LINE = b".\r\n"
# The dot that transparency added to a line (RFC 5321 4.5.2): a line's first, unless the
# line is that dot alone (which is content: the end line is found before).
_STUFFED = re.compile(rb"^\.(?!\r?\n)", re.MULTILINE)
# The most body bytes taken from the stream at once.
_PIECE = 32 * 1024


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


class DataReader:
    """Reads one message's DATA from an aiosmtpd session's stream (see the module
    docstring); the stream's limit must be ``max_line_length`` + 1 or more.

    The header section is read a line at a time, as it must be parsed line by line; the
    body in blocks, up to the end that the stream itself finds (see :meth:`_by_block`).
    A usual block (CRLF line breaks, lines within the limit) is checked and unstuffed at
    once, one with bare line breaks with two substitutions, and anything else line by
    line, all by the same rules: the ways give the same bytes (tests/test_prop_data.py),
    and input made to be costly costs a fraction of what it did when every line was read
    on its own (bench/data_input.py).
    """

    def __init__(self, limits: Limits, *, blocks: bool = True) -> None:
        """``blocks=False`` reads the body a line at a time too: the reference that the
        reading in blocks is tested against."""
        self.limits = limits
        self._blocks = blocks
        self._received = Received()
        self._head: list[bytes] | None = []     # None once the header section is over
        self._head_size = 0
        self._fields = 0
        self._hops = 0
        self._section: bytes | None = None      # the header section, to hand on
        self._batch: list[bytes] = []
        self._batch_size = 0
        # Body bytes held before they go to the sink: below CHUNK, whatever a step adds.
        self._flush_at = CHUNK - _PIECE - limits.max_line_length - 4

    async def read(self, reader: asyncio.StreamReader, sink: Sink) -> Received:
        """Read up to and including the end-of-data line; never raises for content."""
        result = self._received
        try:
            tail = await self._by_line(reader, sink)
            if tail is not None:
                await self._by_block(reader, sink, tail)
        except asyncio.IncompleteReadError as exc:
            # The client closed the connection in the middle of DATA.
            raise ConnectionResetError("connection closed during DATA") from exc
        if result.refusal is None:
            if self._head is not None:
                self._end_of_headers()              # a message without a body
            if self._section is not None:
                await self._hand_on(sink)
            tail = b"".join(self._batch)
            self._check(tail)
            result.tail = tail if result.refusal is None else b""
        self._batch, self._head = [], None
        return result

    async def _by_line(self, reader: asyncio.StreamReader, sink: Sink) -> bytes | None:
        """The header section, a line at a time. Returns None if the end of the data was
        read; otherwise, once the body begins (or the message is refused), the last two
        bytes read, for :meth:`_by_block`."""
        result = self._received
        limits = self.limits
        tail = b"\r\n"              # the last two bytes read (DATA's own CRLF at first)
        in_line = False             # the last read ended inside an over-long line
        while True:
            if self._blocks and (self._head is None or result.refusal is not None):
                return tail
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # Longer than the stream's limit: drop it in pieces (nothing of an
                # over-long line can end the data), and refuse the message at the end.
                line = await reader.read(exc.consumed)
                tail = (tail + line)[-2:]
                result.size += len(line)
                self._refuse(replies.line_too_long(limits.max_line_length))
                in_line = True
                continue
            after_crlf = tail == b"\r\n"
            tail = (tail + line)[-2:]
            if in_line:
                # The rest of an over-long line.
                result.size += len(line)
                in_line = False
                continue
            if after_crlf and line == b".\r\n":
                return None
            self._line(line)
            await self._hand_on(sink)

    async def _by_block(self, reader: asyncio.StreamReader, sink: Sink, tail: bytes) -> None:
        """The rest of the body, a block at a time; ``tail``: the last two bytes read.

        The stream looks for a separator itself and never takes part of one: a read
        stops before it or just after it. What it cannot see is an end sequence that
        began in what was read already: after a CRLF (where the line reads leave off),
        the next line may be the end line. So while the bytes read so far end in a CR or
        a CRLF, the separator is the end line alone (``.`` CRLF), and the CRLF before it
        is looked for in ``tail``; after a line that ends in a dot, the next line's first
        byte tells whether it is the end line. Once the bytes read end otherwise, the
        separator is the whole end sequence, which no read can split, and stays so."""
        result = self._received
        longest = self.limits.max_line_length + 2
        partial = b""               # the start of a line whose end has not come yet
        separator = _DOT_LINE
        while True:
            try:
                piece = await reader.readuntil(separator)
                found = True
            except asyncio.LimitOverrunError as exc:
                # Over the stream's limit with no end in sight: what cannot hold the
                # start of one is taken, a piece at a time.
                piece = await reader.read(min(exc.consumed, _PIECE))
                found = False
            last = found and (separator is _END or piece.endswith(_END)
                              or (len(piece) < len(_END) and (tail + piece).endswith(_END)))
            if last:
                piece = piece[:-3]          # the end line; its CRLF ends the last line
            elif separator is _DOT_LINE:
                if found:
                    # A line that ends in a dot; the next could be the end line: its
                    # first byte tells (the data has not ended, so one comes, and after
                    # a dot at least the CRLF of its line).
                    first = await reader.readexactly(1)
                    if first == b".":
                        first += await reader.readexactly(2)
                    last = first == _DOT_LINE
                    if not last:
                        piece += first
                tail = piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]
                if tail[-1:] != b"\r" and tail != b"\r\n":
                    separator = _END        # nothing read can begin the end any more
            if partial:
                piece, partial = partial + piece, b""
            if result.refusal is not None:
                result.size += len(piece)   # draining: the message is refused already
            else:
                cut = piece.rfind(b"\n") + 1
                if cut < len(piece):
                    piece, partial = piece[:cut], piece[cut:]
                if piece:
                    self._lines(piece)
                if len(partial) > longest:
                    result.size += len(partial)
                    partial = b""
                    self._refuse(replies.line_too_long(self.limits.max_line_length))
            if last:
                return
            await self._hand_on(sink)

    # --- the rules, for a block of whole lines or for one line ----------------------------

    def _lines(self, block: bytes) -> None:
        """Whole body lines: a usual block at once, any other a line at a time."""
        result, limits = self._received, self.limits
        size = result.size + len(block)
        if size <= limits.max_message_size:
            crlf = block.count(b"\n") == block.count(b"\r") == block.count(b"\r\n")
            if crlf and (len(block) <= limits.max_line_length + 2 or max(
                    map(len, block.split(b"\r\n"))) <= limits.max_line_length):
                # The usual block: every line break a CRLF, no line over the limit. Its
                # dots go with a plain replace (a lone dot line after a CRLF would have
                # been the end), the first line's on its own (a lone dot there stays:
                # a bare LF ended the line before, so it is content).
                if block[:1] == b"." and not block.startswith(b".\r\n"):
                    block = block[1:]
                if b"\r\n." in block:
                    block = block.replace(b"\r\n.", b"\r\n")
                self._keep(block, size)
                return
            if not crlf and max(map(len, block.split(b"\n"))) <= limits.max_line_length + 1:
                # Bare LFs or CRs (a Unix program's), no line over the limit: the dots
                # and then the breaks, at once, as line by line would.
                if block[:1] == b"." or b"\n." in block:
                    block = _STUFFED.sub(b"", block)
                self._keep(LINE_BREAK.sub(b"\r\n", block), size)
                return
        start = 0
        while start < len(block):
            end = block.index(b"\n", start) + 1
            self._line(block[start:end])
            start = end

    def _keep(self, block: bytes, size: int) -> None:
        self._received.size = size
        self._batch.append(block)
        self._batch_size += len(block)

    def _line(self, line: bytes) -> None:
        """One line (it ends in LF) of the header section or of the body."""
        result, limits = self._received, self.limits
        result.size += len(line)
        if result.refusal is not None:
            return                  # draining: the message is refused already
        if len(line) > limits.max_line_length + 2:
            self._refuse(replies.line_too_long(limits.max_line_length))
            return
        if result.size > limits.max_message_size:
            self._refuse(replies.TOO_BIG)
            return
        if line[:1] == b"." and line not in (b".\r\n", b".\n"):
            line = line[1:]         # transparency (RFC 5321 4.5.2)
        if not line.endswith(b"\r\n") or line.count(b"\r") != 1:
            line = LINE_BREAK.sub(b"\r\n", line)
        if self._head is None:
            self._batch.append(line)
            self._batch_size += len(line)
        else:
            self._take(self._head, line)

    def _take(self, head: list[bytes], line: bytes) -> None:
        """A line of the header section ``head`` (a bare CR may have made it several
        lines), or the empty line that ends it."""
        start = 0
        while start < len(line):
            end = line.index(b"\r\n", start) + 2
            kind = line_kind(line, start, in_field=self._fields > 0)
            if kind is LineKind.END:
                self._end_of_headers()
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

    def _end_of_headers(self) -> None:
        assert self._head is not None
        section = b"".join(self._head)
        self._head = None
        self._check(section)
        if self._received.refusal is None:
            self._section = section

    # --- handing on ----------------------------------------------------------------------

    async def _hand_on(self, sink: Sink) -> None:
        """The header section once it is whole, then the body in chunks."""
        if self._section is not None:
            section, self._section = self._section, None
            if self._received.refusal is None:
                await sink.headers(section)
        if self._batch_size >= self._flush_at:
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
        self._section = None
        if self._head is not None:
            self._head = []
