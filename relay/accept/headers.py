"""Byte-exact header editing: change the few fields the policy must, leave every other byte.

Re-serialising a message with the ``email`` package re-folds headers, re-encodes bodies and
normalises line endings, which breaks DKIM signatures and S/MIME, and surprises people who
compare what they sent with what arrived. So the message is split into fields and body at
the byte level, only the fields that are changed are rendered anew (with ``email.policy.SMTP``,
so non-ASCII names get RFC 2047 encoded words and long lines are folded), and everything
else is written back exactly as it came.

Values are still *read* with the standard ``email`` header registry, never with regexes: it
knows folding, quoted display names containing ``@`` or ``,``, encoded words and raw UTF-8
(RFC 6532). Raw bytes are decoded as UTF-8 with ``surrogateescape`` so that nothing is lost.
"""

from __future__ import annotations

import email.errors
import email.utils
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address, BaseHeader
from email.policy import SMTP, SMTPUTF8, EmailPolicy
from typing import Any

from relay.accept.names import header_factory, plain_address, salvage
from relay.accept.trace import text_field
from relay.core.errors import RelayError
from relay.core.text import one_line, truncate

__all__ = [
    "Address",
    "HeaderError",
    "LineKind",
    "ParsedAddresses",
    "RawMessage",
    "line_kind",
]

# A field starts with a name of printable ASCII other than ":", then (obsolete syntax allows
# white space before) the colon.
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Lines that are no field but after which the email package's feed parser goes on reading
# fields: an mbox separator ("From " at a line start), which it skips as a misplaced
# envelope line, and a field without a name (":x"), which it skips as a defect (as it does
# a continuation line before any field). Were the header section to end at them, the
# fields after them would be body to the sender policy and fields to the reader at the
# other end (a forged From behind a "From x" line).
_NAMELESS = re.compile(rb"From |:")
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

# The registry reports these for input it had to guess at; a guessed address must not
# decide who a message is sent as.
_SERIOUS_DEFECTS = (email.errors.InvalidHeaderDefect, email.errors.HeaderMissingRequiredValue)

# The fields that name who a message is from: what Exchange checks Send As against, and
# so what the sender policy reads.
SENDER_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")
# Their total size: the email package's address parser is quadratic in a value's length
# (100 kB of "x " takes it 16 s), and nothing legitimate comes near this.
MAX_SENDER_FIELDS_SIZE = 8192

_POLICIES: dict[tuple[bytes, bool], EmailPolicy[Any]] = {
    (b"\r\n", False): SMTP,
    (b"\n", False): SMTP.clone(linesep="\n"),
    (b"\r\n", True): SMTPUTF8,
    (b"\n", True): SMTPUTF8.clone(linesep="\n"),
}


class LineKind(enum.Enum):
    FIELD = "field"                  # starts a header field
    CONTINUATION = "continuation"    # folds the field before it
    END = "end"                      # the header section is over; this line is the body's


def line_kind(data: bytes, pos: int = 0, *, in_field: bool) -> LineKind:
    """What the line starting at ``pos`` is, for the header section.

    The one rule for where headers end, used by :class:`RawMessage` and by the receiving
    side as a message streams in: an empty line, or the first line that is neither a field
    nor (after a field) a continuation, starts the body - where the email package's parser
    ends the header section, or later (it ends it at a field in the obsolete syntax). A
    line the email package skips without ending the section (see ``_NAMELESS``) is a field
    here, without a name. ``in_field``: a field came before this line.
    """
    end = data.find(b"\n", pos)
    if data.startswith((b"\r\n", b"\n"), pos) and (end < 0 or end - pos <= 2):
        return LineKind.END
    if pos >= len(data):
        return LineKind.END
    if data[pos] in b" \t":
        # Before any field, a continuation of nothing: the email package skips it and
        # reads on (and upstream it continues the Received field put before it).
        return LineKind.CONTINUATION if in_field else LineKind.FIELD
    if _FIELD_START.match(data, pos) or _NAMELESS.match(data, pos):
        return LineKind.FIELD
    return LineKind.END


def field_name(line: bytes) -> str:
    """The name of the field a FIELD line starts (see :func:`line_kind`); empty for the
    lines that are kept in the header section without being a field."""
    m = _FIELD_START.match(line)
    return m.group(1).decode("ascii") if m else ""


class HeaderError(RelayError, ValueError):
    """A header field could not be understood well enough to act on it."""


@dataclass(frozen=True)
class ParsedAddresses:
    """The addresses of one header name; ``salvaged`` when only the fallback could read them."""

    addresses: list[Address]
    salvaged: bool = False


@dataclass
class _Field:
    raw: bytes
    name: str
    parsed: BaseHeader | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.name.lower()


