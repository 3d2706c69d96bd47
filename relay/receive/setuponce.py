"""aiosmtpd adapted once per process: its per-connection setup done once per protocol
class instead, and its log kept free of what a client types by mistake.

- :func:`install`: make aiosmtpd find a protocol's ``auth_*``, ``smtp_*`` and
  ``handle_*`` methods from a table kept per class, instead of with
  :func:`inspect.getmembers` and :func:`dir` on every new connection; and leave the
  command out of its log line for an unknown command (:class:`_UnknownCommandFilter`).

aiosmtpd's ``SMTP.__init__`` finds the AUTH mechanisms by calling ``inspect.getmembers``
on the new protocol object and on the handler, and the commands and hooks by calling
``dir`` on both, for every connection. That reads every attribute of both, properties
included, through the whole class hierarchy: about a twelfth of the relay's CPU per
message for getmembers, a thirtieth for dir. The methods are the class's, so their names
are collected once per class, and only they (and any of the object's own attributes
with those prefixes) are looked up on the object: the mechanisms offered, the commands
and the hooks are the same. The ``inspect`` and ``dir`` aiosmtpd.smtp sees are the only
things replaced; tests/test_library_contract.py checks that aiosmtpd uses them only
there and that what it finds comes out the same.
"""

from __future__ import annotations

import builtins
import inspect
import logging
from typing import Any

import aiosmtpd.smtp

# The prefixes of the names aiosmtpd.smtp looks for with getmembers and dir.
_PREFIXES = ("auth_", "smtp_", "handle_")
_INITIALS = frozenset(p[0] for p in _PREFIXES)
_NAMES: dict[type, tuple[str, ...]] = {}      # one entry per protocol/handler class


def _class_names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(n for n in builtins.dir(cls) if n.startswith(_PREFIXES))
    return names


def _names(obj: object) -> list[str]:
    """The names of ``obj`` that aiosmtpd looks for, as ``dir(obj)`` has them."""
    own = getattr(obj, "__dict__", {})
    # Most of an object's own names are private ("_..."): the first letter rules them out.
    return [*_class_names(type(obj)),
            *(n for n in own if n[:1] in _INITIALS and n.startswith(_PREFIXES))]


def _dir(obj: object) -> list[str]:
    """``dir`` as aiosmtpd.smtp sees it; objects that make their own listing (modules,
    classes, a ``__dir__`` of their own) get the real one."""
    if type(obj).__dir__ is not object.__dir__:
        return builtins.dir(obj)
    return _names(obj)


class _Inspect:
    """:mod:`inspect` as aiosmtpd.smtp sees it: ``getmembers`` from the per-class table."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def getmembers(obj: object) -> list[tuple[str, Any]]:
        names = sorted({n for n in _names(obj) if n.startswith("auth_")})
        return [(name, getattr(obj, name)) for name in names]


class _UnknownCommandFilter(logging.Filter):
    """aiosmtpd logs the name of an unknown command at WARNING, a level the relay lets
    through. A client out of step sends its AUTH answers as commands (a printer that does
    not wait for the 334s, after AUTH was refused): that name is a password in clear or
    in base64, so the line goes out without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%r unrecognised: %s" and isinstance(record.args, tuple):
            record.msg, record.args = "%r unrecognised command (not logged)", record.args[:1]
        return True


def install() -> None:
    """Idempotent; called when the receiving side is imported."""
    if not isinstance(aiosmtpd.smtp.inspect, _Inspect):
        aiosmtpd.smtp.inspect = _Inspect()  # type: ignore[assignment]
    aiosmtpd.smtp.dir = _dir  # type: ignore[attr-defined]
    mail_log = logging.getLogger("mail.log")
    if not any(isinstance(f, _UnknownCommandFilter) for f in mail_log.filters):
        mail_log.addFilter(_UnknownCommandFilter())
