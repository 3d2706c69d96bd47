"""aiosmtpd adapted once per process: its per-connection setup done once per protocol
class instead, and its log kept free of what a client types by mistake.

- :func:`install`: make aiosmtpd look up a protocol's ``auth_*`` methods from a table
  kept per class, instead of with :func:`inspect.getmembers` on every new connection;
  and leave the command out of its log line for an unknown command
  (:class:`_UnknownCommandFilter`).

aiosmtpd's ``SMTP.__init__`` finds the AUTH mechanisms by calling ``inspect.getmembers``
on the new protocol object and on the handler, for every connection. That reads every
attribute of both, properties included, and was about a twelfth of the relay's CPU per
message. The ``auth_*`` methods are the class's, so the names are collected once per
class and only they are looked up on the object: the mechanisms offered, and the methods
called, are the same. The module aiosmtpd calls it through is the only thing replaced;
tests/test_library_contract.py checks that aiosmtpd still uses ``inspect.getmembers``
only there and that the mechanisms come out the same.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import aiosmtpd.smtp

_AUTH_NAMES: dict[type, tuple[str, ...]] = {}      # one entry per protocol/handler class


def _auth_names(cls: type) -> tuple[str, ...]:
    names = _AUTH_NAMES.get(cls)
    if names is None:
        names = _AUTH_NAMES[cls] = tuple(n for n in dir(cls) if n.startswith("auth_"))
    return names


class _Inspect:
    """:mod:`inspect` as aiosmtpd.smtp sees it: ``getmembers`` from the per-class table."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def getmembers(obj: object) -> list[tuple[str, Any]]:
        names = set(_auth_names(type(obj)))
        names.update(n for n in getattr(obj, "__dict__", {}) if n.startswith("auth_"))
        return [(name, getattr(obj, name)) for name in sorted(names)]


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
    mail_log = logging.getLogger("mail.log")
    if not any(isinstance(f, _UnknownCommandFilter) for f in mail_log.filters):
        mail_log.addFilter(_UnknownCommandFilter())