def _detect_eol(data: bytes) -> bytes:
    nl = data.find(b"\n")
    if nl > 0 and data[nl - 1] == 0x0D:
        return b"\r\n"
    if nl >= 0:
        return b"\n"
    return b"\r\n"


def _needs_utf8(header: BaseHeader) -> bool:
    for addr in getattr(header, "addresses", ()):
        if not (addr.username.isascii() and addr.domain.isascii()):
            return True
    return False


class RawMessage:
    """A message as header fields plus an untouched body, editable field by field.

    The header section ends at the first empty line, or at the first line that is neither
    a field nor a continuation (that line and everything after it are kept, verbatim, as
    the body); see :func:`line_kind`.
    """

    def __init__(self, data: bytes) -> None:
        view = memoryview(data)
        self._prepended: list[bytes] = []
        self._fields: list[_Field] = []
        self.changed = False
        pos, size = 0, len(data)
        body_start = size
        separator_end = size
        while pos < size:
            nl = data.find(b"\n", pos)
            end = size if nl < 0 else nl + 1
            kind = line_kind(data, pos, in_field=bool(self._fields))
            if kind is LineKind.CONTINUATION:
                last = self._fields[-1]
                last.raw += data[pos:end]
            elif kind is LineKind.FIELD:
                self._fields.append(_Field(data[pos:end], field_name(data[pos:end])))
            elif data.startswith((b"\r\n", b"\n"), pos) and (end - pos) <= 2:
                body_start, separator_end = pos, end
                break
            else:
                body_start = separator_end = pos
                break
            pos = end
        self.eol = _detect_eol(data)
        self._separator = view[body_start:separator_end]
        self._body = view[separator_end:]

    @classmethod
    def parse(cls, data: bytes) -> RawMessage:
        return cls(data)

    # --- reading ---------------------------------------------------------------------

    def names(self) -> list[str]:
        """Field names in order, as written (for diagnostics and tests)."""
        return [f.name for f in self._fields]

    def __contains__(self, name: str) -> bool:
        key = name.lower()
        return any(f.key == key for f in self._fields)

    def raw_fields(self, name: str) -> list[bytes]:
        key = name.lower()
        return [f.raw for f in self._fields if f.key == key]

    @property
    def body(self) -> bytes:
        return bytes(self._body)

    def header_section(self) -> bytes:
        """The header fields as they stand (for a DSN's text/rfc822-headers part)."""
        return b"".join([*self._prepended, *(f.raw for f in self._fields)])

    def get_all(self, name: str) -> list[BaseHeader]:
        """Every field called ``name``, parsed by the email header registry.

        Raises :class:`HeaderError` when the registry itself fails on a value (it does, on a
        few malformed inputs such as ``From: x@``), so callers deal with one exception type.
        """
        key = name.lower()
        return [self._parsed(f) for f in self._fields if f.key == key]

    @staticmethod
    def _value(f: _Field) -> str:
        text = f.raw.decode("utf-8", "surrogateescape")
        value = text.split(":", 1)[1].lstrip(" \t")
        return _LINE_BREAKS.sub("", value).rstrip(" \t")

    def _parsed(self, f: _Field) -> BaseHeader:
        if f.parsed is None:
            try:
                f.parsed = header_factory(f.name, self._value(f))
            except Exception as exc:  # the registry raises IndexError etc. on odd input
                raise HeaderError(f"{f.name} header cannot be parsed") from exc
        return f.parsed

    def addresses(self, name: str) -> list[Address]:
        """The addresses in every ``name`` field; :class:`HeaderError` if any is unusable."""
        return self.parse_addresses(name).addresses

    def parse_addresses(self, name: str) -> ParsedAddresses:
        """Like :meth:`addresses`, and says whether the lenient fallback had to be used.

        An address list counts as unusable when the registry fails, reports that it had to
        guess, or yields an address without a local part or domain — unless the whole value
        is a single ``name <addr>`` (see ``_NAME_ANGLE_ADDR``).
        """
        out: list[Address] = []
        salvaged = False
        key = name.lower()
        for f in self._fields:
            if f.key != key:
                continue
            value = self._value(f)
            if f.parsed is None and (plain := plain_address(value)) is not None:
                out.append(plain)
                continue
            try:
                header = self._parsed(f)
                problem = self._address_problem(f.name, header)
            except HeaderError as exc:
                problem = str(exc)
                header = None
            if problem is None and header is not None:
                out.extend(header.addresses)  # type: ignore[attr-defined]
                continue
            rescued = salvage(value)
            if rescued is None:
                raise HeaderError(problem)
            out.append(rescued)
            salvaged = True
        return ParsedAddresses(out, salvaged)

    @staticmethod
    def _address_problem(name: str, header: BaseHeader) -> str | None:
        if not hasattr(header, "addresses"):
            return f"{name} is not an address header"
        for defect in header.defects:
            if isinstance(defect, _SERIOUS_DEFECTS):
                return f"{name} header cannot be parsed: {_short(str(defect))}"
        for addr in header.addresses:
            if not addr.username or not addr.domain:
                return f"{name} header has an incomplete address {_short(addr.addr_spec)!r}"
        return None

    def sender_fields_problem(self, max_addresses: int) -> str | None:
        """Why the sender fields are too large to be read safely, or None.

        Checked before any of them is parsed: their total size, and the number of
        addresses (counted by their ``@``, an upper bound) in all of them together.
        """
        fields = [f for f in self._fields
                  if f.key in ("from", "sender", "resent-from", "resent-sender")]
        size = sum(len(f.raw) for f in fields)
        if size > MAX_SENDER_FIELDS_SIZE:
            return (f"sender header fields ({', '.join(SENDER_FIELDS)}) of {size} octets "
                    f"exceed the limit of {MAX_SENDER_FIELDS_SIZE}")
        addresses = sum(f.raw.count(b"@") for f in fields)
        if addresses > max_addresses:
            return (f"sender header fields name {addresses} addresses; the limit is "
                    f"{max_addresses}")
        return None

    def recode_8bit(self) -> int:
        """Make fields whose raw bytes are not UTF-8 into UTF-8; returns how many were.

        UTF-8 in a header is standard (RFC 6532) and kept as it is. Other 8-bit bytes are
        a legacy program's local charset, almost always Windows-1252: such a field is read
        that way and written back as UTF-8, byte for byte otherwise (no parsing, so no
        cost beyond its length), so that Exchange and the sender policy read the same
        characters instead of each guessing.
        """
        recoded = 0
        for i, f in enumerate(self._fields):
            if f.raw.isascii():
                continue
            try:
                f.raw.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
            raw = f.raw.decode("cp1252", "replace").encode("utf-8")
            self._fields[i] = _Field(raw, f.name)
            recoded += 1
        self.changed = self.changed or bool(recoded)
        return recoded

    # --- editing ---------------------------------------------------------------------

    def remove(self, *names: str) -> int:
        """Remove every field called one of ``names``; returns how many there were."""
        keys = {name.lower() for name in names}
        before = len(self._fields)
        self._fields = [f for f in self._fields if f.key not in keys]
        removed = before - len(self._fields)
        self.changed = self.changed or bool(removed)
        return removed

    def set(self, name: str, value: str | Address | Sequence[Address]) -> None:
        """Replace the first ``name`` field in place (others go), or add one at the end."""
        raw = self.render(name, value)
        key = name.lower()
        new = _Field(raw, name)
        fields: list[_Field] = []
        placed = False
        for f in self._fields:
            if f.key != key:
                fields.append(f)
            elif not placed:
                fields.append(new)
                placed = True
        if not placed:
            fields.append(new)
        self._fields = fields
        self.changed = True

    def render(self, name: str, value: str | Address | Sequence[Address]) -> bytes:
        """One field as bytes: folded to 78 columns, in this message's line-ending style."""
        if not _FIELD_NAME.match(name):
            raise ValueError(f"invalid header field name {name!r}")
        if isinstance(value, str):
            return text_field(name, value, self.eol)    # read back as exactly that text
        header = header_factory(name, value)
        utf8 = _needs_utf8(header)
        policy = _POLICIES[(self.eol, utf8)]
        return header.fold(policy=policy).encode("utf-8" if utf8 else "ascii",
                                                 "surrogateescape")

    def prepend(self, raw_field: bytes) -> None:
        """Put an already-rendered field (a trace field) before all others.

        Its line endings are converted to the message's own, so that a CRLF ``Received:``
        does not make an LF-only message mixed.
        """
        lines = _LINE_BREAKS.split(raw_field.decode("utf-8", "surrogateescape").rstrip("\r\n"))
        eol = self.eol.decode("ascii")
        self._prepended.insert(0, (eol.join(lines) + eol).encode("utf-8", "surrogateescape"))
        self.changed = True

    def to_bytes(self) -> bytes:
        parts: list[bytes | memoryview] = list(self._prepended)
        raws = [f.raw for f in self._fields]
        has_more = bool(len(self._separator) or len(self._body))
        for i, raw in enumerate(raws):
            parts.append(raw)
            # Only a field that ended the original data lacks a line end; it needs one
            # once something follows it.
            if not raw.endswith(b"\n") and (i + 1 < len(raws) or has_more):
                parts.append(self.eol)
        parts.append(self._separator)
        parts.append(self._body)
        return b"".join(parts)



def _short(text: str, limit: int = 120) -> str:
    return truncate(one_line(_CONTROL.sub(" ", text)), limit)
