"""Display names and addresses read the lenient way, for what devices really send.

- :func:`clean_display_name`: a display name safe to render again (bytes that were not
  UTF-8 read as Windows-1252, control characters removed);
- :func:`salvage`: the address of a single hand-written ``name <addr>`` whose name the
  standard parser cannot take (``Sales @ HQ <sales@example.com>``), or None;
- :func:`plain_address`: the other way round, the address of a plain ``local@domain`` or
  ``Name <local@domain>`` read without the standard parser, which costs more than the
  rest of the header work together;
- :data:`header_factory`: the email package's factory of header objects, the one every
  field the relay parses or renders goes through.

The strict reading is the email package's (:mod:`relay.accept.headers`); this is the one
fallback, for one ``name <addr>`` at most 998 characters long, never for a list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from typing import Any

from relay.core.addrspec import ATEXT, PLAIN_DOMAIN, PLAIN_LOCAL

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class _Factory(HeaderRegistry):
    """The email package's header factory, with each kind of field's class made once.

    HeaderRegistry makes a new class (``type(...)``) for every header object: for every
    field parsed or rendered, twice per message that the sender policy rewrites. Making a
    class costs more than parsing the field, and each one is left to the garbage
    collector. The class depends only on the kind of field, so it is kept."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._classes.get(kind)
        if made is None:
            made = self._classes[kind] = super().__getitem__(name)
        return made


# Typed as the policies' header_factory is: the header classes' own attributes
# (``addresses``, ``defects``) are not on BaseHeader.
header_factory: Callable[[str, Any], Any] = _Factory()

# Last resort for a single ``name <addr>`` whose name has unquoted specials, e.g.
# ``Sales @ HQ <sales@example.com>`` or ``Smith, John <js@example.com>``: the standard parser
# (correctly, by the grammar) takes ``Sales@HQ`` or two addresses from those. Devices send
# them anyway, and the angle brackets make the intended address unambiguous.
# Written so that no two parts can match the same characters: a regex that can (e.g. a lazy
# name followed by optional blanks) backtracks polynomially, and a few thousand blanks in
# a From field would hold the interpreter for minutes.
_NAME_ANGLE_ADDR = re.compile(r"^(?P<name>[^<>]*)<\s*(?P<addr>[^<>\s@]+@[^<>\s@]+)\s*>\s*$")
# The salvage is for one hand-written "name <addr>", never a long value.
_MAX_SALVAGE = 998

def clean_display_name(name: str) -> str:
    """A display name safe to render: bytes that were not UTF-8 decoded, controls removed.

    Legacy senders that put 8-bit bytes in headers without saying which charset almost
    always mean Windows-1252, so undecodable bytes are read that way instead of being
    turned into replacement characters.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "surrogateescape").decode("cp1252", "replace")
    return " ".join(_CONTROL.sub(" ", name).split())


def salvage(value: str) -> Address | None:
    if len(value) > _MAX_SALVAGE:
        return None
    m = _NAME_ANGLE_ADDR.match(value)
    if not m:
        return None
    try:
        addr = header_factory("To", m["addr"])
    except Exception:  # same registry quirks as above
        return None
    if addr.defects or len(addr.addresses) != 1:
        return None
    spec = addr.addresses[0]
    if not spec.username or not spec.domain:
        return None
    name = m["name"].strip()
    if len(name) >= 2 and name[0] == name[-1] == '"' and '"' not in name[1:-1].replace('\\"', ""):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    elif '"' in name:
        return None  # an unbalanced quote: readers disagree on where the name ends
    if "=?" in name:
        # Encoded words may hide any character, CR and LF among them (which is why the
        # registry gave up on this value: no Address may hold them).
        name = clean_display_name(str(header_factory("Subject", name)))
    return Address(display_name=name, username=spec.username, domain=spec.domain)


# An address field as nearly every application writes it: ``local@domain``, ``<local@domain>``
# or ``Name Words <local@domain>``, with no quotes, comments, encoded words or other
# specials. Such a value is read without the email package's parser, which is the cost of
# the sender policy otherwise (relay.accept.headers tries this first);
# tests/test_prop_headers.py checks that the two agree.
_PLAIN_ADDRESS = re.compile(
    rf"(?:(?P<name>{ATEXT}(?: {ATEXT})*) )?(?P<open><?)(?P<local>{PLAIN_LOCAL})"
    rf"@(?P<domain>{PLAIN_DOMAIN})(?P<close>>?)")


def plain_address(value: str) -> Address | None:
    """The one address of a plain field value (see ``_PLAIN_ADDRESS``), else None."""
    m = _PLAIN_ADDRESS.fullmatch(value)
    if m is None or bool(m["open"]) != bool(m["close"]) or (m["name"] and not m["open"]) \
            or "=?" in value:           # an encoded word: the email package decodes it
        return None
    return Address(display_name=m["name"] or "", username=m["local"], domain=m["domain"])
