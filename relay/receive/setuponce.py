"""aiosmtpd adapted once per process: its per-connection setup done once per protocol
class instead, and its log kept free of what a client types by mistake.

- :func:`install`: make aiosmtpd find a protocol's ``auth_*``, ``smtp_*`` and
  ``handle_*`` methods from a table kept per class, instead of with
  :func:`inspect.getmembers` and :func:`dir` on every new connection; and leave the
  command out of its log line for an unknown command (:class:`_UnknownCommandFilter`).
- :func:`_sanitized_log`: aiosmtpd masks AUTH data in every command line it logs (two
  lines per command, at DEBUG and INFO) before the logger is asked whether it wants the
  line; the relay's never does (relay.core.log keeps ``mail.log`` at WARNING), so the
  masking is skipped where the line would be dropped.
- :class:`CommandTable`: for a protocol class that takes it, aiosmtpd's table of
  commands bound to the connection (``_smtp_methods``) is not built per connection at
  all: a command is bound when it is looked up.

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

The command table aiosmtpd builds holds a method bound to the connection for each of its
twenty-odd commands: objects made for every connection, which also tie the connection
into a reference cycle the garbage collector must walk. A connection uses five or six
of them; :class:`CommandTable` binds those when they are looked up.
"""

from __future__ import annotations

import builtins
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
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
    classes, a ``__dir__`` of their own) get the real one. aiosmtpd looks only for the
    commands of a protocol object, which a :class:`CommandTable` finds itself."""
    if isinstance(obj, CommandTable):
        return []
    if type(obj).__dir__ is not object.__dir__:
        return builtins.dir(obj)
    return _names(obj)


class _Commands(Mapping[str, Any]):
    """aiosmtpd's ``_smtp_methods`` of one connection: command name -> bound method."""

    __slots__ = ("_class_names", "_obj")

    def __init__(self, obj: object) -> None:
        self._obj = obj
        self._class_names = _commands(type(obj))

    def __getitem__(self, command: str) -> Any:
        name = "smtp_" + command
        if command in self._class_names or name in getattr(self._obj, "__dict__", ()):
            return getattr(self._obj, name)
        raise KeyError(command)

    def __iter__(self) -> Iterator[str]:
        own = getattr(self._obj, "__dict__", {})
        yield from self._class_names
        yield from (n[5:] for n in own if n.startswith("smtp_") and
                    n[5:] not in self._class_names)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_COMMANDS: dict[type, frozenset[str]] = {}


def _commands(cls: type) -> frozenset[str]:
    names = _COMMANDS.get(cls)
    if names is None:
        names = _COMMANDS[cls] = frozenset(
            n[5:] for n in _class_names(cls) if n.startswith("smtp_"))
    return names


class CommandTable:
    """A protocol class's commands, bound to the connection when aiosmtpd looks one up
    (see the module docstring); a base of the protocol class, before aiosmtpd's SMTP."""

    @property
    def _smtp_methods(self) -> Mapping[str, Any]:
        return _Commands(self)

    @_smtp_methods.setter
    def _smtp_methods(self, table: dict[str, Any]) -> None:
        """What SMTP.__init__ built (nothing: see :func:`_dir`) is not kept."""


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


_MASKING = aiosmtpd.smtp.sanitized_log
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def _sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, asked first whether the line is wanted at all."""
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None \
            and not logger.isEnabledFor(level):
        return
    _MASKING(func, msg, *args, **kwargs)


def install() -> None:
    """Idempotent; called when the receiving side is imported."""
    if not isinstance(aiosmtpd.smtp.inspect, _Inspect):
        aiosmtpd.smtp.inspect = _Inspect()  # type: ignore[assignment]
    aiosmtpd.smtp.dir = _dir  # type: ignore[attr-defined]
    aiosmtpd.smtp.sanitized_log = _sanitized_log
    mail_log = logging.getLogger("mail.log")
    if not any(isinstance(f, _UnknownCommandFilter) for f in mail_log.filters):
        mail_log.addFilter(_UnknownCommandFilter())
